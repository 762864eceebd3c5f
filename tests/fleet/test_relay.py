"""The relay to the city data platform: the upstream outbox, and delivery against real brokers.

The platform is played by tools/platform.py: a second real mosquitto with
a collector on it, or an NGSI-LD batch-upsert endpoint on loopback. Both
keep the history an idempotent upsert leaves, so the tests can tell lost
from duplicated.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from datetime import timedelta

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fleet.ingest import Ingest
from fleet.mosquitto import Mosquitto
from fleet.ngsi import entities
from fleet.registry import Registry, iso, utc_now
from fleet.relay import Relay, redact
from fleet.settings import Settings
from tests.fleet import payloads as P
from tools.platform import EntityStore, MqttCollector, NgsiLdServer


def fake_upstream(node_row, kind, payload, at):
    return [{"id": f"urn:ngsi-ld:Thing:iwaki:{node_row['id']}", "type": "Thing",
             "seq": {"type": "Property", "value": payload["seq"], "observedAt": payload["ts"]}}]


def ts(i: int) -> str:
    return iso(utc_now().replace(microsecond=0) - timedelta(hours=1) + timedelta(seconds=i))[:-5] + "Z"


# -- the outbox in the registry -------------------------------------------------

def test_a_stored_message_is_queued_with_it_and_a_duplicate_or_replay_queues_nothing(tmp_path):
    with Registry(tmp_path / "f.db") as r:
        assert r.ingest(P.NODE, "telemetry", P.telemetry(seq=0), upstream=fake_upstream) == "stored"
        assert r.ingest(P.NODE, "telemetry", P.telemetry(seq=0), upstream=fake_upstream) == "duplicate"
        r.ingest(P.NODE, "state", P.state(), retained=True, upstream=fake_upstream)
        rows = r.claim_upstream("w", 10, 30)
        assert [(x["node"], x["seq"], x["entity_type"]) for x in rows] == [(P.NODE, 0, "Thing")]
        assert json.loads(rows[0]["body"])["seq"]["value"] == 0


def test_a_failing_mapping_stores_nothing(tmp_path):
    def broken(*a):
        raise KeyError("mapping bug")
    with Registry(tmp_path / "f.db") as r:
        with pytest.raises(KeyError):
            r.ingest(P.NODE, "telemetry", P.telemetry(seq=0), upstream=broken)
        assert r.stats()["telemetry_stored"] == 0 and r.upstream_backlog() == 0
        assert r.ingest(P.NODE, "telemetry", P.telemetry(seq=0), upstream=fake_upstream) == "stored"


def test_leases_keep_workers_apart_and_a_dead_workers_rows_are_taken_over(tmp_path):
    with Registry(tmp_path / "f.db") as r:
        for seq in range(10):
            r.ingest(P.NODE, "telemetry", P.telemetry(seq=seq), upstream=fake_upstream)
        a = r.claim_upstream("a", 4, lease_s=30)
        b = r.claim_upstream("b", 4, lease_s=30)
        assert [x["seq"] for x in a] == [0, 1, 2, 3] and [x["seq"] for x in b] == [4, 5, 6, 7]
        assert [x["seq"] for x in r.claim_upstream("a", 4, 30)] == [0, 1, 2, 3]   # a retries its own first
        r.finish_upstream("b", [x["id"] for x in b])
        later = utc_now() + timedelta(seconds=31)                                  # a died: its lease ran out
        assert [x["seq"] for x in r.claim_upstream("c", 10, 30, now=later)] == [0, 1, 2, 3, 8, 9]
        assert r.upstream_stats()["backlog"] == 6 and r.upstream_stats()["delivered"] == 4


def test_finishing_a_batch_can_lease_the_next_in_the_same_transaction(tmp_path):
    with Registry(tmp_path / "f.db") as r:
        for seq in range(5):
            r.ingest(P.NODE, "telemetry", P.telemetry(seq=seq), upstream=fake_upstream)
        first = r.claim_upstream("a", 2, 30)
        nxt = r.finish_upstream("a", [x["id"] for x in first], claim=2, lease_s=30)
        assert [x["seq"] for x in nxt] == [2, 3]
        assert [x["seq"] for x in r.claim_upstream("b", 10, 30)] == [4]            # leased to a, not to b
        assert r.finish_upstream("a", [x["id"] for x in nxt]) == []                # no claim: nothing leased
        assert r.upstream_stats()["delivered"] == 4 and r.upstream_backlog() == 1


def test_refused_rows_leave_the_queue_but_stay_visible(tmp_path):
    with Registry(tmp_path / "f.db") as r:
        for seq in range(3):
            r.ingest(P.NODE, "telemetry", P.telemetry(seq=seq), upstream=fake_upstream)
        rows = r.claim_upstream("w", 10, 30)
        r.finish_upstream("w", [rows[0]["id"], rows[2]["id"]], {rows[1]["id"]: "bad attribute"})
        assert r.upstream_stats() == {"backlog": 0, "delivered": 2, "failed": 1, "oldest_pending": None}
        assert r.db.execute("SELECT last_error FROM upstream WHERE failed_at IS NOT NULL").fetchone()[0] == \
            "bad attribute"
        r.release_upstream("w")
        assert r.claim_upstream("w", 10, 30) == []


def test_delivered_rows_are_pruned_after_a_day_pending_ones_never(tmp_path):
    with Registry(tmp_path / "f.db") as r:
        for seq in range(2):
            r.ingest(P.NODE, "telemetry", P.telemetry(seq=seq), upstream=fake_upstream)
        rows = r.claim_upstream("w", 1, 30)
        r.finish_upstream("w", [rows[0]["id"]])
        r.prune(90, now=utc_now() + timedelta(days=2))
        assert r.upstream_stats()["delivered"] == 0 and r.upstream_backlog() == 1


def test_settings_check_the_upstream_urls_and_logs_hide_passwords():
    from fleet.settings import SettingsError
    with pytest.raises(SettingsError, match="IWAKI_UPSTREAM_HTTP"):
        Settings(upstream_http="ftp://x")
    with pytest.raises(SettingsError, match="share group"):
        Settings(share_group="a/b")
    assert redact("mqtt://relay:s3cret@h:1884/city") == "mqtt://relay:***@h:1884/city"
    with pytest.raises(ValueError, match="no platform target"):
        Relay(Settings())


# -- against real brokers ---------------------------------------------------------

NODES = ("env-0001", "env-0002", "env-0003")


class Nodes:
    """Plain paho clients publishing as nodes (telemetry with distinct timestamps)."""

    def __init__(self, port):
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="nodes")
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.sent: list[tuple[str, dict]] = []

    def births(self):
        for node in NODES:
            self.client.publish(P.topic("birth", node), P.encode(P.birth(node)), qos=1).wait_for_publish(5)

    def telemetry(self, seqs):
        for seq in seqs:
            for node in NODES:
                p = P.telemetry(node, seq=seq, ts=ts(seq))
                self.client.publish(P.topic("telemetry", node), P.encode(p), qos=1).wait_for_publish(5)
                self.sent.append((node, p))

    def raw(self, topic, body):
        self.client.publish(topic, body, qos=1).wait_for_publish(5)

    def expected(self, registry_path) -> set:
        with Registry(registry_path) as r:
            rows = {n["id"]: n for n in r.nodes()}
        out = set()
        for node, p in self.sent:
            for e in entities(rows[node], "telemetry", p, "2000-01-01T00:00:00.000Z"):
                out |= {(e["id"], k, v["observedAt"]) for k, v in e.items()
                        if isinstance(v, dict) and "observedAt" in v}
        return out

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def relaying(settings, broker, process=False):
    """Start the fleet's ingest and relay on `settings`, and paho clients publishing as nodes;
    returns (ingest, relay, nodes, stop), stop() stopping all three."""
    ingest = Ingest(settings, reconnect_delay=(0.1, 0.5)).start()
    relay = Relay(settings, retry=(0.1, 0.5), process=process).start()
    ingest.after_commit = relay.wake
    nodes = Nodes(broker.port)

    def stop():
        nodes.close()
        ingest.stop()
        relay.stop()
    return ingest, relay, nodes, stop


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_for(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def only_telemetry(store: EntityStore, nodes: Nodes, path) -> set:
    """The store's observations of the entities the telemetry maps to (Device ones come from births)."""
    ids = {k[0] for k in nodes.expected(path)}
    return {k for k in store.observations() if k[0] in ids}


def first_arrivals_in_order(store: EntityStore) -> bool:
    seen: dict[str, str] = {}
    for entity_id, observed in store.order:
        if entity_id in seen and observed < seen[entity_id]:
            return False
        seen[entity_id] = observed
    return True


@pytest.mark.broker
@pytest.mark.slow
def test_platform_broker_down_mid_stream_loses_nothing_and_duplicates_nothing(tmp_path, broker):
    platform = Mosquitto(tmp_path / "platform").start()
    store = EntityStore()
    settings = Settings(db=str(tmp_path / "f.db"), mqtt_port=broker.port, client_id="relay-under-test",
                        upstream_mqtt=f"mqtt://127.0.0.1:{platform.port}/city/iwaki")
    collector = MqttCollector(store, platform.port, prefix="city/iwaki").start()
    ingest, relay, nodes, stop = relaying(settings, broker)
    try:
        nodes.births()
        nodes.telemetry(range(0, 20))
        wait_for(lambda: relay.counts()["delivered"] >= 60, what="the first deliveries")
        platform.stop()
        nodes.telemetry(range(20, 40))
        wait_for(lambda: ingest.counts()["stored"] >= 3 + 120, what="storage while the platform is down")
        wait_for(lambda: relay.backlog() > 0, what="a backlog")
        assert relay.counts()["errors"] > 0
        platform.start()
        nodes.telemetry(range(40, 50))
        expected = nodes.expected(settings.db)
        wait_for(lambda: only_telemetry(store, nodes, settings.db) >= expected, what="every observation upstream")
        wait_for(lambda: relay.backlog() == 0, what="an empty outbox")
        assert only_telemetry(store, nodes, settings.db) == expected           # nothing lost, nothing invented
        assert collector.bad == 0
        assert first_arrivals_in_order(store)                                   # resumed in order
        with Registry(settings.db) as r:
            assert r.upstream_stats()["failed"] == 0
            assert r.stats()["duplicates"] == 0
    finally:
        stop()
        collector.stop()
        platform.stop()


@pytest.mark.broker
@pytest.mark.slow
def test_ngsi_ld_http_upserts_survive_a_platform_restart_and_refusals_are_counted(tmp_path, broker):
    store = EntityStore()
    server = NgsiLdServer(store, refuse={"Device"}).start()
    settings = Settings(db=str(tmp_path / "f.db"), mqtt_port=broker.port, client_id="relay-http",
                        upstream_http=server.url)
    ingest, relay, nodes, stop = relaying(settings, broker, process=True)   # as `fleet serve` runs it
    try:
        nodes.births()
        nodes.telemetry(range(0, 10))
        wait_for(lambda: relay.counts()["delivered"] >= 30, what="the first upserts")
        first = relay._runner.pid
        os.kill(first, signal.SIGKILL)                  # the relay process dies on its own...
        wait_for(lambda: relay.counts()["restarts"] == 1 and relay._runner.pid != first and relay.running,
                 what="the relay process to be started again")    # ...and is back, same worker
        server.stop()
        nodes.telemetry(range(10, 25))
        wait_for(lambda: relay.backlog() > 0 and relay.counts()["errors"] > 0, what="a backlog")
        server.start()                                                          # same port
        expected = nodes.expected(settings.db)
        wait_for(lambda: only_telemetry(store, nodes, settings.db) >= expected, what="every observation upstream")
        wait_for(lambda: relay.backlog() == 0, what="an empty outbox")
        assert only_telemetry(store, nodes, settings.db) == expected
        assert first_arrivals_in_order(store)
        with Registry(settings.db) as r:
            failed = r.upstream_stats()["failed"]
            types = {row[0] for row in r.db.execute("SELECT entity_type FROM upstream WHERE failed_at IS NOT NULL")}
        assert failed == relay.counts()["failed"] and failed > 0 and types == {"Device"}
        assert relay.running
    finally:
        stop()
        server.stop()
    assert not relay.running


@pytest.mark.broker
def test_bad_payloads_are_refused_and_counted_while_valid_traffic_is_relayed(tmp_path, broker):
    platform = Mosquitto(tmp_path / "platform").start()
    store = EntityStore()
    settings = Settings(db=str(tmp_path / "f.db"), mqtt_port=broker.port, client_id="relay-bad",
                        upstream_mqtt=f"mqtt://127.0.0.1:{platform.port}")
    collector = MqttCollector(store, platform.port).start()
    ingest, relay, nodes, stop = relaying(settings, broker)
    try:
        nodes.births()
        bad = [b"{not json", b"\xff\xfe", json.dumps({"v": 1}).encode(),                 # malformed, not UTF-8, schema
               P.encode(P.telemetry("env-0001", seq=999, ch={"t": {"n": 0, "min": 1, "max": 1, "mean": 1,
                                                                  "last": 1}})),
               b"{" + b" " * 20000 + b"}"]                                               # oversized
        for i in range(10):
            nodes.telemetry([i])
            nodes.raw(P.topic("telemetry", "env-0001"), bad[i % len(bad)])
        wait_for(lambda: ingest.counts()["stored"] + ingest.counts()["invalid"] >= 3 + 30 + 10, what="ingest")
        expected = nodes.expected(settings.db)
        wait_for(lambda: only_telemetry(store, nodes, settings.db) >= expected, what="the valid traffic upstream")
        assert ingest.counts()["invalid"] == 10
        with Registry(settings.db) as r:
            reasons = [row[0] for row in r.db.execute("SELECT reason FROM invalid ORDER BY id")]
            assert r.node("env-0001")["invalid"] == 10
        assert any("JSON" in x for x in reasons) and any("16384" in x or "large" in x for x in reasons)
        assert only_telemetry(store, nodes, settings.db) == expected and collector.bad == 0
    finally:
        stop()
        collector.stop()
        platform.stop()


@pytest.mark.broker
@pytest.mark.slow
def test_two_workers_share_the_load_and_one_can_be_killed_and_restarted(tmp_path, broker):
    """Worker A in this process, worker B a real `fleet serve` process killed with SIGKILL mid-stream."""
    platform = Mosquitto(tmp_path / "platform").start()
    store = EntityStore()
    up = f"mqtt://127.0.0.1:{platform.port}"
    settings = Settings(db=str(tmp_path / "f.db"), mqtt_port=broker.port, client_id="worker-a",
                        upstream_mqtt=up, share_group="relay")
    collector = MqttCollector(store, platform.port).start()
    ingest = Ingest(settings, reconnect_delay=(0.1, 0.5)).start()
    relay = Relay(settings, retry=(0.1, 0.5), lease_s=2).start()
    ingest.after_commit = relay.wake
    env = {**os.environ, "IWAKI_DB": settings.db, "IWAKI_MQTT_PORT": str(broker.port),
           "IWAKI_MQTT_CLIENT_ID": "worker-b", "IWAKI_UPSTREAM_MQTT": up, "IWAKI_SHARE_GROUP": "relay",
           "IWAKI_API_PORT": "0"}

    logs: list[str] = []

    def worker_b():
        proc = subprocess.Popen([sys.executable, "-m", "fleet", "serve"], env=env, text=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        threading.Thread(target=lambda: logs.extend(proc.stderr), daemon=True).start()
        return proc

    b = worker_b()
    nodes = Nodes(broker.port)
    try:
        wait_for(lambda: any("connected to" in line for line in logs), what="worker B to connect")
        nodes.births()
        nodes.telemetry(range(0, 30))
        relay_b = children(b.pid)                      # B relays from a child process of its own
        assert relay_b
        b.send_signal(signal.SIGKILL)
        b.wait(10)
        wait_for(lambda: not any(alive(pid) for pid in relay_b), timeout=10, what="B's relay to stop by itself")
        nodes.telemetry(range(30, 50))
        b = worker_b()
        nodes.telemetry(range(50, 60))
        expected = nodes.expected(settings.db)
        wait_for(lambda: only_telemetry(store, nodes, settings.db) >= expected, timeout=40,
                 what="every observation upstream")
        with Registry(settings.db) as r:
            assert r.stats()["telemetry_stored"] == 180 and r.stats()["gaps"] == 0
            wait_for(lambda: r.upstream_backlog() == 0, what="an empty outbox")
        assert only_telemetry(store, nodes, settings.db) == expected
        assert 0 < ingest.counts()["stored"] < 183       # A took a share, not everything
        b.terminate()
        assert b.wait(15) == 0
    finally:
        nodes.close()
        b.kill()
        ingest.stop()
        relay.stop()
        collector.stop()
        platform.stop()
    assert not any("Traceback" in line for line in logs), "".join(logs)
