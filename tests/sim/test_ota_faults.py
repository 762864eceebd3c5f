"""OTA fault suite (CPython, the real firmware, a real mosquitto, a real HTTP
server on loopback): power lost at every step of an update, and the network,
the server, the broker, the release itself going wrong. After every case the
node boots, runs either the old or the new version, says which in its birth,
and reaches the broker: never bricked, never half-switched.

Power loss is enumerated, not hand-picked: a recording run traces every
flash mutation the update makes (each file opened for writing, each write,
close, rename, remove, mkdir in node/ota.py, boot.py and the simulated
esp32 partitions) and copies the board's whole flash after each one. That
copy is what a board holds when power goes at that instant: nothing in
Python's write buffers, nothing later. Each copy then boots as a fresh board
(boot.py's selection, a new Node from the chosen slot's code), and the test
asks the update of it again until it runs the new version.
"""
from __future__ import annotations

import asyncio
import builtins
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from fleet.demo import firmware_on_path
from fleet.mosquitto import Mosquitto
from fleet.schemas import validate
from tests.harness.ota import ReleaseServer, build_release, firmware_files, image_bytes, new_key, public_hex
from tools.boards import compile_board

REPO = Path(__file__).resolve().parents[2]
FACTORY = REPO / "firmware"
OLD, NEW = "0.1.0", "2.0.0"
PART_SIZE, IMAGE_SIZE = 131072, 72000  # 18 blocks: the node records its progress after 16
# the modules an env-station with a BME280 imports: a complete slot for this test board
NEEDED = {"node/__init__.py", "node/app.py", "node/bootinfo.py", "node/clock.py", "node/config.py",
          "node/ed25519.py", "node/health.py", "node/http.py", "node/mqtt.py", "node/ota.py",
          "node/outbox.py", "node/sampler.py", "node/uplink.py", "node/sensors/__init__.py",
          "node/sensors/bme280.py"}
pytestmark = pytest.mark.broker

firmware_on_path()
from node.config import check_identity, check_profile  # noqa: E402
from sim.clock import PacedClock  # noqa: E402
from sim.esp32 import Flash  # noqa: E402
from sim.machine import SimReset  # noqa: E402
from sim.virtual import make_board  # noqa: E402

_spec = importlib.util.spec_from_file_location("iwaki_boot", FACTORY / "boot.py")
BOOT = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(BOOT)


def profile() -> dict:
    p = compile_board(REPO / "boards" / "env-station.toml")
    p["sensors"] = [s for s in p["sensors"] if s["kind"] == "bme280"]
    p["sensors"][0]["period_ms"] = 10  # ten ticks (the trial's minimum) in 100 ms
    p["report"].update(window_s=1, health_s=5, max_silence_s=1, event_window_s=1)
    p["report"]["deadband"] = {"temp_c": 0.2}
    return check_profile(p)


PROFILE = profile()


def load_code(fs: Path, slot: str):
    """What a reset and boot.py give the app: no node module loaded, and the
    chosen slot first on the import path (the factory code is firmware/)."""
    for name in [n for n in sys.modules if n == "node" or n.startswith("node.")]:
        del sys.modules[name]
    sys.path[:] = [p for p in sys.path if "/ota/" not in p]
    if slot != "root":
        sys.path.insert(0, str(fs / "ota" / slot))
    importlib.invalidate_caches()
    dont = sys.dont_write_bytecode
    sys.dont_write_bytecode = slot != "root"  # no __pycache__ inside a slot
    try:
        return importlib.import_module("node.app").Node
    finally:
        sys.dont_write_bytecode = dont


# -- power loss: every flash mutation traced, the flash copied after each
class _TracedFile:
    def __init__(self, f, tracer, what):
        self._f, self._t, self._what = f, tracer, what

    def write(self, data):
        n = self._f.write(data)
        self._t.op("write %d B %s" % (len(data), self._what))
        return n

    def close(self):
        if not self._f.closed:
            self._f.close()
            self._t.op("close " + self._what)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


class _TracedOS:
    def __init__(self, tracer):
        self._t = tracer

    def __getattr__(self, name):
        fn = getattr(os, name)
        if name not in ("rename", "remove", "mkdir", "rmdir"):
            return fn

        def traced(*args):
            r = fn(*args)
            self._t.op("%s %s" % (name, " ".join(self._t.rel(a) for a in args)))
            return r
        return traced


class Tracer:
    """Counts the update's flash mutations; on_op(k, what) after each."""

    def __init__(self, board_dir: Path, on_op):
        self.dir = str(board_dir)
        self.on_op = on_op
        self.n = 0
        self.os = _TracedOS(self)

    def rel(self, p) -> str:
        return str(p).replace(self.dir + "/", "")

    def op(self, what):
        self.n += 1
        self.on_op(self.n, what)

    def open(self, path, mode="r", *args, **kw):
        f = builtins.open(path, mode, *args, **kw)
        if any(c in mode for c in "wa+"):
            what = self.rel(path)
            self.op("open %s %s" % (mode, what))
            return _TracedFile(f, self, what)
        return f

    def attach(self, *modules):
        for m in modules:
            m.open = self.open
            m.os = self.os


def detach(*modules):
    for m in modules:
        m.__dict__.pop("open", None)
        m.os = os


# -- a board whose flash outlives its resets
class Board:
    def __init__(self, path: Path, name: str, broker, keys, image: bool = False):
        self.path = path
        self.fs = path / "fs"
        self.fs.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.image = image
        self.ident = check_identity({"node": name, "user": name, "password": "", "ota_keys": keys,
                                     "broker": {"host": broker.host, "port": broker.port}})
        self.node = self.task = self.flash = None
        self.tracer = None

    def boot(self, clock):
        """A reset: the bootloader (image boards), boot.py, a fresh Node."""
        if self.image:
            self.flash = Flash(str(self.path / "partitions"), size=PART_SIZE, image=b"\xe9factory")
        sel = BOOT.select(str(self.fs))
        Node = load_code(self.fs, sel[0])
        if self.tracer:
            self.tracer.attach(sys.modules["node.ota"])
        m, _ = make_board(PROFILE, clock, b"\x24\x6f\x28\x00\x02\x01")
        self.node = Node(m, clock, PROFILE, self.ident, str(self.fs), asyncio.open_connection, esp32=self.flash)
        self.node.ota.backoff_ms = 20
        self.task = asyncio.create_task(self._run(self.node))
        return sel

    @staticmethod
    async def _run(node):
        try:
            await node.run()
            return "stopped"
        except SimReset:
            return "reset"

    async def ended(self, timeout=15.0):
        assert await until(self.task.done, timeout), "the node did not reset"
        return self.task.result()

    def state(self) -> dict:
        p = self.fs / "ota" / "state.json"
        return json.loads(p.read_text()) if p.exists() else {"active": "root", "trial": None}


def _last(items, key):
    return items[-1][key] if items else None


async def until(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.01)
    return pred()


class Watcher:
    """Everything the nodes publish, as the fleet would see it."""

    def __init__(self, broker):
        self.msgs: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        # a persistent session: what nodes say while the watcher reconnects after a broker restart is kept
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="ota-faults-watch", clean_session=False)
        self.c.on_message = self._on
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe("iwaki/#", qos=1)
        self.c.reconnect_delay_set(0.05, 0.2)
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()

    def _on(self, c, u, msg):
        try:
            d = json.loads(msg.payload)
        except ValueError:
            return
        with self.lock:
            self.msgs.append((msg.topic, d))

    def of(self, node, kind):
        with self.lock:
            return [d for t, d in self.msgs if t == "iwaki/%s/%s" % (node, kind)]

    def births(self, node, fw):
        return [b for b in self.of(node, "birth") if b["fw"] == fw]

    def ota(self, node, cid=None):
        return [m["result"]["ota"] for m in self.of(node, "reply")
                if "result" in m and "ota" in m["result"] and (cid is None or m["id"] == cid)]

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def flash_tmp(tmp_path):
    """A scratch dir for many flash copies: on tmpfs when there is one (a
    disk makes thousands of small copies slow), removed afterwards."""
    base = Path("/dev/shm")
    if base.is_dir() and os.access(base, os.W_OK):
        d = Path(tempfile.mkdtemp(prefix="ota-flash-", dir=base))
        yield d
        shutil.rmtree(d, ignore_errors=True)
    else:
        yield tmp_path


@pytest.fixture(scope="module", autouse=True)
def _imports_restored():
    """Boots here swap the node package for a slot's copy: put back the
    import path and the modules other test modules were given."""
    path = list(sys.path)
    mods = {n: m for n, m in sys.modules.items() if n == "node" or n.startswith("node.")}
    yield
    for n in [n for n in sys.modules if n == "node" or n.startswith("node.")]:
        del sys.modules[n]
    sys.modules.update(mods)
    sys.path[:] = path
    importlib.invalidate_caches()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One broker, one release server, the keys and releases for the whole module."""
    tmp = tmp_path_factory.mktemp("ota-faults")
    broker = Mosquitto(tmp / "broker").start()
    good, other = new_key(), new_key()
    rel = tmp / "releases"
    files = firmware_files(NEW, compiled=False, only=NEEDED)
    m = build_release(rel, NEW, files, good)
    build_release(rel, "2.0.1", firmware_files("2.0.1", compiled=False, only=NEEDED), other)
    crash = dict(files)
    crash["node/app.py"] = b"raise RuntimeError('this build crashes at import')\n"
    crash["node/_version.py"] = b'VERSION = "2.1.0"\n'
    build_release(rel, "2.1.0", crash, good)
    sick = dict(files)
    sick["node/sensors/bme280.py"] = files["node/sensors/bme280.py"].replace(
        b"    def begin(self):", b"    def begin(self):\n        raise OSError(19)\n\n    def _gone(self):", 1)
    sick["node/_version.py"] = b'VERSION = "2.2.0"\n'
    build_release(rel, "2.2.0", sick, good)
    img = image_bytes(IMAGE_SIZE)
    build_release(rel, "3.0.0", {"firmware.bin": img}, good, kind="image")
    srv = ReleaseServer(rel).start()
    w = Watcher(broker)
    yield {"tmp": tmp, "broker": broker, "srv": srv, "keys": [public_hex(good)], "manifest": m,
           "files": files, "watch": w, "image": img}
    w.close()
    srv.stop()
    broker.stop()


def _run(coro):
    clock = PacedClock()

    async def main():
        pacer = asyncio.create_task(clock.run())
        try:
            return await coro(clock)
        finally:
            pacer.cancel()
    return asyncio.run(main())


def _flash_digest(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        h.update(str(p.relative_to(d)).encode() + b"\0")
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _slot_matches(fs: Path, manifest: dict) -> bool:
    slot = fs / "ota" / "a"
    return all((slot / f["path"]).is_file()
               and hashlib.sha256((slot / f["path"]).read_bytes()).hexdigest() == f["sha256"]
               for f in manifest["files"])


def _present(fs: Path, manifest: dict) -> int:
    # bytes of the release already on flash: whole verified files, and
    # partial downloads of this release (which the node resumes)
    slot = fs / "ota" / "a"
    prog = fs / "ota" / "progress.json"
    same = prog.exists() and json.loads(prog.read_text() or "{}").get("version") == manifest["version"]
    n = 0
    for f in manifest["files"]:
        p = slot / f["path"]
        if p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest() == f["sha256"]:
            n += f["size"]
        elif same and Path(str(p) + ".part").is_file():
            n += min(Path(str(p) + ".part").stat().st_size, f["size"])
    return n


# -- power loss at every step of a bundle update
def test_power_loss_at_every_step_of_a_bundle_update(world, flash_tmp):
    srv, w, man = world["srv"], world["watch"], world["manifest"]
    rec = flash_tmp / "rec"
    snaps: list[tuple[str, Path]] = []
    steps: list[str] = []
    last = [None]

    def snapshot(k, what):
        steps.append(what)
        digest = _flash_digest(rec)
        if digest != last[0]:  # an unflushed write leaves the flash as it was: same case
            last[0] = digest
            dst = flash_tmp / "snap" / ("%03d" % k)
            shutil.copytree(rec, dst)
            snaps.append((what, dst))

    async def record(clock):
        b = Board(rec, "rec-bundle", world["broker"], world["keys"])
        b.tracer = Tracer(rec, snapshot)
        b.tracer.attach(BOOT)
        try:
            assert b.boot(clock) == ("root", False)
            assert await until(lambda: w.births("rec-bundle", OLD))
            b.node.ota.command("rec-1", {"url": srv.url(NEW), "version": NEW})
            assert await b.ended() == "reset"
            assert b.boot(clock) == ("a", True)
            assert await until(lambda: [o["state"] for o in w.ota("rec-bundle")][-1:] == ["committed"])
            assert await until(lambda: b.state()["last"].get("told"))
            await b.node.stop()
        finally:
            detach(BOOT)

    _run(record)
    kinds = {}
    for what in steps:
        kinds[what.split()[0]] = kinds.get(what.split()[0], 0) + 1
    assert kinds.get("rename", 0) >= len(man["files"]) + 3, kinds  # each file, progress, switch, boot count, commit
    assert kinds.get("write", 0) >= len(man["files"]), kinds
    labels = [what for what, _ in snaps]
    # state.json replaced four times (the switch, the boot count, the commit, its reply noted), and
    # power lost both between writing state.tmp and renaming it, and after the rename
    assert labels.count("close fs/ota/state.tmp") >= 4, labels
    assert labels.count("rename fs/ota/state.tmp fs/ota/state.json") >= 4, labels
    assert any(x.startswith("write ") and x.endswith(".part") for x in labels)  # mid-file
    total = man["total_size"]
    seen = {"old": 0, "new": 0, "trial": 0, "resumed_bytes": 0}

    async def recover(clock):
        for k, (what, snap) in enumerate(snaps):
            name = "pl-%03d" % k
            d = snap  # each copy boots once
            present = _present(d / "fs", man)
            b = Board(d, name, world["broker"], world["keys"])
            slot, trial = b.boot(clock)
            fw = b.node.fw
            # never half-switched: the code that runs is the version its slot holds
            assert (slot, fw) in (("root", OLD), ("a", NEW)), (k, what, slot, fw)
            if slot == "a":
                assert _slot_matches(d / "fs", man), (k, what)
            assert await until(lambda: w.births(name, fw)), (k, what, "never reached the broker")
            if trial:
                seen["trial"] += 1  # lost after the switch: the trial finishes what it started
                assert await until(lambda: b.node.ota.trial is None), (k, what)
            elif fw == OLD:
                # lost before the switch: the fleet asks again and the node resumes,
                # downloading only what is missing, up to the switch (the trial
                # that follows is the same as in the cases after the switch)
                seen["old"] += 1
                b.node.ota.command("again", {"url": srv.url(NEW), "version": NEW})
                assert await b.ended() == "reset", (k, what, w.ota(name))
                assert b.node.ota.stats["written"] == total - present, (k, what)
                seen["resumed_bytes"] += present
                t = b.state()["trial"]
                assert t["slot"] == "a" and t["version"] == NEW and t["boots"] == 0, (k, what)
                assert _slot_matches(d / "fs", man) and not (d / "fs" / "ota" / "progress.json").exists()
                continue
            else:
                seen["new"] += 1
            st = b.state()
            assert st["active"] == "a" and st["trial"] is None and st["last"]["state"] == "committed", (k, what, st)
            assert b.node.fw == NEW and b.node.reboot_reason is None, (k, what)
            await b.node.stop()
            await asyncio.gather(b.task, return_exceptions=True)
        return seen

    _run(recover)
    print("\npower loss at each of %d steps of a %d-file bundle update %s, %d distinct flash states: "
          "booted the old version %d times (then resumed, %d bytes reused), a pending trial %d times, "
          "the new version %d times" % (len(steps), len(man["files"]), kinds, len(snaps), seen["old"],
                                        seen["resumed_bytes"], seen["trial"], seen["new"]))
    assert seen["old"] and seen["trial"] and seen["new"]
    assert seen["resumed_bytes"] > 0  # partial downloads were continued, not restarted


# -- power loss at every step of an image update (esp32.Partition, simulated bootloader)
def test_power_loss_at_every_step_of_an_image_update(world, flash_tmp):
    import sim.esp32 as esp32_module
    srv, w, img = world["srv"], world["watch"], world["image"]
    sha = hashlib.sha256(img).hexdigest()
    rec = flash_tmp / "rec"
    snaps: list[tuple[str, Path]] = []
    steps: list[str] = []
    last = [None]

    def snapshot(k, what):
        steps.append(what)
        digest = _flash_digest(rec)
        if digest != last[0]:
            last[0] = digest
            dst = flash_tmp / "snap" / ("%03d" % k)
            shutil.copytree(rec, dst)
            snaps.append((what, dst))

    def running_image_is_whole(b):
        return b.flash.running == "ota_0" or hashlib.sha256(b.flash.image("ota_1", len(img))).hexdigest() == sha

    async def record(clock):
        b = Board(rec, "rec-image", world["broker"], world["keys"], image=True)
        Flash(str(rec / "partitions"), size=PART_SIZE, image=b"\xe9factory")  # the factory flashing, untraced
        b.tracer = Tracer(rec, snapshot)
        b.tracer.attach(BOOT, esp32_module)
        try:
            b.boot(clock)
            assert await until(lambda: w.births("rec-image", OLD))
            b.node.ota.command("img-1", {"url": srv.url("3.0.0"), "version": "3.0.0", "kind": "image"})
            assert await b.ended() == "reset"
            b.boot(clock)
            assert b.flash.running == "ota_1"
            assert await until(lambda: b.state()["last"] and b.state()["last"].get("told"))
            assert b.state()["last"]["state"] == "committed"
            await b.node.stop()
        finally:
            detach(BOOT, esp32_module)

    _run(record)
    kinds = {}
    for what in steps:
        kinds[what.split()[0]] = kinds.get(what.split()[0], 0) + 1
    blocks = (len(img) + 4095) // 4096
    assert sum(1 for s in steps if s.startswith("open r+b partitions/ota_1.bin")) == blocks
    seen = {"old": 0, "trial": 0, "new": 0, "resumed_blocks": 0}

    async def recover(clock):
        for k, (what, d) in enumerate(snaps):
            name = "im-%03d" % k
            prog = d / "fs" / "ota" / "progress.json"
            done = json.loads(prog.read_text()).get("blocks", 0) if prog.exists() else 0
            b = Board(d, name, world["broker"], world["keys"], image=True)
            b.boot(clock)
            # the bootloader starts the old image, or the new one only when it is whole
            assert running_image_is_whole(b), (k, what)
            assert await until(lambda: w.births(name, OLD)), (k, what, "never reached the broker")
            if b.node.ota.trial:
                seen["trial"] += 1
                assert await until(lambda: b.node.ota.trial is None), (k, what)
            elif b.flash.running == "ota_0":
                seen["old"] += 1  # the fleet asks again (force: a trial may have rolled back)
                b.node.ota.command("again", {"url": srv.url("3.0.0"), "version": "3.0.0", "kind": "image",
                                             "force": True})
                assert await b.ended() == "reset", (k, what, w.ota(name))
                assert b.node.ota.stats["writes"] == blocks - done, (k, what)  # resumed at its last record
                seen["resumed_blocks"] += done
                assert b.state()["trial"]["part"] == "ota_1" and b.flash.state()["state"] == "new", (k, what)
                assert hashlib.sha256(b.flash.image("ota_1", len(img))).hexdigest() == sha
                continue
            else:
                seen["new"] += 1
            assert b.flash.running == "ota_1" and b.flash.state()["state"] == "valid", (k, what)
            assert b.state()["image"] == "3.0.0" and b.state()["last"]["state"] == "committed", (k, what)
            await b.node.stop()
            await asyncio.gather(b.task, return_exceptions=True)
        return seen

    _run(recover)
    print("\npower loss at each of %d steps of a %d-block image update %s, %d distinct flash states: "
          "the old image %d times (then resumed, %d blocks kept), a pending trial %d times, "
          "the new image %d times" % (len(steps), blocks, kinds, len(snaps), seen["old"],
                                      seen["resumed_blocks"], seen["trial"], seen["new"]))
    assert seen["old"] and seen["trial"] and seen["new"]
    assert seen["resumed_blocks"] > 0  # a download cut after its progress record went on from there


# -- builds that fail on the node
def test_a_build_that_crashes_at_import_is_rolled_back_after_three_trial_boots(world, flash_tmp):
    srv, w = world["srv"], world["watch"]

    async def scenario(clock):
        b = Board(flash_tmp / "crash", "crash-1", world["broker"], world["keys"])
        b.boot(clock)
        assert await until(lambda: w.births("crash-1", OLD))
        b.node.ota.command("cr-1", {"url": srv.url("2.1.0"), "version": "2.1.0"})
        assert await b.ended() == "reset"
        for n in (1, 2, 3):
            # boot.py counts the boot, then the new code dies before the app runs (the watchdog resets)
            with pytest.raises(RuntimeError, match="crashes at import"):
                b.boot(clock)
            assert b.state()["trial"]["boots"] == n
        assert b.boot(clock) == ("root", False)
        assert b.node.fw == OLD
        assert await until(lambda: [o["state"] for o in w.ota("crash-1", "cr-1")][-1:] == ["rolled_back"])
        birth = w.births("crash-1", OLD)[-1]
        assert birth["ota"]["state"] == "rolled_back" and "3 trial boots" in birth["ota"]["reason"]
        reply = [m for m in w.of("crash-1", "reply") if m["id"] == "cr-1"][-1]
        assert reply["ok"] is False and reply["error"].startswith("ota rolled_back: 3 trial boots")
        await b.node.stop()

    _run(scenario)


def test_a_build_whose_sensor_fails_is_rolled_back_by_the_health_check(world, flash_tmp):
    srv, w = world["srv"], world["watch"]

    async def scenario(clock):
        b = Board(flash_tmp / "sick", "sick-1", world["broker"], world["keys"])
        b.boot(clock)
        assert await until(lambda: w.births("sick-1", OLD))
        b.node.ota.command("sk-1", {"url": srv.url("2.2.0"), "version": "2.2.0"})
        assert await b.ended() == "reset"
        assert b.boot(clock) == ("a", True) and b.node.fw == "2.2.0"
        assert await b.ended() == "reset"  # the health check failed at once: back to the old code
        assert b.boot(clock) == ("root", False) and b.node.fw == OLD
        assert await until(lambda: w.births("sick-1", OLD)[-1:] and "ota" in w.births("sick-1", OLD)[-1])
        assert w.births("sick-1", OLD)[-1]["ota"] == {
            "state": "rolled_back", "version": "2.2.0", "reason": "health check: sensor bme280 failed"}
        assert await until(lambda: [o["state"] for o in w.ota("sick-1", "sk-1")][-2:] == ["trial", "rolled_back"])
        # every birth and reply of the update passes the fleet's schemas
        for kind in ("birth", "reply", "health"):
            for payload in w.of("sick-1", kind):
                validate(kind, payload)
        # the same build is not tried again unless the fleet insists
        b.node.ota.command("sk-2", {"url": srv.url("2.2.0"), "version": "2.2.0"})
        await b.node.ota.task
        assert await until(lambda: _last(w.ota("sick-1", "sk-2"), "state") == "failed")
        assert w.ota("sick-1", "sk-2")[-1]["reason"].startswith("rolled back before")
        await b.node.stop()

    _run(scenario)


# -- the release, the server and the network going wrong
def test_a_corrupted_file_is_refused_then_the_fixed_release_resumes(world, flash_tmp):
    srv, w, man = world["srv"], world["watch"], world["manifest"]
    rel = "%s/files/node/config.py" % NEW
    good = world["files"]["node/config.py"]

    async def scenario(clock):
        b = Board(flash_tmp / "corrupt", "corrupt-1", world["broker"], world["keys"])
        b.boot(clock)
        assert await until(lambda: w.births("corrupt-1", OLD))
        srv.tamper[rel] = good.replace(b"def ", b"dEf ", 1)
        try:
            b.node.ota.command("co-1", {"url": srv.url(NEW), "version": NEW})
            await b.node.ota.task
        finally:
            srv.tamper.pop(rel)
        assert await until(lambda: _last(w.ota("corrupt-1", "co-1"), "state") == "failed")
        assert w.ota("corrupt-1", "co-1")[-1]["reason"] == "hash mismatch: node/config.py"
        assert not b.task.done() and b.state()["trial"] is None and b.node.uplink.client.connected
        fs = b.fs
        assert not (fs / "ota" / "a" / "node" / "config.py").exists()
        assert not (fs / "ota" / "a" / "node" / "config.py.part").exists()
        present = _present(fs, man)
        assert present > 0  # the files before it were kept
        b.node.ota.command("co-2", {"url": srv.url(NEW), "version": NEW})
        assert await b.ended() == "reset"
        assert b.node.ota.stats["written"] == man["total_size"] - present
        assert b.boot(clock) == ("a", True)
        assert await until(lambda: b.node.ota.trial is None) and b.state()["active"] == "a"
        await b.node.stop()

    _run(scenario)


def test_a_manifest_signed_by_another_key_is_refused(world, flash_tmp):
    srv, w = world["srv"], world["watch"]

    async def scenario(clock):
        b = Board(flash_tmp / "forged", "forged-1", world["broker"], world["keys"])
        b.boot(clock)
        assert await until(lambda: w.births("forged-1", OLD))
        b.node.ota.command("fo-1", {"url": srv.url("2.0.1"), "version": "2.0.1"})
        await b.node.ota.task
        assert await until(lambda: _last(w.ota("forged-1", "fo-1"), "state") == "failed")
        assert w.ota("forged-1", "fo-1")[-1]["reason"].startswith("unknown key: signed with key ")
        assert not (b.fs / "ota").exists()  # nothing was fetched past the manifest
        assert [e["path"] for e in srv.log if e["path"].startswith("2.0.1/")] == [
            "2.0.1/manifest.json", "2.0.1/manifest.sig"]
        assert not b.task.done() and b.node.fw == OLD
        await b.node.stop()

    _run(scenario)


def test_truncated_downloads_resume_with_range(world, flash_tmp):
    srv, w, man = world["srv"], world["watch"], world["manifest"]
    rel = "%s/files/node/config.py" % NEW
    size = len(world["files"]["node/config.py"])

    async def scenario(clock):
        b = Board(flash_tmp / "cut", "cut-1", world["broker"], world["keys"])
        b.boot(clock)
        assert await until(lambda: w.births("cut-1", OLD))
        n = len(srv.log)
        srv.cut_at, srv.cuts[rel] = 5000, 2
        b.node.ota.command("cu-1", {"url": srv.url(NEW), "version": NEW})
        assert await b.ended() == "reset"
        got = [(e["range"], e["status"], e["bytes"]) for e in srv.log[n:] if e["path"] == rel]
        assert got == [(None, 200, 5000), ("bytes=5000-", 206, 5000), ("bytes=10000-", 206, size - 10000)], got
        assert b.node.ota.stats["written"] == man["total_size"]  # every byte written once
        assert _slot_matches(b.fs, man)

    _run(scenario)


def test_the_server_going_away_mid_update_fails_it_and_a_retry_resumes(world, flash_tmp):
    srv, w, man = world["srv"], world["watch"], world["manifest"]

    async def scenario(clock):
        b = Board(flash_tmp / "gone", "gone-1", world["broker"], world["keys"])
        b.boot(clock)
        assert await until(lambda: w.births("gone-1", OLD))
        srv.cut_at, srv.gone_after = 300, 6  # six files, then the seventh is cut and the server is gone
        b.node.ota.command("go-1", {"url": srv.url(NEW), "version": NEW})
        await b.node.ota.task
        assert await until(lambda: _last(w.ota("gone-1", "go-1"), "state") == "failed")
        assert w.ota("gone-1", "go-1")[-1]["reason"].startswith("network: cannot connect")
        assert not b.task.done() and b.node.fw == OLD and b.state()["trial"] is None
        present = _present(b.fs, man)
        assert present > 0 and any(p.name.endswith(".part") for p in (b.fs / "ota" / "a").rglob("*"))
        srv.start()  # back on the same port
        n = len(srv.log)
        b.node.ota.command("go-2", {"url": srv.url(NEW), "version": NEW})
        assert await b.ended() == "reset"
        assert b.node.ota.stats["written"] == man["total_size"] - present
        assert any(e["range"] and e["status"] == 206 for e in srv.log[n:])  # the partial file went on
        assert _slot_matches(b.fs, man)

    _run(scenario)


def test_the_broker_going_away_mid_update(world, flash_tmp):
    """The download does not need the broker; the replies wait in the outbox.
    A trial that cannot reach the broker before its deadline rolls back; once
    the broker is back the fleet hears the whole story, in order."""
    srv, w, broker = world["srv"], world["watch"], world["broker"]

    async def scenario(clock):
        b = Board(flash_tmp / "nobroker", "nobroker-1", broker, world["keys"])
        b.boot(clock)
        assert await until(lambda: w.births("nobroker-1", OLD))
        b.node.ota.deadline_s = 1
        srv.cuts["%s/files/node/app.py" % NEW] = 1  # slow the download a little
        b.node.ota.command("nb-1", {"url": srv.url(NEW), "version": NEW})
        await asyncio.to_thread(broker.stop)
        assert await b.ended() == "reset"  # staged without the broker
        assert b.boot(clock) == ("a", True) and b.node.fw == NEW
        assert await b.ended(10) == "reset"  # the trial could not reach the broker: rolled back
        assert b.state()["last"]["reason"] == "health check not passed within 1 s: broker not reached"
        assert b.boot(clock) == ("root", False) and b.node.fw == OLD
        await asyncio.to_thread(broker.start)
        assert await until(lambda: _last(w.ota("nobroker-1", "nb-1"), "state") == "rolled_back", 15)
        states = [o["state"] for o in w.ota("nobroker-1", "nb-1")]
        assert states[0] == "downloading" and states[-4:] == ["verifying", "staged", "trial", "rolled_back"], states
        # with the broker up, the fleet insists and the trial commits
        b.node.ota.command("nb-2", {"url": srv.url(NEW), "version": NEW, "force": True})
        assert await b.ended() == "reset"
        assert b.boot(clock) == ("a", True)
        assert await until(lambda: [o["state"] for o in w.ota("nobroker-1", "nb-2")][-1:] == ["committed"], 10)
        await b.node.stop()

    _run(scenario)
