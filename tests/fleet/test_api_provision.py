"""POST /api/v1/provision: node ids, credentials, what a node is told, conflicts, audit."""
from __future__ import annotations

import subprocess
import sys

import pytest

from fleet import credentials as C
from fleet import keys as K
from fleet import tokens as T
from fleet.api import create_app
from fleet.registry import Registry
from fleet.settings import Settings
from tests.fleet.test_api import Client, error, ok

PEM = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n"


@pytest.fixture
def fleet(tmp_path, monkeypatch):
    """A registry with env-0001 known and env-0003's account revoked; tokens per role; a client factory."""
    monkeypatch.setenv("IWAKI_KEYS_DIR", str(tmp_path / "keys"))  # no key yet
    db = tmp_path / "fleet.db"
    with Registry(db) as reg:
        reg.ingest("env-0001", "state", {"v": 1, "node": "env-0001", "boot": 1, "seq": 0, "ts": None,
                                         "clock_set": False, "state": "online"})
        C.issue(reg, "env-0003", "node", "setup")
        C.revoke(reg, "env-0003", "setup")
        C.issue(reg, "iwaki-fleet", "fleet", "setup")
        toks = {r: T.issue(reg, f"{r}-1", r, "setup") for r in T.ROLES}

    def client(**settings) -> Client:
        return Client(create_app(Settings(db=str(db), mqtt_host="10.0.0.5", mqtt_port=1883, **settings),
                                 dashboard=None))
    return type("F", (), {"db": db, "tokens": toks, "client": staticmethod(client), "tmp": tmp_path})


def post(client, token, **body):
    return client.request("POST", "/api/v1/provision", token, json=body)


def registry(f) -> Registry:
    return Registry(f.db, create=False)


def test_a_technician_gets_the_next_free_id_and_a_password_only_its_hash_is_kept(fleet):
    c = fleet.client()
    a = ok(post(c, fleet.tokens["technician"], board="env-station", site="taira-3"), 201)
    # env-0001 is a node, env-0003 a revoked account: numbers are never reused
    assert a["node"] == a["user"] == "env-0004"
    assert a["broker"] == {"host": "10.0.0.5", "port": 1883} and a["root"] == "iwaki"
    assert a["ca"] is None and a["tls"] is False and a["ota_keys"] == []
    assert a["fleet_url"] == "http://fleet.test" and a["site"] == "taira-3" and a["replaced"] is False
    b = ok(post(c, fleet.tokens["admin"], board="people-gate", site="station square"), 201)
    assert b["node"] == "gate-0001"
    with registry(fleet) as reg:
        row = next(reg.db["credentials"].rows_where("account = ?", ["env-0004"]))
        assert a["password"] not in str(row) and C.verify_password(a["password"], row["password_hash"])
        audit = [r for r in reg.db["audit"].rows_where("action = 'node.provision'", order_by="id")]
    assert [(r["actor"], r["target"]) for r in audit] == [("technician-1", "env-0004"), ("admin-1", "gate-0001")]
    assert "board=env-station site=taira-3" in audit[0]["detail"]


def test_nodes_are_told_the_configured_broker_ca_fleet_url_and_ota_key(fleet):
    K.create(fleet.tmp / "keys")
    ca = fleet.tmp / "ca.pem"
    ca.write_text(PEM)
    c = fleet.client(node_broker_host="mqtt.iwaki.local", node_broker_port=8883, node_ca=str(ca),
                     node_fleet_url="http://fleet.iwaki.local:8080/")
    a = ok(post(c, fleet.tokens["technician"], board="river-station", site="natsui river"), 201)
    assert a["node"] == "river-0001"
    assert a["broker"] == {"host": "mqtt.iwaki.local", "port": 8883} and a["tls"] is True and a["ca"] == PEM
    assert a["ota_keys"] == [K.show(fleet.tmp / "keys")["current"]["public"]]
    assert a["fleet_url"] == "http://fleet.iwaki.local:8080"


def test_a_named_node_with_live_credentials_needs_replace(fleet):
    c, tech = fleet.client(), fleet.tokens["technician"]
    first = ok(post(c, tech, board="ev-charger", site="lot 4", node="ev-0042"), 201)
    assert first["node"] == "ev-0042"
    body = error(post(c, tech, board="ev-charger", site="lot 4", node="ev-0042"), 409, "conflict")
    assert "replace" in body["detail"]
    again = ok(post(c, tech, board="ev-charger", site="lot 4", node="ev-0042", replace=True), 201)
    assert again["replaced"] is True and again["password"] != first["password"]
    with registry(fleet) as reg:
        stored = next(reg.db["credentials"].rows_where("account = ?", ["ev-0042"]))["password_hash"]
    assert C.verify_password(again["password"], stored) and not C.verify_password(first["password"], stored)
    # a revoked account is given new credentials without replace; a fleet account never
    assert ok(post(c, tech, board="env-station", site="x", node="env-0003"), 201)["node"] == "env-0003"
    error(post(c, tech, board="env-station", site="x", node="iwaki-fleet", replace=True), 409, "conflict")


def test_bad_requests_name_the_field(fleet):
    c, tech = fleet.client(), fleet.tokens["technician"]
    for body, field in ((dict(board="toaster", site="x"), "board"),
                        (dict(board="env-station", site=""), "site"),
                        (dict(board="env-station", site="x", node="Env_1"), "node"),
                        (dict(board="env-station"), "site"),
                        (dict(board="env-station", site="x", colour="red"), "colour")):
        res = error(post(c, tech, **body), 422, "invalid_request")
        assert res["fields"][0]["field"] == field, res
    assert "env-station" in error(post(c, tech, board="toaster", site="x"), 422, "invalid_request")["detail"]


def test_viewers_and_operators_may_not_provision(fleet):
    c = fleet.client()
    for role in ("viewer", "operator", "platform"):
        detail = error(post(c, fleet.tokens[role], board="env-station", site="x"), 403, "forbidden")["detail"]
        assert "technician" in detail
    error(post(c, None, board="env-station", site="x"), 401, "unauthorized")


def test_an_unreadable_ca_is_the_fleets_problem_not_the_technicians(fleet):
    c = fleet.client(node_ca=str(fleet.tmp / "missing.pem"))
    body = error(post(c, fleet.tokens["technician"], board="env-station", site="x"), 503, "unavailable")
    assert "IWAKI_NODE_CA" in body["detail"]
    with registry(fleet) as reg:  # nothing was issued
        assert next(reg.db["credentials"].rows_where("account = ?", ["env-0004"]), None) is None


def test_the_broker_files_are_rewritten_and_the_broker_told_to_reload(fleet):
    # a real process stands in for mosquitto's pid: it records the SIGHUP it gets
    marker = fleet.tmp / "hup"
    proc = subprocess.Popen([sys.executable, "-c", (
        "import signal, sys, time, pathlib\n"
        f"signal.signal(signal.SIGHUP, lambda *a: (pathlib.Path({str(marker)!r}).write_text('hup'), sys.exit(0)))\n"
        "print('ready', flush=True)\ntime.sleep(30)")], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        pid_file = fleet.tmp / "mosquitto.pid"
        pid_file.write_text(f"{proc.pid}\n")
        conf = fleet.tmp / "broker-conf"
        c = fleet.client(broker_conf_dir=str(conf), broker_pid_file=str(pid_file))
        a = ok(post(c, fleet.tokens["technician"], board="env-station", site="x"), 201)
        assert a["broker_updated"] is True
        assert proc.wait(10) == 0 and marker.read_text() == "hup"
        line = next(l for l in (conf / "passwd").read_text().splitlines() if l.startswith("env-0004:"))
        assert C.verify_password(a["password"], line.split(":", 1)[1])
        assert "topic write iwaki/env-0004/birth" in (conf / "acl").read_text()
    finally:
        proc.kill()
        proc.wait()
    # without a pid file the files are written but nobody is told
    b = ok(post(fleet.client(broker_conf_dir=str(conf)), fleet.tokens["technician"], board="env-station", site="x"), 201)
    assert b["broker_updated"] is False and "env-0005:" in (conf / "passwd").read_text()
