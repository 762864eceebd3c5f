"""fleet/ingest.py against a real mosquitto: what nodes publish ends up in the registry."""
import logging
import sqlite3
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fleet.ingest import Ingest, IngestError
from fleet.registry import Registry, RegistryError
from fleet.settings import Settings
from tests.fleet import payloads as P
from tests.harness.broker import subscribe

pytestmark = pytest.mark.broker


def wait_for(predicate, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Publisher:
    """A plain paho client standing in for a node."""

    def __init__(self, port, client_id="test-node"):
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def send(self, kind, payload, node=P.NODE, qos=1, retain=False):
        body = payload if isinstance(payload, bytes) else P.encode(payload)
        self.client.publish(P.topic(kind, node), body, qos=qos, retain=retain).wait_for_publish(5)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def settings(tmp_path, broker):
    return Settings(db=str(tmp_path / "fleet.db"), mqtt_port=broker.port, client_id="fleet-under-test")


@pytest.fixture
def fleet(settings):
    started = []

    def start(**kw):
        ingest = Ingest(settings, reconnect_delay=(0.1, 0.5), **kw).start()
        started.append(ingest)
        return ingest

    yield start
    for ingest in started:
        ingest.stop()


@pytest.fixture
def node(broker):
    pubs = []

    def make(client_id="test-node"):
        pubs.append(Publisher(broker.port, client_id))
        return pubs[-1]

    yield make
    for p in pubs:
        p.close()


def registry(settings):
    return Registry(settings.db, create=False)


def test_birth_state_telemetry_health_event_reply_are_stored(fleet, node, settings):
    ingest = fleet()
    n = node()
    n.send("birth", P.birth(seq=0))
    n.send("state", P.state(seq=0))
    n.send("telemetry", P.telemetry(seq=0))
    n.send("health", P.health(seq=1))
    n.send("event", P.event(seq=2))
    n.send("reply", P.reply(seq=3))
    wait_for(lambda: ingest.counts()["stored"] == 6, what="6 stored")
    with registry(settings) as r:
        assert r.stats() == {"nodes": 1, "nodes_online": 1, "telemetry_stored": 1, "health_stored": 1,
                             "events_stored": 1, "replies_stored": 1, "invalid": 0, "duplicates": 0, "gaps": 0}
        row = r.node(P.NODE)
        assert (row["fw"], row["board"], row["state"], row["boot"], row["last_seq"]) == \
            ("0.1.0", "env-station", "online", 1, 3)
    assert ingest.counts()["received"] == 6 and ingest.connected


def test_the_same_telemetry_twice_is_stored_once_and_counted_as_duplicate(fleet, node, settings):
    ingest = fleet()
    n = node()
    n.send("telemetry", P.telemetry(seq=0))
    n.send("telemetry", P.telemetry(seq=0))
    n.send("telemetry", P.telemetry(seq=1))
    wait_for(lambda: ingest.counts()["received"] == 3 and ingest.wait_idle(2), what="3 handled")
    assert ingest.counts()["stored"] == 2 and ingest.counts()["duplicates"] == 1
    with registry(settings) as r:
        assert r.stats()["telemetry_stored"] == 2 and r.stats()["duplicates"] == 1
        assert r.node(P.NODE)["duplicates"] == 1


def test_invalid_payloads_are_logged_and_counted_and_valid_ones_keep_flowing(fleet, node, settings, caplog):
    caplog.set_level(logging.WARNING, logger="fleet.ingest")
    ingest = fleet()
    n = node()
    bad_ch = P.telemetry(seq=99)
    bad_ch["ch"]["temp_c"]["n"] = 0
    hostile = [
        ("telemetry", b"not json at all"),
        ("telemetry", bad_ch),
        ("health", P.health(node="env-0002")),
        ("event", b"{" + b" " * 20000 + b"}"),
        ("state", b"[1, 2, 3]"),
        ("birth", b"\xff\xfe\xfd"),
    ]
    for seq, (kind, body) in enumerate(hostile):
        n.send(kind, body)
        n.send("telemetry", P.telemetry(seq=seq))       # valid traffic in between
    wait_for(lambda: ingest.counts()["received"] == 12 and ingest.wait_idle(2), what="12 handled")
    assert ingest.counts()["invalid"] == 6 and ingest.counts()["stored"] == 6
    reasons = [r.getMessage() for r in caplog.records if r.name == "fleet.ingest" and r.levelno == logging.WARNING]
    assert len(reasons) == 6
    assert "invalid payload on iwaki/env-0001/telemetry: payload is not JSON (" in reasons[0]
    assert reasons[1].endswith("telemetry: ch.temp_c.n: 0 is less than the minimum of 1")
    assert reasons[2].endswith("health: node 'env-0002' does not match the topic's node 'env-0001'")
    assert reasons[3].endswith("payload of 20002 bytes exceeds 16384")
    with registry(settings) as r:
        s = r.stats()
        assert s["telemetry_stored"] == 6 and s["invalid"] == 6 and s["gaps"] == 0
        # the first one came before the node was known, and garbage creates no node
        assert r.node(P.NODE)["invalid"] == 5


def test_messages_on_other_topics_under_the_root_are_not_taken(fleet, node, settings, broker):
    ingest = fleet()
    n = node()
    n.client.publish(f"{P.ROOT}/{P.NODE}/cmd/ping", b'{"v": 1, "id": "x"}', qos=1).wait_for_publish(5)
    n.send("telemetry", P.telemetry())
    wait_for(lambda: ingest.counts()["stored"] == 1, what="telemetry stored")
    assert ingest.counts()["received"] == 1   # commands to nodes are not the fleet's to read


def test_the_fleet_keeps_working_after_a_broker_restart(fleet, node, settings, broker, caplog):
    caplog.set_level(logging.INFO, logger="fleet.ingest")
    ingest = fleet()
    n = node()
    n.send("telemetry", P.telemetry(seq=0))
    wait_for(lambda: ingest.counts()["stored"] == 1, what="first stored")
    n.close()
    broker.restart()
    n2 = node("test-node-2")
    n2.send("telemetry", P.telemetry(seq=1))
    n2.send("health", P.health(seq=2))
    wait_for(lambda: ingest.counts()["stored"] == 3, timeout=8, what="stored after restart")
    wait_for(lambda: ingest.connected, what="reconnected")
    assert ingest.counts()["connects"] >= 2 and ingest.counts()["disconnects"] >= 1
    assert any("lost the broker at 127.0.0.1:" in r.getMessage() for r in caplog.records)
    with registry(settings) as r:
        assert r.stats()["telemetry_stored"] == 2 and r.stats()["health_stored"] == 1


def test_qos1_messages_sent_while_the_fleet_is_stopped_arrive_when_it_returns(fleet, node, settings):
    first = fleet()
    n = node()
    n.send("telemetry", P.telemetry(seq=0))
    wait_for(lambda: first.counts()["stored"] == 1, what="first stored")
    first.stop()
    n.send("telemetry", P.telemetry(seq=1))         # nobody is listening now
    n.send("event", P.event(seq=2))
    second = fleet()                                 # same client id, same session
    wait_for(lambda: second.counts()["stored"] == 2, what="queued messages stored")
    assert second.counts()["duplicates"] == 0
    with registry(settings) as r:
        assert r.stats()["telemetry_stored"] == 2 and r.stats()["events_stored"] == 1
        assert r.stats()["gaps"] == 0


def test_a_message_that_cannot_be_stored_holds_back_only_itself(fleet, node, settings, monkeypatch, caplog):
    """Its batch is undone and stored one message at a time; the failed one is not acknowledged,
    so the broker sends it again and it is stored once the fleet can."""
    first = fleet()
    first.stop()                                     # the session exists; the burst below queues in it
    n = node()
    for seq in range(20):
        n.send("telemetry", P.telemetry(seq=seq))
    n.send("telemetry", P.telemetry(node="env-0002", seq=0), node="env-0002")
    real = Registry.ingest

    def broken(self, node_id, *args, **kwargs):
        if node_id == "env-0002":
            raise RuntimeError("a bug for this node only")
        return real(self, node_id, *args, **kwargs)

    monkeypatch.setattr(Registry, "ingest", broken)
    with caplog.at_level(logging.WARNING, logger="fleet.ingest"):
        second = fleet()
        wait_for(lambda: second.counts()["stored"] == 20 and second.counts()["errors"] == 1, timeout=15,
                 what="the burst")
    assert "one by one" in caplog.text
    with registry(settings) as r:
        assert r.stats()["telemetry_stored"] == 20 and r.node("env-0002") is None
    second.stop()
    monkeypatch.undo()
    third = fleet()                                  # the broker sends the unacknowledged one again
    wait_for(lambda: third.counts()["stored"] == 1, timeout=15, what="the held-back message")
    assert third.counts()["received"] == 1
    with registry(settings) as r:
        assert r.stats()["telemetry_stored"] == 21 and r.stats()["duplicates"] == 0


def test_when_the_registry_itself_fails_a_batch_gives_up_after_three_and_nothing_is_lost(
        fleet, node, settings, monkeypatch, caplog):
    first = fleet()
    first.stop()
    n = node()
    for seq in range(30):
        n.send("telemetry", P.telemetry(seq=seq))

    def disk_full(self, *args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Registry, "ingest", disk_full)
    with caplog.at_level(logging.WARNING, logger="fleet.ingest"):
        second = fleet()
        wait_for(lambda: second.counts()["errors"] == 30, timeout=15, what="every message refused")
    batches = caplog.text.count("storing them one by one")
    tried = caplog.text.count("could not store the message on")
    assert batches >= 1 and tried <= 3 * batches          # no traceback for each of the 30
    assert second.counts()["stored"] == 0
    second.stop()
    monkeypatch.undo()
    third = fleet()                                    # none was acknowledged: all come again
    wait_for(lambda: third.counts()["stored"] == 30, timeout=15, what="the 30 messages stored")
    with registry(settings) as r:
        assert r.stats()["telemetry_stored"] == 30 and r.stats()["duplicates"] == 0


def test_retained_birth_is_taken_at_start_without_faking_a_sign_of_life(fleet, node, settings):
    n = node()
    n.send("birth", P.birth(boot=2), retain=True)
    ingest = fleet()
    wait_for(lambda: ingest.counts()["stored"] == 1, what="retained birth stored")
    with registry(settings) as r:
        row = r.node(P.NODE)
        assert row["fw"] == "0.1.0" and row["boot"] == 2 and row["last_seen"] is None


def test_silent_nodes_are_turned_offline(tmp_path, broker, node):
    s = Settings(db=str(tmp_path / "fleet.db"), mqtt_port=broker.port, client_id="stale-test", offline_after_s=0.5)
    with Ingest(s, stale_check_s=0.1) as ingest:
        node().send("telemetry", P.telemetry())
        wait_for(lambda: ingest.counts()["stored"] == 1, what="stored")
        with registry(s) as r:
            wait_for(lambda: r.node(P.NODE)["state"] == "offline", what="offline")
            assert r.node(P.NODE)["state_reason"] == "timeout"


def test_start_fails_clearly_when_the_broker_is_unreachable(tmp_path):
    from fleet.mosquitto import free_port
    port = free_port()
    s = Settings(db=str(tmp_path / "fleet.db"), mqtt_port=port)
    with pytest.raises(IngestError, match=f"cannot reach the MQTT broker at 127.0.0.1:{port}: .*is the broker running"):
        Ingest(s).start()


def test_start_fails_clearly_when_the_registry_cannot_be_opened(tmp_path, broker):
    (tmp_path / "afile").write_text("")
    s = Settings(db=str(tmp_path / "afile" / "fleet.db"), mqtt_port=broker.port)
    ingest = Ingest(s)
    with pytest.raises(RegistryError, match="cannot open the registry"):
        ingest.start()
    ingest.stop()   # harmless after a failed start


def test_keyword_settings_override_the_given_settings(tmp_path):
    ingest = Ingest(Settings(), db_path=str(tmp_path / "x.db"), host="localhost", port=1884, root="city")
    assert (ingest.settings.db, ingest.settings.mqtt_host, ingest.settings.mqtt_port, ingest.settings.root) == \
        (str(tmp_path / "x.db"), "localhost", 1884, "city")


def test_commands_reach_the_node_topic_and_refuse_when_disconnected(settings, fleet, broker):
    got = []
    node = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="cmd-listener")
    node.on_message = lambda c, u, m: got.append((m.topic, m.payload))
    node.connect("127.0.0.1", broker.port)
    node.loop_start()
    subscribe(node, f"iwaki/{P.NODE}/cmd/#")
    try:
        ingest = fleet()
        cid = ingest.command(P.NODE, "ping", {"x": 1})
        wait_for(lambda: got, what="the command")
        import json
        assert got[0][0] == f"iwaki/{P.NODE}/cmd/ping"
        assert json.loads(got[0][1]) == {"v": 1, "id": cid, "args": {"x": 1}}
        ingest.stop()
        with pytest.raises(IngestError, match="not connected"):
            ingest.command(P.NODE, "ping")
    finally:
        node.loop_stop()
        node.disconnect()


def test_start_returns_only_once_the_broker_has_the_subscriptions(tmp_path, broker, node, monkeypatch):
    # A new session has no subscriptions until the SUBACK: a node publishing right after
    # start() must not reach an empty topic. Hold the SUBSCRIBE back to widen that window.
    import fleet.ingest as ingest_module
    real = ingest_module.Client.subscribe
    monkeypatch.setattr(ingest_module.Client, "subscribe",
                        lambda self, *a, **kw: threading.Timer(0.5, real, (self, *a), kw).start())
    s = Settings(db=str(tmp_path / "fleet.db"), mqtt_port=broker.port, client_id="suback-test")
    with Ingest(s) as ingest:
        node().send("telemetry", P.telemetry())
        wait_for(lambda: ingest.counts()["stored"] == 1, what="stored")


def test_start_fails_clearly_when_the_subscriptions_are_never_acknowledged(tmp_path, broker, monkeypatch):
    import fleet.ingest as ingest_module
    monkeypatch.setattr(ingest_module.Client, "subscribe", lambda self, *a, **kw: None)
    s = Settings(db=str(tmp_path / "fleet.db"), mqtt_port=broker.port, client_id="no-suback-test")
    ingest = Ingest(s)
    with pytest.raises(IngestError, match="did not acknowledge the subscriptions within 1 s"):
        ingest.start(timeout=1.0)
    ingest.stop()
