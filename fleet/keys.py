"""The Ed25519 key pair that signs OTA releases, kept on the fleet's host and never on a node.

    info = create("var/keys")            # {"key_id", "public", "dir", ...}; refuses to overwrite
    info = rotate("var/keys")            # a new current pair; the old one is kept, retired
    signer = load_signer("var/keys")     # signer.sign(data) -> 64 bytes, signer.key_id
    public_keys("var/keys")              # {key_id: public hex}: the current key first, then retired ones

Files in the key directory (`IWAKI_KEYS_DIR`, default `var/keys`):

| file | what |
| --- | --- |
| `ota-signing.key` | the current private key, PEM PKCS8, mode 0600 |
| `ota-signing.pub` | its public key: 64 hex characters (32 raw bytes), one line |
| `ota-signing.<key_id>.key` / `.pub` | a retired pair, kept so the fleet can still name it |

`key_id` is the first 16 hex characters of the SHA-256 of the raw public key;
a manifest names the key that signed it by this id. The directory must not be
inside a git work tree, except under its `var/` (git-ignored), so a private key
cannot be committed by accident. It is never stored in the registry.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

KEYS_DIR_ENV = "IWAKI_KEYS_DIR"
DEFAULT_DIR = "var/keys"
PRIVATE = "ota-signing.key"
PUBLIC = "ota-signing.pub"
_RETIRED = re.compile(r"^ota-signing\.([0-9a-f]{16})\.pub$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class KeysError(Exception):
    """No key yet, a key that exists already, an unreadable key, or a directory that is not safe."""


def directory(path: str | os.PathLike | None = None) -> Path:
    """`path`, else `IWAKI_KEYS_DIR`, else `var/keys`."""
    return Path(path or os.environ.get(KEYS_DIR_ENV, "").strip() or DEFAULT_DIR)


def key_id(public_raw: bytes) -> str:
    """The first 16 hex characters of sha256(raw public key)."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


@dataclass(frozen=True)
class Signer:
    """The current private key: `sign(data)` gives the 64-byte Ed25519 signature."""
    key_id: str
    public: str
    _key: Ed25519PrivateKey

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)


def create(path: str | os.PathLike | None = None) -> dict:
    """Make the first signing key in `path` (default `directory()`); refuses when one is there (use `rotate`)."""
    d = _safe_dir(directory(path))
    if (d / PRIVATE).exists() or (d / PUBLIC).exists():
        raise KeysError(f"{d} already has a signing key ({key_id_of(d)}); "
                        "`python -m fleet keys rotate` replaces it and keeps the old one retired")
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_pair(d, Ed25519PrivateKey.generate(), PRIVATE, PUBLIC)
    return show(d)["current"] | {"dir": str(d)}


def rotate(path: str | os.PathLike | None = None) -> dict:
    """A new current key; the old pair becomes `ota-signing.<old key_id>.key/.pub` (retired).

    Nodes must trust the new public key before a release signed with it reaches
    them: ship it first in a release signed with the old key
    (`fleet release build --sign-with <old key_id>`, whose manifest lists both in
    "ota_keys"), or re-provision the nodes' identity.json "ota_keys".
    """
    d = _safe_dir(directory(path))
    old = load_signer(d)
    new = Ed25519PrivateKey.generate()
    # the new pair under temporary names first, so a failure leaves the current pair in place
    _write_pair(d, new, PRIVATE + ".new", PUBLIC + ".new")
    os.replace(d / PRIVATE, d / f"ota-signing.{old.key_id}.key")
    os.replace(d / PUBLIC, d / f"ota-signing.{old.key_id}.pub")
    os.replace(d / (PRIVATE + ".new"), d / PRIVATE)
    os.replace(d / (PUBLIC + ".new"), d / PUBLIC)
    return show(d)["current"] | {"dir": str(d), "retired": old.key_id}


def show(path: str | os.PathLike | None = None) -> dict:
    """{"dir", "current": {"key_id", "public"}, "retired": [{"key_id", "public"}, ...]}."""
    d = directory(path)
    keys = public_keys(d)
    items = [{"key_id": k, "public": v} for k, v in keys.items()]
    return {"dir": str(d), "current": items[0], "retired": items[1:]}


def key_id_of(d: Path) -> str:
    try:
        return key_id(bytes.fromhex((d / PUBLIC).read_text().strip()))
    except (OSError, ValueError):
        return "unreadable"


def public_keys(path: str | os.PathLike | None = None) -> dict[str, str]:
    """{key_id: public key hex}: the current key first, then the retired ones by key_id."""
    d = directory(path)
    if not (d / PUBLIC).exists():
        raise _no_key(d)
    keys = {}
    for path in [d / PUBLIC] + sorted(p for p in d.glob("ota-signing.*.pub") if _RETIRED.match(p.name)):
        public = _read_public(path)
        keys.setdefault(key_id(bytes.fromhex(public)), public)
    return keys


def load_signer(path: str | os.PathLike | None = None, which: str | None = None) -> Signer:
    """The current private key, or the retired one whose key_id is `which`."""
    d = directory(path)
    if which is None or which == key_id_of(d):
        file = d / PRIVATE
    else:
        file = d / f"ota-signing.{which}.key"
        if not re.fullmatch(r"[0-9a-f]{16}", which) or not file.exists():
            known = ", ".join(public_keys(d))
            raise KeysError(f"no signing key {which!r} in {d} (known: {known})")
    if not file.exists():
        raise _no_key(d)
    mode = file.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeysError(f"{file} can be read by other users (mode {stat.S_IMODE(mode):o}); "
                        f"run `chmod 600 {file}`")
    try:
        key = serialization.load_pem_private_key(file.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise KeysError(f"cannot read the signing key {file}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeysError(f"{file} is not an Ed25519 private key")
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return Signer(key_id(public), public.hex(), key)


def verify_signature(public_hex: str, signature: bytes, data: bytes) -> bool:
    """True when `signature` is `data` signed by the key whose public part is `public_hex`."""
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex)).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def _no_key(d: Path) -> KeysError:
    return KeysError(f"no signing key in {d}: run `python -m fleet keys create` "
                     f"(or point {KEYS_DIR_ENV} or the command's key directory option at the one that has it)")


def _read_public(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise KeysError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not _HEX64.match(text):
        raise KeysError(f"{path} is not a public key (64 lowercase hex characters on one line)")
    return text


def _write_pair(d: Path, key: Ed25519PrivateKey, private_name: str, public_name: str) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    for name, data, mode in ((private_name, pem, 0o600), (public_name, (public.hex() + "\n").encode(), 0o644)):
        path = d / name
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def _safe_dir(d: Path) -> Path:
    """Refuse a key directory inside a git work tree, unless under that tree's var/."""
    full = d.resolve()
    for parent in (full, *full.parents):
        if (parent / ".git").exists():
            if full == parent / "var" or (parent / "var") in full.parents:
                return d
            raise KeysError(f"{d} is inside the git work tree {parent}: a private key there could be "
                            f"committed; use {parent / 'var' / 'keys'} (var/ is git-ignored) or a directory "
                            "outside the tree")
    return d


# -- command line: `python -m fleet keys` -----------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("create", "rotate", "show"),
                   help="create: the first key; rotate: a new key, the old one retired; show: the public keys")
    p.add_argument("--dir", help=f"key directory ({KEYS_DIR_ENV}, default {DEFAULT_DIR})")
    p.add_argument("--json", action="store_true", help="print the keys as JSON")


def run(args: argparse.Namespace) -> int:
    """`fleet keys create|rotate|show`: prints the key id and the public key (never the private key)."""
    if args.action == "create":
        info = create(args.dir)
    elif args.action == "rotate":
        info = rotate(args.dir)
    else:
        info = show(args.dir)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    if args.action == "show":
        print(f"current  {info['current']['key_id']}  {info['current']['public']}")
        for k in info["retired"]:
            print(f"retired  {k['key_id']}  {k['public']}")
        return 0
    print(f"{info['key_id']}  {info['public']}")
    where = f"{info['dir']}/{PRIVATE}"
    if args.action == "create":
        print(f"private key in {where} (keep it off the nodes and out of git); put the public key "
              "in the nodes' identity.json \"ota_keys\"", file=sys.stderr)
    else:
        print(f"new key in {where}; the old key {info['retired']} is retired. Ship the new public key to "
              f"the nodes before signing with it: `fleet release build --sign-with {info['retired']} ...`",
              file=sys.stderr)
    return 0
