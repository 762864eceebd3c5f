# The whole node application in the MicroPython VM: the env-station firmware
# on a simulated board, reaching a real mosquitto through the VM's TCP bridge.
import asyncio
import json
import os

from fwenv import env
from node.config import check_profile, load_profile
from node.mqtt import MQTTClient
from sim.clock import PacedClock
from sim.vmnet import open_connection
from sim.virtual import VirtualNode

FWTEST_NEEDS = ("broker",)
E = env()


def fast_env_station():
    p = load_profile("/boards/env-station.json")
    p["sensors"] = [s for s in p["sensors"] if s["kind"] != "scd4x"]  # 5 s per reading
    p["report"].update(window_s=1, health_s=2, max_silence_s=1, event_window_s=1)
    p["report"]["deadband"].pop("co2_ppm")
    return check_profile(p)


async def wait(pred, ms):
    for _ in range(ms // 20):
        if pred():
            return True
        await asyncio.sleep_ms(20)
    return pred()


async def watch(name, topic):
    """A client that records (topic, payload) of everything under topic."""
    got = []
    watcher = MQTTClient(name, open_connection, on_message=lambda t, m: got.append((t.decode(), m)))
    await watcher.connect(E["broker_host"], E["broker_port"])
    await watcher.subscribe(topic, 1)
    return watcher, got


def start_node(profile, node, flash, seed):
    """A virtual node on its own paced clock, running: (node, its task, the clock's pacer)."""
    clock = PacedClock()
    pacer = asyncio.create_task(clock.run())
    os.mkdir(flash)
    ident = {"node": node, "root": "iwaki", "user": node, "password": "",
             "broker": {"host": E["broker_host"], "port": E["broker_port"]}}
    v = VirtualNode(profile, ident, flash, clock, open_connection, seed=seed)
    return v, asyncio.create_task(v.run()), pacer


async def test_node_publishes_birth_state_telemetry_health_and_its_will():
    watcher, got = await watch("vm-watch", "iwaki/vm-0001/#")
    v, task, pacer = start_node(fast_env_station(), "vm-0001", "/flash/vm1", 3)

    def kinds():
        return [t.split("/")[-1] for t, _ in got]

    assert await wait(lambda: kinds().count("telemetry") >= 2 and "health" in kinds(), 15000), kinds()
    msgs = {}
    for t, m in got:
        msgs.setdefault(t.split("/")[-1], []).append(json.loads(m))
    birth = msgs["birth"][0]
    assert birth["node"] == "vm-0001" and birth["board"] == "env-station" and birth["boot"] == 1
    assert birth["config_hash"] == v.node.config_hash and birth["clock_set"] is True
    assert "temp_c" in birth["channels"] and birth["channels"]["pm25_ugm3"] == {"sensor": "pms5003"}
    assert msgs["state"][0]["state"] == "online"
    tel = msgs["telemetry"]
    assert [m["seq"] for m in tel] == sorted(m["seq"] for m in tel)
    ch = tel[-1]["ch"]
    assert ch["temp_c"]["n"] == 1 and -10 < ch["temp_c"]["mean"] < 40, ch  # 1 s window, 1 Hz
    assert 900 < ch["pressure_hpa"]["mean"] < 1100
    assert tel[-1]["ts"].endswith("Z") and tel[-1]["v"] == 1
    h = msgs["health"][0]
    assert h["sensors"]["bme280"] == {"status": "ok", "errors": 0}, h["sensors"]
    assert h["heap_free"] > 0 and h["outbox"]["dropped"] == 0
    # power cut: the broker publishes the last will
    task.cancel()
    assert await wait(lambda: any(t.endswith("/state") and b'"lost"' in m for t, m in got), 5000)
    pacer.cancel()
    await watcher.disconnect()


async def test_river_stage_event_switches_the_node_to_event_mode():
    watcher, got = await watch("vm-watch-r", "iwaki/vm-river/#")
    p = load_profile("/boards/river-station.json")
    p["report"].update(window_s=5, health_s=60, max_silence_s=5, event_window_s=1, quiet_s=600)
    for s in p["sensors"]:
        if s["kind"] == "adxl345":
            s["options"]["window_s"] = 10
    p = check_profile(p)
    v, task, pacer = start_node(p, "vm-river", "/flash/vm2", 4)

    def events():
        return [json.loads(m) for t, m in got if t.endswith("/event")]

    # the scenario's storm raises the river past standby and caution
    assert await wait(lambda: any(e["event"] == "node.event_mode" for e in events()), 30000), events()
    ranger = [e for e in events() if e["event"] == "river.stage" and e["data"]["sensor"] == "a02yyuw"]
    assert [e["data"]["stage"] for e in ranger][:2] == ["standby", "caution"], ranger
    assert [e["severity"] for e in ranger][:2] == ["warning", "warning"]
    assert {e["data"]["sensor"] for e in events() if e["event"] == "river.stage"} == {"a02yyuw", "level-4-20ma"}
    assert v.node.event_mode
    n = len(got)
    assert await wait(lambda: sum(1 for t, m in got[n:] if t.endswith("/telemetry")) >= 2, 8000)
    fast = [json.loads(m) for t, m in got[n:] if t.endswith("/telemetry")]
    assert all(m["reason"] == "event" and m["window"]["s"] == 1 for m in fast), fast
    task.cancel()
    pacer.cancel()
    await watcher.disconnect()


async def test_a_clean_stop_says_shutdown_and_no_will_follows():
    # stop() says offline ("shutdown") and disconnects, with the goodbye's
    # PUBACK held back for longer than a loop tick; afterwards the broker
    # must not publish the will ("lost"). (tests/sim/test_virtual_node.py
    # shows the race this guards against under CPython, where it is exact.)
    watcher, got = await watch("vm-watch-s", "iwaki/vm-stop/state")
    v, task, pacer = start_node(fast_env_station(), "vm-stop", "/flash/vmstop", 4)
    assert await wait(lambda: v.node.uplink.sent >= 2, 15000)
    client = v.node.uplink.client
    real_wait_ack = client._wait_ack
    slowed = []

    async def slow_ack(pid, ev):
        slowed.append(pid)
        await asyncio.sleep_ms(500)  # the loop ticks every 200 ms meanwhile
        await real_wait_ack(pid, ev)

    client._wait_ack = slow_ack
    await v.stop()
    await asyncio.wait_for_ms(task, 5000)
    reasons = lambda: [json.loads(m)["reason"] for _, m in got]  # noqa: E731
    assert slowed and await wait(lambda: "shutdown" in reasons(), 5000), reasons()
    await asyncio.sleep_ms(1000)
    assert reasons()[-1] == "shutdown", reasons()
    pacer.cancel()
    await watcher.disconnect()
