"""At scale: `fleet demo` with 200 virtual nodes (the real firmware under CPython, each on
its own account behind the ACL), the fleet storing and relaying everything they say.

What must hold, node by node, once the demo has stopped: every node was heard and said
offline when it stopped, its messages arrived exactly once with no hole in its sequence
numbers, every NGSI-LD entity reached the platform, and the API lists every node once
across its pages.
"""
import json
import subprocess
import sys
from collections import defaultdict

import pytest

from fleet import tokens
from fleet.api import create_app
from fleet.registry import Registry
from fleet.settings import Settings
from tests.fleet.test_api import Client, ok

NODES = 200
SECONDS = 35
WINDOW_S = 10


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    state = tmp_path_factory.mktemp("scale")
    proc = subprocess.run([sys.executable, "-m", "fleet", "demo", "--nodes", str(NODES), "--seconds", str(SECONDS),
                           "--window-s", str(WINDOW_S), "--state", str(state), "--api-port", "0"],
                          capture_output=True, text=True, timeout=SECONDS + 240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "crashed" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), state / "fleet.db"


@pytest.mark.broker
def test_every_node_is_heard_and_every_message_is_stored_once(demo):
    summary, db = demo
    assert (summary["nodes"], summary["nodes_online"]) == (NODES, NODES), summary
    assert (summary["invalid"], summary["duplicates"]) == (0, 0), summary
    # the virtual nodes kept pace with real time: the demo stopped when it was told to
    assert summary["seconds"] < SECONDS + 30, summary
    with Registry(str(db), create=False) as reg:
        nodes = reg.nodes()
        assert len(nodes) == NODES
        # stopped cleanly: each node said so itself (its state message), none timed out
        assert {(n["state"], n["state_reason"]) for n in nodes} == {("offline", "shutdown")}, \
            {(n["id"], n["state"], n["state_reason"]) for n in nodes if n["state_reason"] != "shutdown"}
        assert reg.gaps() == [] and reg.stats()["gaps"] == 0
        # independently of the gap bookkeeping: each boot's sequence numbers are contiguous
        seqs = defaultdict(list)
        telemetry = defaultdict(int)
        for row in reg.db.query("SELECT node, boot, seq, kind FROM seen"):
            seqs[row["node"], row["boot"]].append(row["seq"])
            telemetry[row["node"]] += row["kind"] == "telemetry"
        holes = {k: (min(v), max(v), len(v)) for k, v in seqs.items() if max(v) - min(v) + 1 != len(v)}
        assert holes == {}
        assert {n["id"] for n in nodes} == {node for node, _ in seqs}
        few = {n: c for n, c in telemetry.items() if c < (SECONDS - 10) // WINDOW_S}
        assert few == {}, f"nodes with fewer than {(SECONDS - 10) // WINDOW_S} telemetry messages: {few}"


@pytest.mark.broker
def test_every_entity_reaches_the_platform(demo):
    summary, db = demo
    with Registry(str(db), create=False) as reg:
        up = reg.upstream_stats()
        total, entities = reg.db.execute("SELECT count(*), count(DISTINCT entity_id) FROM upstream").fetchone()
    assert (up["backlog"], up["failed"]) == (0, 0) and up["delivered"] == total, up
    assert summary["delivered_upstream"] <= total
    # the platform stand-in holds each entity once (idempotent ids), every one of them
    assert summary["platform_entities"] == entities, (summary, entities)
    assert entities > NODES  # a device entity per node and its sensors' entities


@pytest.mark.broker
def test_the_api_lists_every_node_once_across_its_pages(demo):
    _, db = demo
    with Registry(str(db), create=False) as reg:
        token = tokens.issue(reg, "scale-viewer", "viewer", "test")
    client = Client(create_app(Settings(db=str(db)), dashboard=None))
    seen, offset, pages = [], 0, 0
    while offset is not None:
        page = ok(client.get(f"/api/v1/nodes?limit=64&offset={offset}", token))
        assert page["total"] == NODES
        seen += [n["id"] for n in page["items"]]
        offset, pages = page["next_offset"], pages + 1
    assert pages == 4 and len(seen) == NODES and len(set(seen)) == NODES
    summary = ok(client.get("/api/v1/summary", token))
    assert (summary["nodes"], summary["offline"], summary["gaps"], summary["invalid"]) == (NODES, NODES, 0, 0)
    assert summary["relay"]["backlog"] == 0 and summary["relay"]["failed"] == 0, summary
