"""`python -m tools.bench relay`: the fleet's relay against a bare subscriber, on real brokers.

One run, on this machine, with real processes:

- a nodes' mosquitto and a platform mosquitto (loopback, their own state dirs);
- a publisher process sending telemetry (QoS 1) from `--nodes` simulated node ids as
  fast as the broker takes it, for `--seconds`;
- a bare paho subscriber that does nothing but count, on the same topics
  (`broker_raw_msgs_per_s`);
- `--workers` real `fleet serve` processes (a share group when more than one) storing
  every message in the registry and relaying its entities to the platform broker;
- a platform collector counting the distinct observations that arrive.

Rates run from the first publish to the last message the subscriber received
(raw) and to the last observation that reached the platform (relay), so the
relay's figure includes storing durably and delivering upstream. Latency is
publish to arrival at the platform. `lost` counts published messages with no
observation at the platform at the end.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

BASE = datetime(2026, 1, 1, tzinfo=timezone.utc)
ROOT = "iwaki"


def node_id(i: int) -> str:
    return f"bench-{i:04d}"


def stamp(seq: int) -> str:
    return (BASE + timedelta(seconds=seq)).strftime("%Y-%m-%dT%H:%M:%SZ")


def telemetry(node: str, seq: int) -> bytes:
    return json.dumps({"v": 1, "node": node, "boot": 1, "seq": seq, "ts": stamp(seq), "clock_set": True,
                       "up_ms": seq * 1000, "window": {"s": 60, "end_up_ms": seq * 1000}, "reason": "heartbeat",
                       "ch": {"temp_c": {"n": 60, "min": 20.0, "max": 21.0, "mean": 20.5, "last": 20.7},
                              "rh_pct": {"n": 60, "min": 40.0, "max": 42.0, "mean": 41.0, "last": 41.5}}},
                      separators=(",", ":")).encode()


def birth(node: str) -> bytes:
    return json.dumps({"v": 1, "node": node, "boot": 1, "seq": 0, "ts": stamp(0), "clock_set": True, "up_ms": 0,
                       "fw": "0.1.0", "board": "env-station", "chip": "esp32", "config_hash": "0123456789ab",
                       "reset_cause": "power_on", "boot_count": 1,
                       "channels": {"temp_c": {"sensor": "bme280"}, "rh_pct": {"sensor": "bme280"}},
                       "report": {"window_s": 60, "health_s": 300}}, separators=(",", ":")).encode()


def _client(client_id: str, clean: bool = True):
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean, protocol=mqtt.MQTTv311)
    c.max_inflight_messages_set(200)
    c.max_queued_messages_set(0)
    return c


def publisher(port: int, nodes: int, seconds: float, go, out_path: str) -> None:
    """Publish births, then telemetry round-robin over the nodes until `seconds` are up."""
    import paho.mqtt.client as mqtt
    c = _client("bench-publisher")
    c.connect("127.0.0.1", port)
    c.loop_start()
    for i in range(nodes):
        c.publish(f"{ROOT}/{node_id(i)}/birth", birth(node_id(i)), qos=1, retain=True).wait_for_publish(10)
    go.wait()
    sent: list[tuple[int, int, float]] = []
    t0 = time.time()
    end = t0 + seconds
    seq = 0
    while time.time() < end:
        for i in range(nodes):
            node = node_id(i)
            while True:
                info = c.publish(f"{ROOT}/{node}/telemetry", telemetry(node, seq), qos=1)
                if info.rc == mqtt.MQTT_ERR_SUCCESS:
                    break
                time.sleep(0.0005)   # the in-flight window is full: the broker sets the pace
            sent.append((i, seq, time.time()))
        seq += 1
    while c._out_messages:           # wait for the last PUBACKs
        time.sleep(0.01)
    c.disconnect()
    c.loop_stop()
    Path(out_path).write_text(json.dumps({"t0": t0, "sent": sent}))


def raw_subscriber(port: int, ready, done, out_path: str) -> None:
    """Count telemetry messages and do nothing else."""
    c = _client("bench-raw")
    box = {"n": 0, "last": 0.0}

    def on_message(client, userdata, message):
        box["n"] += 1
        box["last"] = time.time()

    c.on_message = on_message
    c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(f"{ROOT}/+/telemetry", qos=1)
    c.on_subscribe = lambda *a: ready.set()
    c.connect("127.0.0.1", port)
    c.loop_start()
    done.wait()
    c.loop_stop()
    Path(out_path).write_text(json.dumps(box))


#: what the collector reads of each WeatherObserved entity (the relay writes compact JSON)
_WEATHER = re.compile(rb'"id":"urn:ngsi-ld:WeatherObserved:iwaki:([^"]+)".*?"observedAt":"([^"]+)"')


def collector(port: int, ready, done, out_path: str) -> None:
    """The platform: first arrival time of each (node, seq) among the entities delivered.

    It shares the machine with the relay it measures, so it reads only the
    entity id and the first observedAt, with a regex, instead of parsing
    every entity; the seq is the observedAt's offset from BASE in seconds.
    """
    c = _client("bench-platform", clean=False)
    first: dict[str, float] = {}
    dup = {"n": 0, "unread": 0}
    seq_of: dict[bytes, int] = {}

    def on_message(client, userdata, message):
        if b'"type":"WeatherObserved"' not in message.payload:   # births give Device entities
            return
        m = _WEATHER.search(message.payload)
        if m is None:
            dup["unread"] += 1
            return
        node, observed = m.groups()
        seq = seq_of.get(observed)
        if seq is None:
            seq = seq_of[observed] = int(datetime.strptime(observed[:19].decode(), "%Y-%m-%dT%H:%M:%S")
                                         .replace(tzinfo=timezone.utc).timestamp() - BASE.timestamp())
        key = f"{node.decode()}/{seq}"
        if key in first:
            dup["n"] += 1
        else:
            first[key] = time.time()

    c.on_message = on_message
    c.on_connect = lambda cl, u, f, rc, p: cl.subscribe("bench/#", qos=1)
    c.on_subscribe = lambda *a: ready.set()
    c.connect("127.0.0.1", port)
    c.loop_start()
    done.wait()
    c.loop_stop()
    Path(out_path).write_text(json.dumps({"first": first, "redelivered": dup["n"], "unread": dup["unread"]}))


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run(seconds: float = 10.0, nodes: int = 200, workers: int = 1, drain_s: float = 120.0) -> dict:
    from fleet.mosquitto import Mosquitto
    from fleet.registry import Registry

    tmp = Path(tempfile.mkdtemp(prefix="iwaki-bench-relay-"))
    ctx = mp.get_context("spawn")
    brokers = [Mosquitto(tmp / "nodes-broker"), Mosquitto(tmp / "platform-broker")]
    for b in brokers:
        b.start()
    nodes_broker, platform = brokers
    db = tmp / "fleet.db"
    env = {**os.environ, "IWAKI_DB": str(db), "IWAKI_MQTT_PORT": str(nodes_broker.port), "IWAKI_API_PORT": "0",
           "IWAKI_UPSTREAM_MQTT": f"mqtt://127.0.0.1:{platform.port}/bench",
           "IWAKI_OFFLINE_AFTER_S": "3600"}
    if workers > 1:
        env["IWAKI_SHARE_GROUP"] = "bench"
    procs = []
    go, raw_ready, col_ready, done = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Event()
    try:
        Registry(db).close()
        fleet = [subprocess.Popen([sys.executable, "-m", "fleet", "serve", "--log-level", "INFO",
                                   "--report-every", "2"],
                                  env={**env, "IWAKI_MQTT_CLIENT_ID": f"bench-fleet-{w}"},
                                  stderr=open(tmp / f"fleet-{w}.log", "w"), stdout=subprocess.DEVNULL)
                 for w in range(workers)]
        procs.extend(fleet)
        raw = ctx.Process(target=raw_subscriber, args=(nodes_broker.port, raw_ready, done, str(tmp / "raw.json")))
        col = ctx.Process(target=collector, args=(platform.port, col_ready, done, str(tmp / "col.json")))
        pub = ctx.Process(target=publisher, args=(nodes_broker.port, nodes, seconds, go, str(tmp / "pub.json")))
        for p in (raw, col, pub):
            p.start()
            procs.append(p)
        if not (raw_ready.wait(15) and col_ready.wait(15)):
            raise RuntimeError("the subscribers did not start")
        time.sleep(2.0)                      # the fleet workers connect and subscribe
        for f in fleet:
            if f.poll() is not None:
                raise RuntimeError(f"fleet serve exited; its log is in {tmp}")
        go.set()
        pub.join(seconds + 60)
        published = json.loads((tmp / "pub.json").read_text())
        total = len(published["sent"])
        deadline = time.monotonic() + drain_s
        with Registry(db) as reg:
            while time.monotonic() < deadline:
                st = reg.stats()
                if st["telemetry_stored"] >= total and reg.upstream_backlog() == 0:
                    break
                time.sleep(0.2)
            time.sleep(1.0)
            stats, up = reg.stats(), reg.upstream_stats()
        done.set()
        raw.join(10)
        col.join(10)
        raw_box = json.loads((tmp / "raw.json").read_text())
        col_box = json.loads((tmp / "col.json").read_text())
    finally:
        done.set()
        for p in procs:
            if isinstance(p, subprocess.Popen):
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
            else:
                p.join(5)
                if p.is_alive():
                    p.kill()
        for b in brokers:
            b.stop()
    t0 = published["t0"]
    sent_at = {f"{node_id(i)}/{seq}": t for i, seq, t in published["sent"]}
    first = col_box["first"]
    delivered = sum(1 for k in sent_at if k in first)
    latencies = [(first[k] - t) * 1000 for k, t in sent_at.items() if k in first]
    raw_s = max(1e-9, raw_box["last"] - t0)
    relay_s = max(1e-9, max(first.values(), default=t0) - t0)
    raw_rate = raw_box["n"] / raw_s
    relay_rate = delivered / relay_s
    print(f"bench relay: logs and registry in {tmp}", file=sys.stderr)
    return {"seconds": seconds, "nodes": nodes, "workers": workers, "published": total,
            "broker_raw_msgs_per_s": round(raw_rate), "relay_msgs_per_s": round(relay_rate),
            "ratio": round(relay_rate / raw_rate, 3) if raw_rate else 0.0,
            "stored": stats["telemetry_stored"], "delivered_upstream": delivered, "lost": total - delivered,
            "redelivered_upstream": col_box["redelivered"], "unreadable_upstream": col_box["unread"],
            "upstream_failed": up["failed"],
            "p50_ms": round(_pct(latencies, 0.50), 1), "p99_ms": round(_pct(latencies, 0.99), 1),
            "mean_ms": round(statistics.fmean(latencies), 1) if latencies else 0.0}
