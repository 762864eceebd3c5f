"""fleet/rollouts.py: planning waves, starting, operator actions, and the engine driven against a real
registry, a real mosquitto and the real Ingest, with simulated nodes that answer the `ota` command
over MQTT as docs/ota.md says a node does (replies, reboots, births and health)."""
import hashlib
import json
import threading
import time
from datetime import timedelta

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fleet import cli
from fleet import keys as K
from fleet import releases as R
from fleet import rollouts as RO
from fleet import tokens as T
from fleet.api import create_app
from fleet.ingest import Ingest
from fleet.registry import Registry, parse_iso, utc_now
from fleet.server import ApiServer
from fleet.settings import Settings
from tests.fleet import payloads as P
from tests.harness.broker import subscribe

V = "1.2.0"
OLD = "1.0.0"


def wait_for(predicate, timeout=10.0, what="condition", tick=None):
    """Poll `predicate` (calling `tick()` first each round) until it is true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if tick is not None:
            tick()
        if predicate():
            return
        time.sleep(0.03)
    raise AssertionError(f"timed out waiting for {what}")


class SimNodes:
    """Nodes on one paho client: each publishes a birth when it comes online and answers
    `<root>/<node>/cmd/ota` by its behaviour:

    ok           downloading, verifying, staged; reboot into the new version; trial, committed
    fail         failed ("bad signature"): the running version is untouched
    rollback     ... staged; reboot (trial); reboot back to the old version with rolled_back
    quiet_commit ... staged; reboot into the new version; then only births and health (no more replies)
    quiet_back   ... staged; then a reboot back into the old version, and no more replies
    unsupported  an old firmware without the ota command: ok false, "unknown command"
    silent       nothing at all
    """

    def __init__(self, port: int):
        self.nodes: dict[str, dict] = {}
        self.commands: list[tuple[float, str, dict]] = []
        self.threads: list[threading.Thread] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="sim-nodes")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        subscribe(self.client, "iwaki/+/cmd/ota")

    def add(self, node: str, behaviour: str = "ok", fw: str = OLD, board: str = "env-station", online=True):
        self.nodes[node] = {"fw": fw, "board": board, "boot": 1, "seq": 0, "behaviour": behaviour}
        if online:
            self.come_online(node)

    def come_online(self, node: str):
        n = self.nodes[node]
        self.publish(node, "birth", P.birth(node=node, boot=n["boot"], seq=self._seq(node), fw=n["fw"],
                                            board=n["board"]))

    def commands_to(self, node: str) -> list[dict]:
        return [c for _, n, c in self.commands if n == node]

    def close(self):
        for t in self.threads:
            t.join(5)
        self.client.disconnect()
        self.client.loop_stop()

    # -- what a node does --

    def _on_message(self, client, userdata, msg):
        node = msg.topic.split("/")[1]
        cmd = json.loads(msg.payload)
        self.commands.append((time.monotonic(), node, cmd))
        self.threads.append(threading.Thread(target=self._answer, args=(node, cmd), daemon=True))
        self.threads[-1].start()

    def _answer(self, node: str, cmd: dict):
        n, args = self.nodes[node], cmd["args"]
        behaviour, version, old = n["behaviour"], args["version"], n["fw"]
        ota = lambda state, **kw: {"ota": {"state": state, "version": version, "from": old, **kw}}  # noqa: E731
        if behaviour == "silent":
            return
        if behaviour == "power_cut":  # power lost mid-download: it comes back on the old version
            n["behaviour"] = "ok"
            self.reply(node, cmd["id"], True, ota("downloading", done=20000, total=70000))
            return self.reboot(node, old)
        if behaviour == "unsupported":
            return self.reply(node, cmd["id"], False, error="unknown command 'ota'")
        if behaviour == "fail":
            return self.reply(node, cmd["id"], False, ota("failed", reason="bad signature"), "bad signature")
        self.reply(node, cmd["id"], True, ota("downloading", done=0, total=70000))
        self.reply(node, cmd["id"], True, ota("downloading", done=70000, total=70000))
        self.reply(node, cmd["id"], True, ota("verifying"))
        self.reply(node, cmd["id"], True, ota("staged"))
        if behaviour == "quiet_back":
            self.reboot(node, old, boots=2)
            return
        self.reboot(node, version)  # into the trial
        if behaviour == "quiet_commit":
            self.publish(node, "health", P.health(node=node, boot=n["boot"], seq=self._seq(node), fw=version,
                                                  up_ms=200_000))
            return
        self.reply(node, cmd["id"], True, ota("trial"))
        if behaviour == "rollback":
            self.reboot(node, old, ota={"state": "rolled_back", "version": version, "reason": "sensor bme280 failed"})
            why = "trial failed: sensor bme280 failed"
            return self.reply(node, cmd["id"], False, ota("rolled_back", reason=why), why)
        self.reply(node, cmd["id"], True, ota("committed"))
        self.publish(node, "health", P.health(node=node, boot=n["boot"], seq=self._seq(node), fw=version))

    def reboot(self, node: str, fw: str, boots: int = 1, **birth):
        n = self.nodes[node]
        n["boot"] += boots
        n["seq"] = 0
        n["fw"] = fw
        self.publish(node, "birth", P.birth(node=node, boot=n["boot"], seq=self._seq(node), fw=fw, board=n["board"],
                                            **birth))

    def reply(self, node: str, cmd_id: str, ok: bool, result: dict | None = None, error: str | None = None):
        n = self.nodes[node]
        body = {**P.envelope(node, n["boot"], self._seq(node)), "id": cmd_id, "ok": ok}
        if result is not None:
            body["result"] = result
        if error is not None:
            body["error"] = error
        self.publish(node, "reply", body)

    def publish(self, node: str, kind: str, payload: dict):
        self.client.publish(f"iwaki/{node}/{kind}", json.dumps(payload), qos=1).wait_for_publish(5)

    def _seq(self, node: str) -> int:
        n = self.nodes[node]
        n["seq"] += 1
        return n["seq"] - 1


@pytest.fixture
def fleet(tmp_path, broker):
    """Keys, release 1.2.0 for env-station, the Ingest on the broker, simulated nodes and an engine
    (`fleet.engine(**kw)` makes one with other settings)."""
    db = tmp_path / "fleet.db"
    K.create(tmp_path / "keys")
    with Registry(db) as reg:
        R.build(V, ["env-station"], None, tmp_path / "keys", tmp_path / "releases", reg, "tanaka")
    settings = Settings(db=str(db), mqtt_port=broker.port, client_id="fleet-under-test", api_port=8123)
    ingest = Ingest(settings, reconnect_delay=(0.1, 0.5)).start()
    sim = SimNodes(broker.port)

    class Fleet:
        def __init__(self):
            self.db, self.settings, self.ingest, self.sim, self.tmp = db, settings, ingest, sim, tmp_path
            self.engine = self.make_engine()

        def make_engine(self, **kw):
            return RO.Rollouts(settings, ingest, **{"base_url": "http://fleet.example:8123", **kw})

        def reg(self):
            return Registry(db)

        def nodes(self, *ids, wait=True, **kw):
            for node in ids:
                sim.add(node, **kw)
            if wait and kw.get("online", True):
                wait_for(lambda: all(self.node(n) and self.node(n)["state"] == "online" for n in ids),
                         what=f"births of {ids}")

        def node(self, node_id):
            with self.reg() as reg:
                return reg.node(node_id)

        def start(self, **kw):
            with self.reg() as reg:
                return RO.start(reg, V, actor="sato", **{"soak_s": 0, **kw})

        def detail(self, rid):
            with self.reg() as reg:
                return RO.detail(reg, rid)

        def states(self, rid):
            return {d["node"]: d["state"] for d in self.detail(rid)["deployments"]}

        def run_until(self, rid, predicate, what, engine=None, timeout=10.0):
            engine = engine or self.engine
            wait_for(lambda: predicate(self.detail(rid)), timeout, what, tick=engine.tick)

    f = Fleet()
    yield f
    sim.close()
    ingest.stop()


def history(detail, node):
    d = next(d for d in detail["deployments"] if d["node"] == node)
    return [h["state"] for h in d["history"]]


# -- planning -------------------------------------------------------------------

def test_waves_are_counts_or_cumulative_percentages_of_the_targets():
    assert RO.plan(100, ["1", "10%", "100%"]) == [1, 9, 90]
    assert RO.plan(10, ["1", "10%", "50%", "100%"]) == [1, 0, 4, 5]
    assert RO.plan(3, ["1", "10%", "100%"]) == [1, 0, 2]
    assert RO.plan(7, ["2", "2", "30%"]) == [2, 2, 0]  # 30% of 7 rounds up to 3, already reached
    assert RO.plan(5, ["1"]) == [1]  # the rest are not updated
    assert RO.plan(1000, ["0.5%", "100%"]) == [5, 995]
    for bad in ("0", "-1", "0%", "101%", "ten", "", "5 %"):
        with pytest.raises(RO.RolloutError, match="neither a node count .* nor a percentage"):
            RO.plan(10, [bad])


# -- starting -------------------------------------------------------------------

@pytest.fixture
def registry(tmp_path):
    """A registry with release 1.2.0 (env-station, min_version 1.0.0) and nodes of several kinds."""
    K.create(tmp_path / "keys")
    reg = Registry(tmp_path / "fleet.db")
    R.build(V, ["env-station"], "1.0.0", tmp_path / "keys", tmp_path / "releases", reg, "tanaka")
    for node, fw, board, online in [("env-0001", "1.0.0", "env-station", True),
                                    ("env-0002", "1.1.0", "env-station", False),
                                    ("env-0003", "1.0.5", "env-station", True),
                                    ("env-0004", V, "env-station", True),        # up to date
                                    ("env-0005", "0.9.0", "env-station", True),  # below min_version
                                    ("env-0006", "2.0.0", "env-station", True),  # newer
                                    ("riv-0001", "1.0.0", "river-station", True)]:
        reg.ingest(node, "birth", P.birth(node=node, fw=fw, board=board), retained=not online)
    yield reg
    reg.close()


def test_start_targets_the_release_boards_and_puts_online_nodes_first(registry):
    r = RO.start(registry, V, ["1", "100%"], soak_s=30, threshold=0.25, actor="sato")
    assert (r["state"], r["release"], r["soak_s"], r["failure_threshold"], r["force"], r["created_by"]) == \
        ("running", V, 30, 0.25, False, "sato")
    assert [(w["spec"], w["size"], w["started_at"]) for w in r["waves"]] == [("1", 1, None), ("100%", 2, None)]
    deps = {d["node"]: (d["wave"], d["state"], d["from_version"], d["reason"]) for d in r["deployments"]}
    assert deps == {
        "env-0001": (1, "pending", "1.0.0", None),
        "env-0003": (2, "pending", "1.0.5", None),
        "env-0002": (2, "pending", "1.1.0", None),  # offline: last
        "env-0005": (None, "skipped", "0.9.0", "runs 0.9.0, below the release's min_version 1.0.0"),
        "env-0006": (None, "skipped", "2.0.0", f"runs 2.0.0, newer than {V} (start with force to downgrade)"),
    }
    assert r["counts"] == {"pending": 3, "skipped": 2} and r["current_wave"] == 1 and r["failure_rate"] is None
    assert [h["state"] for h in r["deployments"][0]["history"]] == ["pending"]
    audit = list(registry.db.query("SELECT actor, action, target, detail FROM audit WHERE action LIKE 'rollout%'"))
    assert audit == [{"actor": "sato", "action": "rollout.start", "target": f"rollout {r['id']}",
                      "detail": f"release {V}; waves 1 (1), 100% (2); soak 30 s; threshold 0.25"}]


def test_force_includes_newer_nodes_and_nodes_can_be_named(registry):
    r = RO.start(registry, V, ["100%"], force=True, nodes=["env-0006", "env-0001"])
    assert {d["node"]: d["state"] for d in r["deployments"]} == {"env-0001": "pending", "env-0006": "pending"}
    assert r["force"] is True


def test_start_refusals(registry):
    with pytest.raises(R.ReleaseError, match="no release '9.9.9'"):
        RO.start(registry, "9.9.9")
    with pytest.raises(RO.RolloutError, match="no node 'env-0404'") as exc:
        RO.start(registry, V, nodes=["env-0404"])
    assert exc.value.code == "not_found"
    with pytest.raises(RO.RolloutError, match="node riv-0001 is a river-station; release 1.2.0 is for env-station"):
        RO.start(registry, V, nodes=["riv-0001"])
    with pytest.raises(RO.RolloutError, match="no node needs release 1.2.0") as exc:
        RO.start(registry, V, nodes=["env-0004", "env-0005"])
    assert exc.value.code == "conflict"
    with pytest.raises(RO.RolloutError, match="between 0 and 1"):
        RO.start(registry, V, threshold=1.5)
    with pytest.raises(RO.RolloutError, match="neither a node count"):
        RO.start(registry, V, waves=["1", "all"])
    first = RO.start(registry, V)
    with pytest.raises(RO.RolloutError, match=f"rollout {first['id']} \\(release 1.2.0\\) is running; abort it"):
        RO.start(registry, V)
    RO.pause(registry, first["id"], "sato")
    with pytest.raises(RO.RolloutError, match="is paused"):
        RO.start(registry, V)
    RO.abort(registry, first["id"], "sato")
    assert RO.start(registry, V)["id"] == first["id"] + 1


def test_operator_actions_check_the_state_and_are_audited(registry):
    rid = RO.start(registry, V, actor="sato")["id"]
    with pytest.raises(RO.RolloutError, match="only a paused or halted one resumes"):
        RO.resume(registry, rid, "ito")
    assert RO.pause(registry, rid, "ito", "storm tonight")["state"] == "paused"
    with pytest.raises(RO.RolloutError, match="is paused; cannot pause it"):
        RO.pause(registry, rid, "ito")
    r = RO.resume(registry, rid, "ito", threshold=0.3)
    assert (r["state"], r["failure_threshold"], r["reason"]) == ("running", 0.3, None)
    r = RO.abort(registry, rid, "ito")
    assert r["state"] == "aborted" and r["reason"] == "aborted by ito"
    assert set(r["counts"]) == {"skipped"}  # nothing was sent: every pending one is skipped
    assert history(r, "env-0001") == ["pending", "skipped"]
    with pytest.raises(RO.RolloutError, match="is aborted; cannot abort it"):
        RO.abort(registry, rid, "ito")
    with pytest.raises(RO.RolloutError, match="no rollout 99") as exc:
        RO.pause(registry, 99, "ito")
    assert exc.value.code == "not_found"
    actions = [(a["actor"], a["action"], a["detail"]) for a in registry.db.query(
        "SELECT * FROM audit WHERE action LIKE 'rollout%' ORDER BY id")]
    assert actions[1:] == [("ito", "rollout.pause", "storm tonight"), ("ito", "rollout.resume", "from paused; "
                                                                                                "threshold 0.3"),
                           ("ito", "rollout.abort", "aborted by ito")]


def test_a_command_the_broker_cannot_take_is_retried_in_the_next_round(registry, tmp_path):
    rid = RO.start(registry, V, ["1"])["id"]
    unconnected = Ingest(Settings(db=str(tmp_path / "fleet.db")))  # never started: not connected
    engine = RO.Rollouts(Settings(db=str(tmp_path / "fleet.db")), unconnected, base_url="http://fleet:8080")
    assert engine.tick() == [f"rollout {rid}: wave 1 (1, 1 nodes) started"]
    d = RO.detail(registry, rid)["deployments"][0]
    assert d["state"] == "pending"
    assert [h["state"] for h in d["history"]] == ["pending", "sent", "pending"]
    assert d["history"][-1]["detail"].startswith("not sent (cannot send 'ota' to env-0001: not connected")


def test_nodes_are_sent_the_fleet_url_they_can_reach():
    assert RO.ota_url(Settings(node_fleet_url="http://fleet.iwaki.local:8080/")) == "http://fleet.iwaki.local:8080"
    assert RO.ota_url(Settings(api_host="10.0.0.5", api_port=9000)) == "http://10.0.0.5:9000"
    assert RO.ota_url(Settings(api_host="0.0.0.0")).endswith(":8080")
    assert "0.0.0.0" not in RO.ota_url(Settings(api_host="0.0.0.0"))


# -- the engine against a real broker ---------------------------------------------

@pytest.mark.broker
def test_waves_advance_one_after_another_and_every_node_commits(fleet):
    fleet.nodes("env-0001", "env-0002", "env-0003", "env-0004")
    fleet.nodes("riv-0001", board="river-station")
    r = fleet.start(waves=["1", "50%", "100%"])
    assert [w["size"] for w in r["waves"]] == [1, 1, 2]
    fleet.run_until(r["id"], lambda d: d["state"] == "done", "the rollout to finish")
    d = fleet.detail(r["id"])
    assert fleet.states(r["id"]) == dict.fromkeys(["env-0001", "env-0002", "env-0003", "env-0004"], "committed")
    assert history(d, "env-0003") == ["pending", "sent", "downloading", "verifying", "staged", "trial", "committed"]
    assert d["counts"] == {"committed": 4} and d["failure_rate"] == 0 and d["reason"] == "every wave finished"
    assert all(w["started_at"] <= w["finished_at"] for w in d["waves"])
    assert d["waves"][0]["finished_at"] <= d["waves"][1]["started_at"] <= d["waves"][1]["finished_at"] <= \
        d["waves"][2]["started_at"]
    # the command, as docs/ota.md says; one per node, the next wave only after the previous one
    cmd = fleet.sim.commands_to("env-0001")
    dep = next(x for x in d["deployments"] if x["node"] == "env-0001")
    assert cmd == [{"v": 1, "id": f"{dep['id']}-1", "args": {
        "url": f"http://fleet.example:8123/ota/releases/{V}/", "version": V, "kind": "bundle", "force": False}}]
    order = [n for _, n, _ in fleet.sim.commands]
    assert order[:2] == ["env-0001", "env-0002"] and sorted(order[2:]) == ["env-0003", "env-0004"]
    assert "riv-0001" not in order
    assert fleet.node("env-0004")["fw"] == V
    with fleet.reg() as reg:
        actions = [(a["actor"], a["action"]) for a in reg.db.query("SELECT * FROM audit WHERE action LIKE 'rollout%'")]
    assert actions == [("sato", "rollout.start"), ("fleet", "rollout.done")]


@pytest.mark.broker
def test_the_engine_thread_runs_rounds_by_itself_as_fleet_serve_starts_it(fleet):
    fleet.nodes("env-0001", "env-0002")
    rid = fleet.start(waves=["1", "100%"])["id"]
    engine = fleet.make_engine().start(every_s=0.05)
    try:
        wait_for(lambda: fleet.detail(rid)["state"] == "done", what="the rollout, driven by the thread")
    finally:
        engine.stop()
    assert fleet.states(rid) == {"env-0001": "committed", "env-0002": "committed"}


@pytest.mark.broker
def test_the_next_wave_waits_for_the_soak_time(fleet):
    fleet.nodes("env-0001", "env-0002")
    rid = fleet.start(waves=["1", "100%"], soak_s=60)["id"]
    fleet.run_until(rid, lambda d: d["waves"][0]["finished_at"], "the canary wave to finish")
    finished = parse_iso(fleet.detail(rid)["waves"][0]["finished_at"])
    for _ in range(3):
        fleet.engine.tick()
    assert fleet.states(rid)["env-0002"] == "pending" and fleet.sim.commands_to("env-0002") == []
    fleet.engine.tick(now=finished + timedelta(seconds=59))
    assert fleet.states(rid)["env-0002"] == "pending"
    fleet.engine.tick(now=finished + timedelta(seconds=61))
    assert fleet.states(rid)["env-0002"] == "sent"
    fleet.run_until(rid, lambda d: d["state"] == "done", "the rollout to finish")


@pytest.mark.broker
def test_a_failed_canary_halts_the_rollout_until_an_operator_accepts_it(fleet):
    fleet.nodes("env-0001", behaviour="fail")
    fleet.nodes("env-0002", "env-0003")
    rid = fleet.start(waves=["1", "100%"])["id"]
    fleet.run_until(rid, lambda d: d["state"] == "halted", "the halt")
    d = fleet.detail(rid)
    assert d["reason"] == "1 of 1 finished updates failed (100%, threshold 0.2)"
    dep = next(x for x in d["deployments"] if x["node"] == "env-0001")
    assert (dep["state"], dep["reason"]) == ("failed", "bad signature")
    assert fleet.node("env-0001")["fw"] == OLD
    for _ in range(3):
        fleet.engine.tick()
    assert fleet.states(rid) == {"env-0001": "failed", "env-0002": "pending", "env-0003": "pending"}
    with fleet.reg() as reg:
        with pytest.raises(RO.RolloutError, match=r"1 failed of 1 finished updates \(100%\), above the threshold"):
            RO.resume(reg, rid, "sato")
        RO.resume(reg, rid, "sato", threshold=1.0)
        assert ("fleet", "rollout.halt") in [(a["actor"], a["action"]) for a in reg.db.query("SELECT * FROM audit")]
    fleet.run_until(rid, lambda d: d["state"] == "done", "the rest of the rollout")
    assert fleet.states(rid) == {"env-0001": "failed", "env-0002": "committed", "env-0003": "committed"}


@pytest.mark.broker
def test_failures_over_the_threshold_halt_a_wave_under_way(fleet):
    fleet.nodes("env-0001")
    fleet.nodes("env-0002", "env-0003", "env-0004", behaviour="rollback")
    fleet.nodes("env-0005", "env-0006")
    rid = fleet.start(waves=["1", "100%"], threshold=0.4)["id"]
    engine = fleet.make_engine(min_sample=4)
    fleet.run_until(rid, lambda d: d["state"] == "halted", "the halt", engine=engine)
    d = fleet.detail(rid)
    failed = [x for x in d["deployments"] if x["state"] == "rolled_back"]
    assert len(failed) >= 2 and d["failure_rate"] > 0.4
    assert failed[0]["reason"] == "trial failed: sensor bme280 failed"
    assert history(d, failed[0]["node"])[-3:] == ["staged", "trial", "rolled_back"]
    assert fleet.node(failed[0]["node"])["fw"] == OLD


@pytest.mark.broker
def test_pause_stops_new_commands_and_abort_skips_the_rest(fleet):
    fleet.nodes("env-0001", "env-0002", "env-0003")
    rid = fleet.start(waves=["1", "100%"])["id"]
    with fleet.reg() as reg:
        RO.pause(reg, rid, "sato", "checking the canary by hand")
    for _ in range(3):
        fleet.engine.tick()
    assert fleet.sim.commands == [] and set(fleet.states(rid).values()) == {"pending"}
    with fleet.reg() as reg:
        RO.resume(reg, rid, "sato")
    fleet.run_until(rid, lambda d: d["waves"][0]["finished_at"], "the canary")
    fleet.sim.nodes["env-0002"]["behaviour"] = "silent"  # its update stays under way
    fleet.run_until(rid, lambda d: d["counts"].get("sent"), "wave 2 to be sent")
    with fleet.reg() as reg:
        RO.pause(reg, rid, "sato")
    fleet.run_until(rid, lambda d: d["counts"].get("committed") == 2, "env-0003 to finish while paused")
    with fleet.reg() as reg:
        r = RO.abort(reg, rid, "sato", "wrong release")
    assert (r["state"], r["reason"]) == ("aborted", "wrong release")
    assert fleet.states(rid) == {"env-0001": "committed", "env-0002": "sent", "env-0003": "committed"}
    fleet.engine.tick(now=utc_now() + timedelta(hours=1))  # what was sent is still watched, and times out
    assert fleet.states(rid)["env-0002"] == "timed_out"


@pytest.mark.broker
def test_a_silent_node_times_out_and_counts_as_a_failure(fleet):
    fleet.nodes("env-0001", behaviour="silent")
    fleet.nodes("env-0002")
    rid = fleet.start(waves=["1", "100%"])["id"]
    engine = fleet.make_engine(step_timeout_s=600)
    fleet.run_until(rid, lambda d: d["counts"].get("sent") == 1, "the command", engine=engine)
    sent = parse_iso(fleet.detail(rid)["deployments"][0]["updated_at"])
    engine.tick(now=sent + timedelta(seconds=599))
    assert fleet.states(rid)["env-0001"] == "sent"
    engine.tick(now=sent + timedelta(seconds=601))
    d = fleet.detail(rid)
    dep = d["deployments"][0]
    assert dep["state"] == "timed_out" and dep["reason"] == "no word about the update for 600 s (last state sent)"
    assert d["state"] == "halted"


@pytest.mark.broker
def test_an_offline_node_gets_the_update_when_it_comes_back(fleet):
    fleet.nodes("env-0001")
    fleet.nodes("env-0002", "env-0003", online=False)
    with fleet.reg() as reg:  # known to the registry (a retained birth), but not online
        for n in ("env-0002", "env-0003"):
            reg.ingest(n, "birth", P.birth(node=n, fw=OLD), retained=True)
    rid = fleet.start(waves=["100%"])["id"]
    fleet.run_until(rid, lambda d: d["counts"].get("committed") == 1, "the online node")
    for _ in range(3):
        fleet.engine.tick()
    assert fleet.states(rid) == {"env-0001": "committed", "env-0002": "pending", "env-0003": "pending"}
    fleet.sim.come_online("env-0002")
    fleet.run_until(rid, lambda d: d["counts"].get("committed") == 2, "the node that came back")
    started = parse_iso(fleet.detail(rid)["waves"][0]["started_at"])
    engine = fleet.make_engine(offline_wait_s=1800)
    engine.tick(now=started + timedelta(seconds=1801))
    d = fleet.detail(rid)
    dep = next(x for x in d["deployments"] if x["node"] == "env-0003")
    assert dep["state"] == "skipped" and dep["reason"] == "offline for 1800 s after its wave started"
    assert d["state"] == "done" and d["failure_rate"] == 0


@pytest.mark.broker
def test_without_replies_the_node_reports_decide(fleet):
    fleet.nodes("env-0001", behaviour="quiet_commit")
    fleet.nodes("env-0002", behaviour="quiet_back")
    fleet.nodes("env-0003", behaviour="unsupported")
    rid = fleet.start(waves=["100%"], threshold=1.0)["id"]
    fleet.run_until(rid, lambda d: d["state"] == "done", "every node to finish")
    d = fleet.detail(rid)
    by_node = {x["node"]: x for x in d["deployments"]}
    assert history(d, "env-0001")[-2:] == ["trial", "committed"]
    assert by_node["env-0001"]["history"][-1]["detail"] == f"the node still runs {V} after its trial period"
    assert (by_node["env-0002"]["state"], by_node["env-0002"]["reason"]) == \
        ("rolled_back", f"the node restarted running {OLD}, not {V}")
    assert (by_node["env-0003"]["state"], by_node["env-0003"]["reason"]) == ("failed", "unknown command 'ota'")


@pytest.mark.broker
def test_a_node_can_fetch_and_check_the_release_from_the_command_url(fleet):
    """The command's url, joined with manifest.json, manifest.sig and files/<path>, serves the signed
    release (over real HTTP, with Range as a node resumes)."""
    server = ApiServer(create_app(fleet.settings, dashboard=None)).start()
    try:
        fleet.nodes("env-0001", behaviour="silent")
        rid = fleet.start(waves=["1"])["id"]
        engine = fleet.make_engine(base_url=server.url)
        fleet.run_until(rid, lambda d: d["counts"].get("sent"), "the command", engine=engine)
        # "sent" is the broker's PUBACK; the node gets the command a moment later
        wait_for(lambda: fleet.sim.commands_to("env-0001"), what="the command at the node")
        url = fleet.sim.commands_to("env-0001")[0]["args"]["url"]
        with httpx.Client() as http:
            data = http.get(url + "manifest.json").content
            sig = bytes.fromhex(http.get(url + "manifest.sig").text.strip())
            manifest = json.loads(data)
            public = K.public_keys(fleet.tmp / "keys")[manifest["key_id"]]
            assert K.verify_signature(public, sig, data)
            f = manifest["files"][-1]
            first = http.get(url + "files/" + f["path"], headers={"Range": "bytes=0-99"}).content
            rest = http.get(url + "files/" + f["path"], headers={"Range": "bytes=100-"}).content
        assert hashlib.sha256(first + rest).hexdigest() == f["sha256"]
    finally:
        server.stop()


# -- the API --------------------------------------------------------------------

def test_the_rollouts_api(registry, tmp_path):
    tokens = {role: T.issue(registry, role, role) for role in ("operator", "viewer")}
    server = ApiServer(create_app(Settings(db=str(tmp_path / "fleet.db")), dashboard=None)).start()
    auth = lambda role: {"Authorization": f"Bearer {tokens[role]}"}  # noqa: E731
    try:
        with httpx.Client(base_url=server.url) as http:
            body = {"release": V, "waves": ["1", "100%"], "soak_s": 5, "threshold": 0.5}
            assert http.post("/api/v1/rollouts", json=body, headers=auth("viewer")).status_code == 403
            res = http.post("/api/v1/rollouts", json=body, headers=auth("operator"))
            assert res.status_code == 201, res.text
            rid = res.json()["id"]
            assert res.json()["created_by"] == "operator" and len(res.json()["deployments"]) == 5
            res = http.post("/api/v1/rollouts", json=body, headers=auth("operator"))
            assert res.status_code == 409 and "is running" in res.json()["detail"]
            res = http.post("/api/v1/rollouts", json=body | {"release": "8.8.8"}, headers=auth("operator"))
            assert res.status_code == 404
            res = http.post("/api/v1/rollouts", json=body | {"threshold": 2}, headers=auth("operator"))
            assert res.status_code == 422 and res.json()["fields"][0]["field"] == "threshold"
            res = http.post("/api/v1/rollouts", json=body | {"waves": ["1", "all"]}, headers=auth("operator"))
            assert res.status_code == 422 and res.json()["fields"][0]["field"] == "waves"
            page = http.get("/api/v1/rollouts", headers=auth("viewer")).json()
            assert page["total"] == 1 and page["items"][0]["counts"] == {"pending": 3, "skipped": 2}
            assert "deployments" not in page["items"][0]
            assert http.get("/api/v1/rollouts?state=done", headers=auth("viewer")).json()["total"] == 0
            one = http.get(f"/api/v1/rollouts/{rid}", headers=auth("viewer")).json()
            assert one["deployments"][0]["history"][0]["state"] == "pending"
            assert http.get("/api/v1/rollouts/77", headers=auth("viewer")).status_code == 404
            res = http.post(f"/api/v1/rollouts/{rid}/pause", json={"reason": "lunch"}, headers=auth("operator"))
            assert res.json()["state"] == "paused" and res.json()["reason"] == "lunch"
            assert http.post(f"/api/v1/rollouts/{rid}/pause", headers=auth("operator")).status_code == 409
            assert http.post(f"/api/v1/rollouts/{rid}/resume", headers=auth("viewer")).status_code == 403
            res = http.post(f"/api/v1/rollouts/{rid}/resume", json={"threshold": 0.1}, headers=auth("operator"))
            assert res.json()["state"] == "running" and res.json()["failure_threshold"] == 0.1
            res = http.post(f"/api/v1/rollouts/{rid}/abort", headers=auth("operator"))
            assert res.json()["state"] == "aborted" and res.json()["counts"] == {"skipped": 5}
            assert http.post(f"/api/v1/rollouts/{rid}/abort", headers=auth("operator")).status_code == 409
    finally:
        server.stop()


# -- `fleet rollout` --------------------------------------------------------------

def test_cli_start_list_show_pause_resume_abort(registry, tmp_path, capsys):
    db = ["--db", str(tmp_path / "fleet.db"), "--actor", "kato"]
    assert cli.main(["rollout", "start", *db]) == 2
    assert "needs --release" in capsys.readouterr().err
    assert cli.main(["rollout", "start", "--release", V, "--wave", "1", "--wave", "100%", "--soak", "30",
                     "--threshold", "0.1", *db]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"rollout 1: release {V}, running; wave 1 of 2; 3 pending, 2 skipped")
    assert cli.main(["rollout", "start", "--release", V, *db]) == 1
    assert "fleet: rollout 1 (release 1.2.0) is running" in capsys.readouterr().err
    assert cli.main(["rollout", "list", *db]) == 0
    assert capsys.readouterr().out.split()[:4] == ["1", V, "running", "wave"]
    assert cli.main(["rollout", "show", "1", *db]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:4] == ["wave", "1", "env-0001", "pending"]
    assert cli.main(["rollout", "pause", *db]) == 2
    assert cli.main(["rollout", "pause", "1", "--reason", "inspection", *db]) == 0
    assert "paused (inspection)" in capsys.readouterr().out
    assert cli.main(["rollout", "resume", "1", *db]) == 0
    capsys.readouterr()
    assert cli.main(["rollout", "abort", "1", "--json", *db]) == 0
    assert json.loads(capsys.readouterr().out)["counts"] == {"skipped": 5}
    with Registry(tmp_path / "fleet.db") as reg:
        assert RO.detail(reg, 1)["state"] == "aborted"
        assert [a["actor"] for a in reg.db.query("SELECT actor FROM audit WHERE action LIKE 'rollout%'")] == \
            ["kato"] * 4


@pytest.mark.broker
def test_a_node_that_loses_power_mid_download_is_asked_again_and_commits(fleet):
    fleet.nodes("env-0001", behaviour="power_cut")
    rid = fleet.start(waves=["100%"])["id"]
    fleet.run_until(rid, lambda d: d["counts"].get("committed") == 1, "the second attempt to commit")
    cmds = fleet.sim.commands_to("env-0001")
    dep = fleet.detail(rid)["deployments"][0]
    assert [c["id"] for c in cmds] == [f"{dep['id']}-1", f"{dep['id']}-2"] and dep["attempt"] == 2
    assert history(fleet.detail(rid), "env-0001")[:5] == ["pending", "sent", "downloading", "pending", "sent"]
