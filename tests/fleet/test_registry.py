"""fleet/registry.py: migrations, WAL, de-duplication, gaps, node state, stats."""
import sqlite3
from datetime import datetime, timedelta, timezone

import pytest

from fleet.registry import MIGRATIONS, Registry, RegistryError, iso, parse_iso
from tests.fleet import payloads as P

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@pytest.fixture
def reg(tmp_path):
    r = Registry(tmp_path / "fleet.db")
    yield r
    r.close()


def rows(reg, sql, *args):
    return list(reg.db.query(sql, list(args)))


def gaps(reg, node=P.NODE):
    return [(g["boot"], g["from_seq"], g["to_seq"]) for g in reg.gaps(node)]


# -- opening, migrations, WAL --

def test_new_registry_records_its_migrations_and_reopening_changes_nothing(tmp_path):
    path = tmp_path / "sub" / "dir" / "fleet.db"   # parents are created
    with Registry(path) as r:
        first = rows(r, "SELECT version, name FROM migrations")
        assert first == [{"version": 1, "name": "_m001_initial"}, {"version": 2, "name": "_m002_credentials"},
                         {"version": 3, "name": "_m003_alerts"},
                         {"version": 4, "name": "_m004_relay_and_api"}, {"version": 5, "name": "_m005_ota"}]
        assert {"nodes", "telemetry", "health", "events", "replies", "seen", "gaps", "invalid"} <= \
            set(r.db.table_names())
        r.ingest(P.NODE, "birth", P.birth(), at(0))
    with Registry(path) as r:
        assert rows(r, "SELECT version, name FROM migrations") == first
        assert r.version == len(MIGRATIONS)
        assert [n["id"] for n in r.nodes()] == [P.NODE]


def test_wal_mode_is_on(tmp_path):
    Registry(tmp_path / "fleet.db").close()
    conn = sqlite3.connect(tmp_path / "fleet.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_an_older_database_is_upgraded_in_place(tmp_path):
    path = tmp_path / "fleet.db"
    with Registry(path) as r:
        r.ingest(P.NODE, "telemetry", P.telemetry(), at(0))

    def _m_next_node_site(db):
        db["nodes"].add_column("site", str)

    n = len(MIGRATIONS)
    with Registry(path, migrations=MIGRATIONS + [_m_next_node_site]) as r:
        assert [m["version"] for m in rows(r, "SELECT version FROM migrations ORDER BY version")] == \
            list(range(1, n + 2))
        node = r.node(P.NODE)
        assert "site" in node and node["site"] is None
        assert r.stats()["telemetry_stored"] == 1          # data kept, not recreated
    with Registry(path, migrations=MIGRATIONS + [_m_next_node_site]) as r:
        assert r.version == n + 1                          # applied once only


def test_a_failing_migration_leaves_no_trace(tmp_path):
    path = tmp_path / "fleet.db"
    Registry(path).close()

    def _m002_broken(db):
        db["half"].create({"id": int}, pk="id")
        raise sqlite3.OperationalError("boom")

    with pytest.raises(RegistryError, match="boom"):
        Registry(path, migrations=MIGRATIONS + [_m002_broken])
    with Registry(path) as r:
        assert r.version == len(MIGRATIONS)
        assert "half" not in r.db.table_names()


def test_a_database_newer_than_the_code_is_refused(tmp_path):
    path = tmp_path / "fleet.db"
    Registry(path, migrations=MIGRATIONS + [lambda db: None]).close()
    with pytest.raises(RegistryError, match=f"schema version {len(MIGRATIONS) + 1}, newer than this fleet"):
        Registry(path)


def test_unusable_paths_raise_registry_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RegistryError, match="cannot open the registry at"):
        Registry(tmp_path / "afile" / "fleet.db")
    (tmp_path / "junk.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(RegistryError, match="file is not a database"):
        Registry(tmp_path / "junk.db")
    with pytest.raises(RegistryError, match="no registry at"):
        Registry(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()


# -- storing --

def test_telemetry_is_stored_one_row_per_channel(reg):
    assert reg.ingest(P.NODE, "telemetry", P.telemetry(seq=0), at(1)) == "stored"
    got = rows(reg, "SELECT node, boot, seq, ts, received_at, clock_set, channel, n, min, max, mean, last, sum "
                    "FROM telemetry ORDER BY channel")
    assert got == [
        {"node": P.NODE, "boot": 1, "seq": 0, "ts": P.TS, "received_at": "2024-05-01T12:00:01.000Z",
         "clock_set": 1, "channel": "rh_pct", "n": 60, "min": 40.0, "max": 42.5, "mean": 41.2, "last": 41.0,
         "sum": None},
        {"node": P.NODE, "boot": 1, "seq": 0, "ts": P.TS, "received_at": "2024-05-01T12:00:01.000Z",
         "clock_set": 1, "channel": "temp_c", "n": 60, "min": 21.5, "max": 21.93, "mean": 21.71, "last": 21.8,
         "sum": None},
    ]
    node = reg.node(P.NODE)
    assert (node["state"], node["state_reason"], node["boot"], node["last_seq"]) == ("online", "heard", 1, 0)
    assert node["first_seen"] == node["last_seen"] == "2024-05-01T12:00:01.000Z"


def test_health_event_and_reply_are_stored(reg):
    reg.ingest(P.NODE, "health", P.health(seq=0), at(1))
    reg.ingest(P.NODE, "event", P.event(seq=1), at(2))
    reg.ingest(P.NODE, "reply", P.reply(seq=2), at(3))
    h = rows(reg, "SELECT heap_free, lag_max_ms, overruns, outbox_depth, outbox_dropped, rssi, vbat_mv FROM health")
    assert h == [{"heap_free": 81234, "lag_max_ms": 7, "overruns": 0, "outbox_depth": 2, "outbox_dropped": 0,
                  "rssi": -61, "vbat_mv": None}]
    e = rows(reg, "SELECT seq, event, severity, data FROM events")
    assert e == [{"seq": 1, "event": "sensor.failed", "severity": "warning",
                  "data": '{"sensor":"scd4x","reason":"no answer"}'}]
    assert rows(reg, "SELECT cmd_id, ok, result FROM replies") == [{"cmd_id": "cmd-1", "ok": 1,
                                                                    "result": '{"up_ms": 1234}'}]
    assert reg.node(P.NODE)["fw"] == "0.1.0"   # health carries identity too


def test_birth_sets_identity_and_state_sets_online_offline(reg):
    reg.ingest(P.NODE, "birth", P.birth(boot=3, seq=7, reset_cause="watchdog"), at(0))
    reg.ingest(P.NODE, "state", P.state(boot=3, seq=7), at(0))
    n = reg.node(P.NODE)
    assert {k: n[k] for k in ("fw", "board", "chip", "config_hash", "boot", "boot_count", "reset_cause",
                              "state", "state_reason", "last_seq")} == {
        "fw": "0.1.0", "board": "env-station", "chip": "esp32", "config_hash": "0123456789ab", "boot": 3,
        "boot_count": 3, "reset_cause": "watchdog", "state": "online", "state_reason": "connected",
        "last_seq": None}   # birth's seq is a position marker, not a message number
    reg.ingest(P.NODE, "state", P.state(boot=3, seq=9, value="offline", reason="lost"), at(5))
    n = reg.node(P.NODE)
    assert (n["state"], n["state_reason"]) == ("offline", "lost")
    assert reg.stats()["telemetry_stored"] == 0 and rows(reg, "SELECT * FROM seen") == []


def test_a_late_will_from_an_older_boot_does_not_override_the_new_boot(reg):
    reg.ingest(P.NODE, "state", P.state(boot=4), at(0))
    reg.ingest(P.NODE, "state", P.state(boot=3, value="offline", reason="lost"), at(1))
    n = reg.node(P.NODE)
    assert (n["boot"], n["state"]) == (4, "online")


def test_retained_birth_updates_identity_but_is_no_sign_of_life(reg):
    reg.ingest(P.NODE, "birth", P.birth(), at(0), retained=True)
    n = reg.node(P.NODE)
    assert n["fw"] == "0.1.0" and n["state"] == "unknown" and n["last_seen"] is None
    assert n["first_seen"] == iso(at(0))


def test_a_message_after_a_timeout_brings_the_node_back_online(reg):
    reg.ingest(P.NODE, "telemetry", P.telemetry(seq=0), at(0))
    assert reg.mark_stale(60, now=at(61)) == [P.NODE]
    reg.ingest(P.NODE, "telemetry", P.telemetry(seq=1), at(70))
    assert (reg.node(P.NODE)["state"], reg.node(P.NODE)["state_reason"]) == ("online", "heard")


# -- de-duplication --

def test_same_message_twice_is_stored_once_and_counted(reg):
    assert reg.ingest(P.NODE, "telemetry", P.telemetry(seq=5), at(0)) == "stored"
    assert reg.ingest(P.NODE, "telemetry", P.telemetry(seq=5), at(1)) == "duplicate"
    assert reg.ingest(P.NODE, "event", P.event(seq=5), at(2)) == "duplicate"   # one counter for all kinds
    assert rows(reg, "SELECT count(*) AS c FROM telemetry")[0]["c"] == 2         # 2 channels, 1 message
    assert rows(reg, "SELECT count(*) AS c FROM events")[0]["c"] == 0
    assert reg.node(P.NODE)["duplicates"] == 2
    # same seq in another boot or from another node is a different message
    assert reg.ingest(P.NODE, "telemetry", P.telemetry(boot=2, seq=5), at(3)) == "stored"
    assert reg.ingest("env-0002", "telemetry", P.telemetry(node="env-0002", seq=5), at(3)) == "stored"
    assert reg.stats()["telemetry_stored"] == 3 and reg.stats()["duplicates"] == 2


def test_a_crash_between_seen_and_store_leaves_neither(reg, monkeypatch):
    def broken(*args):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(Registry, "_store_telemetry", broken)
    with pytest.raises(sqlite3.OperationalError):
        reg.ingest(P.NODE, "telemetry", P.telemetry(seq=0), at(0))
    assert rows(reg, "SELECT * FROM seen") == [] and reg.nodes() == []
    monkeypatch.undo()
    assert reg.ingest(P.NODE, "telemetry", P.telemetry(seq=0), at(1)) == "stored"   # not a "duplicate"
    assert reg.stats()["telemetry_stored"] == 1


def _messages(seed: int) -> list[tuple]:
    """A random stream from three nodes: births (some retained), states, every sequenced kind,
    duplicates, late and lost messages, reboots and invalid payloads."""
    import random
    rnd = random.Random(seed)
    nodes = ["env-0001", "env-0002", "env-0003"]
    seqs = {n: 0 for n in nodes}
    boots = {n: 1 for n in nodes}
    out = []
    for i in range(300):
        n = rnd.choice(nodes)
        roll = rnd.random()
        if roll < 0.03:
            boots[n] += 1
            seqs[n] = 0
            out.append(("birth", n, P.birth(node=n, boot=boots[n]), rnd.random() < 0.3))
            continue
        if roll < 0.06:
            out.append(("state", n, P.state(node=n, boot=boots[n], value=rnd.choice(["online", "offline"])),
                        rnd.random() < 0.3))
            continue
        if roll < 0.08:
            out.append(("invalid", n, None, False))
            continue
        seq = seqs[n] + (rnd.random() < 0.1)                       # now and then one is lost...
        if rnd.random() < 0.1:
            seq = max(0, seq - rnd.randint(1, 3))                  # ...or comes again, or late
        seqs[n] = max(seqs[n], seq + 1)
        kind = rnd.choice(["telemetry", "telemetry", "telemetry", "health", "event", "reply"])
        out.append((kind, n, getattr(P, kind)(node=n, boot=boots[n], seq=seq), False))
    return out


def _contents(reg) -> dict:
    tables = ["nodes", "seen", "telemetry", "health", "events", "replies", "gaps", "invalid", "upstream"]
    return {t: sorted(tuple(v for k, v in row.items() if k != "id") for row in reg.db[t].rows) for t in tables}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_batch_stores_exactly_what_one_message_at_a_time_stores(tmp_path, seed):
    """The batch path (node rows written once, inserts gathered) against the plain one."""
    one, many = Registry(tmp_path / "one.db"), Registry(tmp_path / "many.db")
    try:
        stream = _messages(seed)

        def store(r, i, kind, node, payload, retained):
            if kind == "invalid":
                r.record_invalid(f"iwaki/{node}/telemetry", "not JSON", b"{", node=node, received_at=at(i))
            else:
                r.ingest(node, kind, payload, at(i), retained=retained, upstream=_upstream)

        for i, message in enumerate(stream):
            store(one, i, *message)
        for start in range(0, len(stream), 37):
            with many.batch():
                for i, message in enumerate(stream[start:start + 37], start):
                    store(many, i, *message)
        assert _contents(many) == _contents(one)
        assert one.stats()["duplicates"] > 0 and one.stats()["gaps"] > 0 and one.stats()["invalid"] > 0
    finally:
        one.close()
        many.close()


def _upstream(node_row, kind, payload, at):
    # what the relay would be given: the node row as it is after this message
    return [{"id": f"urn:test:{node_row['id']}:{payload['boot']}:{payload['seq']}", "type": kind,
             "state": node_row["state"], "lastSeq": node_row["last_seq"], "gaps": node_row["gaps"],
             "invalid": node_row["invalid"]}]


def test_a_batch_is_all_or_nothing(reg):
    with reg.batch():
        for seq in range(3):
            reg.ingest(P.NODE, "telemetry", P.telemetry(seq=seq), at(seq), upstream=_upstream)
    before = _contents(reg)
    with pytest.raises(RuntimeError):
        with reg.batch():
            reg.ingest(P.NODE, "telemetry", P.telemetry(seq=3), at(3), upstream=_upstream)
            reg.ingest(P.NODE, "telemetry", P.telemetry(seq=9), at(4), upstream=_upstream)  # a gap
            raise RuntimeError("a bug while storing")
    assert _contents(reg) == before
    with reg.batch():        # nothing of the undone batch lingers in its node rows
        assert reg.ingest(P.NODE, "telemetry", P.telemetry(seq=3), at(5)) == "stored"
    assert (reg.node(P.NODE)["last_seq"], reg.node(P.NODE)["gaps"]) == (3, 0)
    with pytest.raises(RegistryError, match="do not nest"):
        with reg.batch():
            with reg.batch():
                pass


# -- gaps --

def test_gap_is_recorded_then_shrunk_and_closed_by_late_messages(reg):
    for seq in (0, 1, 6):
        reg.ingest(P.NODE, "telemetry", P.telemetry(seq=seq), at(seq))
    assert gaps(reg) == [(1, 2, 5)]
    assert reg.node(P.NODE)["gaps"] == 4 and reg.node(P.NODE)["last_seq"] == 6
    reg.ingest(P.NODE, "health", P.health(seq=4), at(10))        # splits 2..5 into 2..3 and 5..5
    assert gaps(reg) == [(1, 2, 3), (1, 5, 5)]
    reg.ingest(P.NODE, "event", P.event(seq=2), at(11))          # shrinks from the bottom
    reg.ingest(P.NODE, "telemetry", P.telemetry(seq=5), at(12))  # closes 5..5
    assert gaps(reg) == [(1, 3, 3)]
    assert reg.node(P.NODE)["gaps"] == 1 and reg.stats()["gaps"] == 1
    reg.ingest(P.NODE, "telemetry", P.telemetry(seq=3), at(13))
    assert gaps(reg) == [] and reg.node(P.NODE)["gaps"] == 0
    assert reg.node(P.NODE)["last_seq"] == 6                      # late messages don't move it back
    reg.ingest(P.NODE, "telemetry", P.telemetry(seq=7), at(14))  # in order again: no gap
    assert gaps(reg) == []


def test_gaps_are_per_boot_and_a_boot_starts_at_seq_0(reg):
    reg.ingest(P.NODE, "telemetry", P.telemetry(boot=1, seq=0), at(0))
    reg.ingest(P.NODE, "telemetry", P.telemetry(boot=2, seq=0), at(1))   # reboot: seq starts again
    reg.ingest(P.NODE, "telemetry", P.telemetry(boot=1, seq=1), at(2))   # boot 1's outbox flushed late
    assert gaps(reg) == []
    n = reg.node(P.NODE)
    assert (n["boot"], n["last_seq"]) == (2, 0)                          # current boot's position
    reg.ingest(P.NODE, "telemetry", P.telemetry(boot=3, seq=2), at(3))   # 0 and 1 of boot 3 dropped
    assert gaps(reg) == [(3, 0, 1)]


# -- staleness, invalid messages, stats --

def test_silent_online_nodes_turn_offline_after_the_timeout(reg):
    reg.ingest("env-0001", "telemetry", P.telemetry(node="env-0001"), at(0))
    reg.ingest("env-0002", "telemetry", P.telemetry(node="env-0002"), at(100))
    reg.ingest("env-0003", "state", P.state(node="env-0003", value="offline", reason="shutdown"), at(0))
    assert reg.mark_stale(180, now=at(179)) == []
    assert reg.mark_stale(180, now=at(181)) == ["env-0001"]
    states = {n["id"]: (n["state"], n["state_reason"]) for n in reg.nodes()}
    assert states == {"env-0001": ("offline", "timeout"), "env-0002": ("online", "heard"),
                      "env-0003": ("offline", "shutdown")}
    assert reg.mark_stale(180, now=at(181)) == []                       # once
    assert reg.stats()["nodes_online"] == 1


def test_a_retained_online_gets_a_full_timeout_before_it_is_doubted(reg):
    reg.ingest(P.NODE, "telemetry", P.telemetry(), at(0))
    reg.ingest(P.NODE, "state", P.state(), at(1000), retained=True)     # replayed when the fleet starts
    assert reg.node(P.NODE)["last_seen"] == iso(at(0))
    assert reg.mark_stale(180, now=at(1100)) == []
    assert reg.mark_stale(180, now=at(1181)) == [P.NODE]


def test_invalid_messages_are_kept_with_reason_and_excerpt(reg):
    reg.ingest(P.NODE, "birth", P.birth(), at(0))
    body = b"x" * 5000
    reg.record_invalid(P.topic("telemetry"), "payload is not JSON", body, node=P.NODE, received_at=at(1))
    reg.record_invalid("iwaki/stranger/cmd", "unknown kind", b"\xff\xfe", received_at=at(2))
    got = rows(reg, "SELECT received_at, topic, node, reason, size, excerpt FROM invalid ORDER BY id")
    assert got[0] == {"received_at": iso(at(1)), "topic": "iwaki/env-0001/telemetry", "node": P.NODE,
                      "reason": "payload is not JSON", "size": 5000, "excerpt": "x" * 200}
    assert got[1]["excerpt"] == "\ufffd\ufffd" and got[1]["node"] is None
    assert reg.node(P.NODE)["invalid"] == 1
    assert [n["id"] for n in reg.nodes()] == [P.NODE]                    # garbage creates no node
    assert reg.stats()["invalid"] == 2


def test_stats_count_messages(reg):
    reg.ingest(P.NODE, "birth", P.birth(), at(0))
    reg.ingest(P.NODE, "state", P.state(), at(0))
    for seq in (0, 1, 3):
        reg.ingest(P.NODE, "telemetry", P.telemetry(seq=seq), at(seq))
    reg.ingest(P.NODE, "telemetry", P.telemetry(seq=3), at(4))
    reg.ingest(P.NODE, "health", P.health(seq=4), at(5))
    reg.ingest(P.NODE, "event", P.event(seq=5), at(6))
    reg.ingest("env-0002", "state", P.state(node="env-0002", value="offline", reason="lost"), at(6))
    reg.record_invalid("iwaki/x/y", "bad", b"{}")
    assert reg.stats() == {"nodes": 2, "nodes_online": 1, "telemetry_stored": 3, "health_stored": 1,
                           "events_stored": 1, "replies_stored": 0, "invalid": 1, "duplicates": 1, "gaps": 1}


def test_times_round_trip():
    assert parse_iso(iso(at(1.5))) == at(1.5)
    assert iso(datetime(2024, 5, 1, 21, 0, tzinfo=timezone(timedelta(hours=9)))) == "2024-05-01T12:00:00.000Z"


def test_retention_deletes_old_telemetry_health_and_dedup_records_only(tmp_path):
    with Registry(tmp_path / "fleet.db") as r:
        r.ingest(P.NODE, "telemetry", P.telemetry(seq=0), at(0))
        r.ingest(P.NODE, "health", P.health(seq=1), at(0))
        r.ingest(P.NODE, "event", P.event(seq=2), at(0))
        later = at(0) + timedelta(days=100)
        r.ingest(P.NODE, "telemetry", P.telemetry(seq=3), later)
        assert r.prune(90, now=later) == 6                 # 2 telemetry rows (channels), 1 health, 3 seen
        assert rows(r, "SELECT count(DISTINCT seq) AS n FROM telemetry") == [{"n": 1}]
        assert rows(r, "SELECT count(*) AS n FROM events") == [{"n": 1}]
        assert [x["seq"] for x in rows(r, "SELECT seq FROM seen")] == [3]
        assert r.ingest(P.NODE, "telemetry", P.telemetry(seq=3), later) == "duplicate"   # recent: still known
        assert r.node(P.NODE) is not None
        assert r.prune(90, now=later) == 0


def test_retention_works_in_chunks_and_never_deletes_a_newer_row(tmp_path, monkeypatch):
    import fleet.registry
    monkeypatch.setattr(fleet.registry, "PRUNE_CHUNK", 7)
    with Registry(tmp_path / "fleet.db") as r:
        for seq in range(30):
            r.ingest(P.NODE, "telemetry", P.telemetry(seq=seq), at(seq))
        now = at(0) + timedelta(days=90, seconds=20)      # seq 0..19 are past the retention
        r.ingest(P.NODE, "telemetry", P.telemetry(seq=30), at(5))   # stamped out of order by another worker
        assert r.prune(90, now=now) == 20 * 2 + 20
        kept = [x["seq"] for x in rows(r, "SELECT seq FROM seen ORDER BY seq")]
        assert kept[:10] == list(range(20, 30))           # every newer row is still there
        assert r.prune(90, now=now + timedelta(days=1)) == 11 * 2 + 11     # the out-of-order one goes too
        assert rows(r, "SELECT count(*) AS n FROM telemetry") == [{"n": 0}]


def test_a_retention_pass_costs_what_it_deletes_not_the_size_of_the_tables(tmp_path):
    with Registry(tmp_path / "fleet.db") as r:
        with r.batch():
            for seq in range(5000):
                r.ingest(P.NODE, "telemetry", P.telemetry(seq=seq), at(seq))
        steps = []
        r.db.conn.set_progress_handler(lambda: steps.append(1), 1000)    # every 1000 VM instructions
        assert r.prune(90, now=at(5000)) == 0
        quiet = len(steps)
        steps.clear()
        r.db.execute("SELECT count(*) FROM telemetry WHERE received_at < ?", [iso(at(0))]).fetchone()
        assert quiet * 20 < len(steps)                    # far less than one scan of one table
