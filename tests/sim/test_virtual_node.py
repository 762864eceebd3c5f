"""Integration: the real firmware as a virtual node (CPython + firmware/sim)
against a real mosquitto and the real fleet ingest."""
from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from fleet.demo import firmware_on_path, node_identity
from tools.boards import compile_board

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.broker


def fast_profile() -> dict:
    """env-station with a 1 s window so a test sees many windows quickly
    (without the SCD4x, which gives a reading only every 5 s)."""
    firmware_on_path()
    from node.config import check_profile
    p = compile_board(REPO / "boards" / "env-station.toml")
    p["sensors"] = [s for s in p["sensors"] if s["kind"] != "scd4x"]
    for s in p["sensors"]:
        s["period_ms"] = {"bme280": 200, "pms5003": 1000}[s["kind"]]
    p["report"].update(window_s=1, health_s=2, max_silence_s=1, event_window_s=1)
    p["report"]["deadband"].pop("co2_ppm", None)
    return check_profile(p)


@pytest.fixture
def fleet(broker, tmp_path):
    from fleet.ingest import Ingest
    db = tmp_path / "fleet.db"
    ing = Ingest(db_path=str(db), host=broker.host, port=broker.port, root="iwaki")
    ing.start()
    yield ing, db
    ing.stop()


def rows(db, sql, *args):
    con = sqlite3.connect(db)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def wait_for(pred, timeout=15.0, step=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


async def wait_async(pred, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(0.05)
    return pred()


def make_node(profile, broker, tmp_path, i=1, prefix="env", clock=None):
    firmware_on_path()
    from node.clock import Clock
    from sim.virtual import VirtualNode
    ident = node_identity(i, "iwaki", broker, prefix)
    root = tmp_path / ("flash%d" % i)
    root.mkdir(exist_ok=True)
    return VirtualNode(profile, ident, str(root), clock or Clock(), asyncio.open_connection, seed=i)


def test_birth_telemetry_health_and_last_will_reach_the_fleet(broker, fleet, tmp_path):
    ing, db = fleet
    profile = fast_profile()

    async def scenario():
        v = make_node(profile, broker, tmp_path)
        task = asyncio.create_task(v.run())
        assert await wait_async(lambda: v.node.uplink.sent >= 4, 20), "node sent nothing"
        # a command from the fleet side and a bad one: both answered on reply
        cmd = paho.Client(paho.CallbackAPIVersion.VERSION2)
        cmd.connect(broker.host, broker.port)
        cmd.loop_start()
        cmd.publish("iwaki/env-0001/cmd/ping", json.dumps({"v": 1, "id": "p-1"}), qos=1).wait_for_publish(5)
        cmd.publish("iwaki/env-0001/cmd/selfdestruct", json.dumps({"v": 1, "id": "p-2"}), qos=1).wait_for_publish(5)
        cmd.loop_stop()
        cmd.disconnect()
        assert await wait_async(lambda: len(rows(db, "select * from replies")) == 2, 10)
        # power cut: the node's task dies, its socket closes without DISCONNECT
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return v

    v = asyncio.run(scenario())
    assert wait_for(lambda: rows(db, "select state, state_reason from nodes where id='env-0001'")
                    == [("offline", "lost")]), rows(db, "select * from nodes")
    node = rows(db, "select fw, board, chip, boot, config_hash from nodes where id='env-0001'")[0]
    assert node[:4] == ("0.1.0", "env-station", "esp32s3", 1)
    assert node[4] == v.node.config_hash
    chans = {r[0] for r in rows(db, "select distinct channel from telemetry where node='env-0001'")}
    assert {"temp_c", "rh_pct", "pressure_hpa"} <= chans, chans
    t = rows(db, "select mean from telemetry where node='env-0001' and channel='temp_c'")
    assert all(-10 < m < 40 for (m,) in t)
    assert rows(db, "select count(*) from health where node='env-0001'")[0][0] >= 1
    replies = dict(rows(db, "select cmd_id, ok from replies where node='env-0001'"))
    assert replies == {"p-1": 1, "p-2": 0}, replies
    # every payload the firmware built passed the fleet's schema validation
    assert rows(db, "select topic, reason from invalid") == []


def test_broker_restart_loses_no_telemetry_the_outbox_held(broker, fleet, tmp_path):
    ing, db = fleet
    profile = fast_profile()

    async def scenario():
        v = make_node(profile, broker, tmp_path)
        task = asyncio.create_task(v.run())
        assert await wait_async(lambda: v.node.uplink.sent >= 3, 20)
        await asyncio.to_thread(broker.stop)
        held_at_start = v.node.windows_sent
        await asyncio.sleep(4)  # windows keep closing while the broker is away
        depth_during_outage = v.node.outbox.depth
        await asyncio.to_thread(broker.start)
        # everything queued during the outage goes out after the reconnect
        assert await wait_async(lambda: v.node.outbox.depth == 0 and v.node.uplink.client.connected, 30)
        await asyncio.sleep(1)
        await v.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return v, held_at_start, depth_during_outage

    v, held, depth = asyncio.run(scenario())
    assert depth >= 3, f"the outbox held only {depth} messages during the outage"
    assert v.node.windows_sent > held + 2
    sent_seqs = v.node.uplink.seq
    assert wait_for(lambda: rows(db, "select count(*) from seen where node='env-0001'")[0][0] == sent_seqs, 20), \
        (rows(db, "select count(*) from seen where node='env-0001'"), sent_seqs)
    n_tel = rows(db, "select count(distinct seq) from telemetry where node='env-0001'")[0][0]
    assert n_tel == v.node.windows_sent
    assert rows(db, "select count(*) from gaps where node='env-0001'")[0][0] == 0
    assert rows(db, "select topic, reason from invalid") == []
    assert rows(db, "select state from nodes where id='env-0001'")[0][0] == "offline"


def test_one_node_of_each_board_kind_reaches_the_fleet(broker, fleet, tmp_path):
    """The Iwaki New Town mix: every board's virtual node is heard, its
    telemetry stored with the channels of its sensors, and the EV charger's
    and the river station's events arrive."""
    from fleet.demo import BOARDS, demo_profile
    ing, db = fleet
    firmware_on_path()
    from sim.clock import PacedClock

    async def scenario():
        clock = PacedClock()
        pacer = asyncio.create_task(clock.run())
        nodes = [make_node(demo_profile(b, 5), broker, tmp_path, i + 1, prefix, clock)
                 for i, (b, prefix) in enumerate(BOARDS.items())]
        tasks = [asyncio.create_task(v.run()) for v in nodes]
        ok = await wait_async(lambda: all(v.node.windows_sent >= 3 for v in nodes)
                              and any(v.node.event_mode for v in nodes), 40)
        for v in nodes:
            await v.stop()
        for t in tasks:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        pacer.cancel()
        crashed = [r for r in results if isinstance(r, Exception)]
        assert not crashed, crashed
        assert ok, [(v.node.uplink.node, v.node.windows_sent) for v in nodes]
        return nodes

    nodes = asyncio.run(scenario())
    # privacy: no BLE address the gate heard is in anything it wrote or sent
    addrs = nodes[1].scenario.ble_addrs
    assert len(addrs) >= 5
    blobs = [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()]
    ing.wait_idle(5)
    for addr in addrs:
        forms = [addr, addr.hex().encode(), addr.hex().upper().encode(),
                 addr.hex(":").encode(), addr.hex(":").upper().encode(), addr[::-1].hex().encode()]
        for blob in blobs:
            for form in forms:
                assert form not in blob, f"a BLE address leaked: {form!r}"
    assert wait_for(lambda: len(rows(db, "select id from nodes where board is not null")) == 4)
    boards = dict(rows(db, "select id, board from nodes"))
    assert boards == {"env-0001": "env-station", "gate-0002": "people-gate",
                      "ev-0003": "ev-charger", "river-0004": "river-station"}, boards

    def channels(node):
        return {r[0] for r in rows(db, "select distinct channel from telemetry where node=?", node)}

    assert {"temp_c", "co2_ppm", "pm25_ugm3"} <= channels("env-0001")
    assert {"people_in", "people_out", "occupancy", "presence"} <= channels("gate-0002")
    assert rows(db, "select count(*) from telemetry where node='gate-0002' and channel='people_in' "
                    "and sum is not null")[0][0] >= 1
    assert {"cp_state", "offered_a", "current_a", "voltage_v", "energy_kwh"} <= channels("ev-0003")
    assert {"level_m", "rain_mm", "rain_1h_mm", "intensity", "pga_gal"} <= channels("river-0004")
    events = {(n, e) for n, e in rows(db, "select node, event from events")}
    assert ("ev-0003", "ev.state") in events and ("ev-0003", "ev.session_start") in events, events
    assert ("river-0004", "river.stage") in events and ("river-0004", "node.event_mode") in events, events
    assert rows(db, "select count(*) from telemetry where node='river-0004' and channel='level_m'")[0][0] >= 1
    assert rows(db, "select topic, reason from invalid") == []


def test_a_clean_stop_says_shutdown_even_when_the_goodbye_is_slow(broker, fleet, tmp_path):
    """stop() says offline ("shutdown") and disconnects; the sampling loop, which kills
    the uplink once it ends, must not cut that short, or the broker publishes the will.
    The goodbye's PUBACK is held back here for longer than the loop takes to notice."""
    ing, db = fleet
    profile = fast_profile()

    async def scenario():
        v = make_node(profile, broker, tmp_path)
        task = asyncio.create_task(v.run())
        assert await wait_async(lambda: v.node.uplink.sent >= 2, 20), "node sent nothing"
        client = v.node.uplink.client
        real_wait_ack = client._wait_ack

        async def slow_ack(pid, ev):
            await asyncio.sleep(0.5)  # the loop ticks every 200 ms meanwhile
            await real_wait_ack(pid, ev)

        client._wait_ack = slow_ack
        await v.stop()
        await asyncio.wait_for(task, 5)

    asyncio.run(scenario())
    assert wait_for(lambda: rows(db, "select state, state_reason from nodes where id='env-0001'")
                    == [("offline", "shutdown")]), rows(db, "select state, state_reason from nodes")
    time.sleep(0.5)  # no will follows
    assert rows(db, "select state, state_reason from nodes where id='env-0001'") == [("offline", "shutdown")]
