"""Per-device credentials and the broker ACL, against a real mosquitto."""
from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import paho.mqtt.client as paho
import pytest

from fleet import credentials as C
from fleet.mosquitto import Mosquitto
from tests.harness.broker import subscribe
from fleet.registry import Registry


def test_hash_is_mosquittos_format_and_verifies():
    h = C.hash_password("s3cret", salt=b"\x01" * 12)
    assert h.startswith("$7$1000$AQEBAQEBAQEBAQEB$")
    assert C.verify_password("s3cret", h) and not C.verify_password("s3cret!", h)
    assert not C.verify_password("s3cret", "garbage")


def test_issue_rotate_revoke_and_the_audit_log(tmp_path):
    with Registry(tmp_path / "f.db") as reg:
        pw = C.issue(reg, "env-0001", actor="tech-1")
        assert len(pw) >= 24
        row = next(reg.db["credentials"].rows_where("account = 'env-0001'"))
        assert pw not in str(row) and C.verify_password(pw, row["password_hash"])  # hash only
        with pytest.raises(C.CredentialError, match="already has credentials"):
            C.issue(reg, "env-0001")
        pw2 = C.issue(reg, "env-0001", rotate=True, actor="tech-1")
        assert pw2 != pw
        with pytest.raises(C.CredentialError, match="not an account name"):
            C.issue(reg, "Env 1")
        with pytest.raises(C.CredentialError, match="unknown account kind"):
            C.issue(reg, "x-1", kind="root")
        with pytest.raises(C.CredentialError, match="is a node account, not fleet"):
            C.issue(reg, "env-0001", kind="fleet", rotate=True)
        C.revoke(reg, "env-0001", actor="op-2")
        with pytest.raises(C.CredentialError, match="no account"):
            C.revoke(reg, "env-9999")
        audit = [(r["actor"], r["action"], r["target"]) for r in reg.db["audit"].rows_where(order_by="id")]
        assert audit == [("tech-1", "credentials.issue", "env-0001"),
                         ("tech-1", "credentials.rotate", "env-0001"),
                         ("op-2", "credentials.revoke", "env-0001")]
        assert C.accounts(reg)[0]["revoked_at"] is not None


def connect(broker, user, password, timeout=5.0):
    """A connected paho client, or the CONNACK failure reason as a string."""
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"{user}-{time.monotonic_ns()}")
    c.username_pw_set(user, password)
    done, result, got = threading.Event(), {}, []
    c.on_connect = lambda cl, ud, fl, rc, pr: (result.update(rc=rc), done.set())
    c.on_message = lambda cl, ud, msg: got.append((msg.topic, msg.payload))
    c.got = got
    c.connect(broker.host, broker.port)
    c.loop_start()
    done.wait(timeout)
    if result.get("rc") is None or result["rc"].is_failure:
        c.loop_stop()
        return str(result.get("rc"))
    return c


@pytest.mark.broker
def test_acl_keeps_each_node_in_its_own_subtree_and_revocation_locks_it_out(tmp_path):
    with Registry(tmp_path / "f.db") as reg:
        pw = {a: C.issue(reg, a) for a in ("n-0001", "n-0002")}
        pw["iwaki-fleet"] = C.issue(reg, "iwaki-fleet", kind="fleet")
        passwd, acl = C.broker_config(reg, tmp_path / "conf")
    assert "n-0001:$7$" in passwd.read_text() and "topic read iwaki/n-0001/cmd/#" in acl.read_text()
    b = Mosquitto(tmp_path / "broker", extra_conf=f"password_file {passwd}\nacl_file {acl}\n"
                                                  "allow_anonymous false\n").start()
    try:
        fleet = connect(b, "iwaki-fleet", pw["iwaki-fleet"])
        assert not isinstance(fleet, str), fleet
        subscribe(fleet, "iwaki/+/telemetry")
        n1 = connect(b, "n-0001", pw["n-0001"])
        n2 = connect(b, "n-0002", pw["n-0002"])
        subscribe(n1, "iwaki/n-0002/cmd/#")   # not its own: nothing may arrive
        subscribe(n2, "iwaki/n-0002/cmd/#")
        n1.publish("iwaki/n-0001/telemetry", b"own", qos=1).wait_for_publish(5)
        n1.publish("iwaki/n-0002/telemetry", b"forged", qos=1).wait_for_publish(5)
        fleet.publish("iwaki/n-0002/cmd/ping", b"cmd", qos=1).wait_for_publish(5)
        n2.publish("iwaki/n-0002/cmd/ping", b"self-command", qos=1).wait_for_publish(5)
        time.sleep(1.0)
        assert fleet.got == [("iwaki/n-0001/telemetry", b"own")]
        assert n2.got == [("iwaki/n-0002/cmd/ping", b"cmd")]
        assert n1.got == []
        # wrong password, no password, a made-up account
        assert isinstance(connect(b, "n-0001", "guess"), str)
        assert isinstance(connect(b, "n-0001", ""), str)
        assert isinstance(connect(b, "n-9999", pw["n-0001"]), str)
        for c in (fleet, n1, n2):
            c.loop_stop()
            c.disconnect()
        # revoke, rewrite the files, reload: the node is out, the other stays in
        with Registry(tmp_path / "f.db") as reg:
            C.revoke(reg, "n-0001")
            C.broker_config(reg, tmp_path / "conf")
        b.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert isinstance(connect(b, "n-0001", pw["n-0001"]), str)
        again = connect(b, "n-0002", pw["n-0002"])
        assert not isinstance(again, str), again
        again.loop_stop()
        again.disconnect()
    finally:
        b.stop()


def test_cli_issues_and_writes_the_broker_files(tmp_path):
    db = tmp_path / "f.db"

    def fleet(*args):
        return subprocess.run([sys.executable, "-m", "fleet", *args], capture_output=True, text=True, timeout=60)

    r = fleet("credentials", "issue", "env-0001", "--db", str(db))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("env-0001: ") and "shown once" in r.stderr
    r = fleet("credentials", "issue", "env-0001", "--db", str(db))
    assert r.returncode == 1 and r.stderr.startswith("fleet: env-0001 already has credentials")
    assert "Traceback" not in r.stderr
    r = fleet("credentials", "list", "--db", str(db))
    assert "env-0001" in r.stdout and "active" in r.stdout
    r = fleet("broker-config", "--out", str(tmp_path / "conf"), "--db", str(db))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "conf" / "passwd").read_text().startswith("env-0001:$7$")
