"""Health alerts open and close by themselves; operators acknowledge them."""
import subprocess
import sys
from datetime import timedelta

import pytest

from fleet import health as H
from fleet.registry import Registry, utc_now
from tests.fleet import payloads as P


def kinds(reg, **kw):
    return sorted((a["node"], a["kind"]) for a in H.alerts(reg, **kw))


def test_alerts_open_while_conditions_hold_and_close_after(tmp_path):
    now = utc_now()
    with Registry(tmp_path / "f.db") as reg:
        reg.ingest(P.NODE, "health", P.health(seq=0), now)
        assert H.evaluate(reg, now) == (0, 0) and kinds(reg) == []
        bad = P.health(seq=1, ts=None, clock_set=False, heap_free=9000, loop={"lag_max_ms": 900, "lag_mean_ms": 50.0,
                                                            "overruns": 4, "ticks": 3000},
                       outbox={"depth": 500, "bytes": 90000, "dropped": 0},
                       sensors={"bme280": {"status": "warning", "errors": 3}, "pms5003": {"status": "ok", "errors": 0}})
        reg.ingest(P.NODE, "health", bad, now)
        assert H.evaluate(reg, now) == (5, 0)
        assert kinds(reg) == [(P.NODE, k) for k in
                              ("clock_not_set", "loop_overruns", "low_heap", "outbox_backlog", "sensor_fault")]
        msgs = {a["kind"]: a["message"] for a in H.alerts(reg)}
        assert msgs["sensor_fault"] == "bme280 warning" and msgs["outbox_backlog"] == "500 messages waiting"
        assert H.evaluate(reg, now) == (0, 0)  # still holding: not opened twice
        reg.ingest(P.NODE, "health", P.health(seq=2), now)
        assert H.evaluate(reg, now) == (0, 5)
        assert kinds(reg) == [] and len(H.alerts(reg, include_closed=True)) == 5


def test_offline_reboot_loop_and_gaps(tmp_path):
    now = utc_now()
    with Registry(tmp_path / "f.db") as reg:
        for boot in (1, 2, 3):
            reg.ingest(P.NODE, "telemetry", P.telemetry(boot=boot, seq=0), now)
        reg.ingest(P.NODE, "telemetry", P.telemetry(boot=3, seq=5), now)  # 1..4 missing
        reg.ingest(P.NODE, "state", P.state(boot=3, value="offline", reason="lost"), now)
        H.evaluate(reg, now)
        got = {a["kind"]: a for a in H.alerts(reg)}
        assert set(got) == {"offline", "reboot_loop", "sequence_gap"}
        assert got["reboot_loop"]["severity"] == "critical" and got["reboot_loop"]["message"].startswith("3 boots")
        assert got["sequence_gap"]["message"].startswith("4 messages missing")
        assert "lost" in got["offline"]["message"]
        # an hour later the gap and the boots are old news; the node is still offline
        H.evaluate(reg, now + timedelta(hours=2))
        assert kinds(reg) == [(P.NODE, "offline")]


def test_acknowledge_keeps_the_alert_open_and_is_audited(tmp_path):
    now = utc_now()
    with Registry(tmp_path / "f.db") as reg:
        reg.ingest(P.NODE, "state", P.state(value="offline", reason="lost"), now)
        H.evaluate(reg, now)
        (a,) = H.alerts(reg)
        acked = H.acknowledge(reg, a["id"], "op-1")
        assert acked["acked_by"] == "op-1" and acked["closed_at"] is None
        assert [r["action"] for r in reg.db["audit"].rows] == ["alert.ack"]
        with pytest.raises(H.AlertError, match="no alert 999"):
            H.acknowledge(reg, 999, "op-1")
        reg.ingest(P.NODE, "state", P.state(seq=1, value="online"), now)
        H.evaluate(reg, now)
        with pytest.raises(H.AlertError, match="closed at"):
            H.acknowledge(reg, a["id"], "op-1")


def test_cli_lists_and_acknowledges(tmp_path):
    db = tmp_path / "f.db"
    with Registry(db) as reg:
        reg.ingest(P.NODE, "state", P.state(value="offline", reason="lost"), utc_now())

    def fleet(*args):
        return subprocess.run([sys.executable, "-m", "fleet", "alerts", *args, "--db", str(db)],
                              capture_output=True, text=True, timeout=60)

    r = fleet()
    assert r.returncode == 0 and "OPEN" in r.stdout and "offline" in r.stdout, r.stderr
    alert_id = r.stdout.split()[0]
    r = fleet("ack", alert_id, "--actor", "op-7")
    assert r.returncode == 0 and "acknowledged by op-7" in r.stdout
    assert "acked" in fleet().stdout
    r = fleet("ack", "12345")
    assert r.returncode == 1 and r.stderr == "fleet: no alert 12345\n"


def test_a_platform_backlog_older_than_five_minutes_is_a_fleet_alert(tmp_path):
    now = utc_now()
    up = lambda row, kind, p, at: [{"id": "urn:ngsi-ld:Device:iwaki:" + row["id"], "type": "Device"}]  # noqa: E731
    with Registry(tmp_path / "f.db") as reg:
        reg.ingest(P.NODE, "telemetry", P.telemetry(seq=0), now - timedelta(minutes=4), upstream=up)
        assert H.evaluate(reg, now) == (0, 0)                      # waiting, but not for long
        later = now + timedelta(minutes=2)
        assert H.evaluate(reg, later) == (1, 0)
        (alert,) = [a for a in H.alerts(reg) if a["kind"] == "upstream_backlog"]
        assert alert["node"] == H.FLEET and "1 deliveries wait" in alert["message"]
        rows = reg.claim_upstream("w", 10, 30)
        reg.finish_upstream("w", [r["id"] for r in rows])
        assert H.evaluate(reg, later) == (0, 1)                    # delivered: it closes by itself
