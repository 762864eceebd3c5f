"""The HTTP API against a real registry file: roles, lists, errors, OpenAPI and /metrics.

Requests go through httpx, in process (httpx's ASGI transport) for most
tests and over real HTTP to a uvicorn server on loopback for one.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import httpx
import paho.mqtt.client as mqtt
import pytest
import uvicorn
from fastapi.routing import iter_route_contexts
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from fleet import credentials as C
from fleet import health as H
from fleet import tokens as T
from fleet.api import create_app
from fleet.ingest import Ingest
from fleet.mosquitto import free_port
from fleet.registry import Registry, iso
from fleet.settings import Settings
from tests.fleet import payloads as P
from tests.harness.broker import subscribe

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
EVALUATED = T0 + timedelta(hours=3)
N_TELEMETRY = 105  # more than the 100 a node's detail shows per channel
N_EVENTS = 22  # more than the 20 a node's detail shows
SEVERITIES = ("info", "warning", "critical")
OFFLINE = "env-0002"
SILENT = "ped-0003"
ROLE_TOKENS = {"admin": "admin-1", "operator": "op-sato", "technician": "tech-ito", "viewer": "view-1",
               "platform": "city-platform"}
ALL = set(ROLE_TOKENS)
READERS = {"admin", "viewer", "operator", "technician"}
#: docs/api.md's table of who may call what; the app must serve exactly these routes.
ACCESS = {
    ("GET", "/api/v1/summary"): READERS,
    ("GET", "/api/v1/nodes"): READERS | {"platform"},
    ("GET", "/api/v1/nodes/{node_id}"): READERS,
    ("GET", "/api/v1/nodes/{node_id}/telemetry"): READERS | {"platform"},
    ("GET", "/api/v1/nodes/{node_id}/health"): READERS,
    ("POST", "/api/v1/nodes/{node_id}/commands"): {"admin", "operator", "technician"},
    ("GET", "/api/v1/nodes/{node_id}/replies"): READERS,
    ("GET", "/api/v1/events"): READERS | {"platform"},
    ("GET", "/api/v1/alerts"): READERS,
    ("POST", "/api/v1/alerts/{alert_id}/ack"): {"admin", "operator"},
    ("GET", "/api/v1/gaps"): READERS,
    ("GET", "/api/v1/credentials"): {"admin"},
    ("POST", "/api/v1/credentials"): {"admin", "technician"},
    ("DELETE", "/api/v1/credentials/{account}"): {"admin"},
    ("GET", "/api/v1/tokens"): {"admin"},
    ("POST", "/api/v1/tokens"): {"admin"},
    ("DELETE", "/api/v1/tokens/{name}"): {"admin"},
    ("GET", "/api/v1/audit"): {"admin"},
    ("GET", "/metrics"): ALL,
    ("GET", "/api/v1/releases"): READERS,
    ("GET", "/api/v1/releases/{version}"): READERS,
    ("POST", "/api/v1/releases"): {"admin"},
    ("GET", "/api/v1/rollouts"): READERS,
    ("POST", "/api/v1/rollouts"): {"admin", "operator"},
    ("GET", "/api/v1/rollouts/{rollout_id}"): READERS,
    ("POST", "/api/v1/rollouts/{rollout_id}/pause"): {"admin", "operator"},
    ("POST", "/api/v1/rollouts/{rollout_id}/resume"): {"admin", "operator"},
    ("POST", "/api/v1/rollouts/{rollout_id}/abort"): {"admin", "operator"},
    ("POST", "/api/v1/provision"): {"admin", "technician"},
}


def minutes(n: float) -> datetime:
    return T0 + timedelta(minutes=n)


def fill(reg: Registry) -> None:
    """Three nodes with telemetry, health, events, a gap, alerts (one closed) and an outbox."""
    n = P.NODE
    reg.ingest(n, "birth", P.birth(), minutes(0))
    for seq in range(N_TELEMETRY):  # one window a minute, seq 0..104
        reg.ingest(n, "telemetry", P.telemetry(seq=seq), minutes(seq))
    reg.ingest(n, "telemetry", P.telemetry(seq=3), minutes(3.5))  # a duplicate
    reg.ingest(n, "health", P.health(seq=105, loop={"lag_max_ms": 80, "lag_mean_ms": 9.0, "overruns": 3,
                                                    "ticks": 3000}), minutes(105))
    H.evaluate(reg, minutes(105.5))  # opens loop_overruns
    reg.ingest(n, "health", P.health(seq=106), minutes(106))
    reg.ingest(n, "health", P.health(seq=107, ts=None, clock_set=False, heap_free=9000), minutes(107))
    for i in range(N_EVENTS):
        reg.ingest(n, "event", P.event(seq=108 + i, severity=SEVERITIES[i % 3]), minutes(108 + i))
    reg.ingest(OFFLINE, "telemetry", P.telemetry(node=OFFLINE, seq=0), minutes(1))
    reg.ingest(OFFLINE, "telemetry", P.telemetry(node=OFFLINE, seq=3), minutes(2))  # 1..2 missing
    reg.ingest(OFFLINE, "state", P.state(node=OFFLINE, seq=4, value="offline", reason="lost"), minutes(3))
    reg.ingest(SILENT, "birth", P.birth(node=SILENT), minutes(0), retained=True)  # never heard: unknown
    reg.record_invalid("iwaki/env-0001/telemetry", "not JSON", b"{oops", node=n, received_at=minutes(50))
    # closes loop_overruns; opens low_heap, clock_not_set (env-0001) and offline (env-0002)
    H.evaluate(reg, EVALUATED)
    for i, delivered in enumerate((True, True, False)):
        reg.db["upstream"].insert({"node": n, "boot": 1, "seq": i, "kind": "telemetry", "entity_id": f"urn:x:{i}",
                                   "entity_type": "WeatherObserved", "body": "{}", "created_at": iso(minutes(i)),
                                   "delivered_at": iso(minutes(i + 1)) if delivered else None})
    reg.db.conn.commit()


@pytest.fixture
def api(tmp_path):
    """A filled registry, one token per role (named as in ROLE_TOKENS), a revoked admin token, and a client."""
    db = tmp_path / "fleet.db"
    with Registry(db) as reg:
        fill(reg)
        tokens = {role: T.issue(reg, name, role, actor="setup") for role, name in ROLE_TOKENS.items()}
        revoked = T.issue(reg, "old-admin", "admin", actor="setup")
        T.revoke(reg, "old-admin", actor="setup")
        alerts = {(a["node"], a["kind"]): a["id"] for a in H.alerts(reg, include_closed=True)}
    app = create_app(Settings(db=str(db)), dashboard=None)
    return SimpleNamespace(db=db, app=app, tokens=tokens, revoked=revoked, alerts=alerts, client=Client(app))


class Client:
    """httpx against the app in process (its ASGI transport), one event loop per request."""

    def __init__(self, app):
        self.app = app

    def request(self, method: str, path: str, token: str | None = None, headers: dict | None = None,
                **kw) -> httpx.Response:
        headers = {**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}

        async def go():
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://fleet.test") as client:
                return await client.request(method, path, headers=headers, **kw)
        return asyncio.run(go())

    def get(self, path, token=None, **kw):
        return self.request("GET", path, token, **kw)


def ok(res: httpx.Response, status: int = 200) -> dict:
    assert res.status_code == status, res.text
    return res.json()


def error(res: httpx.Response, status: int, code: str) -> dict:
    assert res.status_code == status, res.text
    assert res.headers["content-type"] == "application/json"
    body = res.json()
    assert body["error"] == code and body["detail"], body
    return body


def served_routes(app) -> set[tuple[str, str]]:
    """(method, path template) of every /api/v1 and /metrics route in app.routes, included routers too."""
    return {(method, ctx.path) for ctx in iter_route_contexts(app.routes) if ctx.path and ctx.methods
            for method in ctx.methods if ctx.path.startswith("/api/v1") or ctx.path == "/metrics"}


# -- roles ----------------------------------------------------------------------

def test_every_route_checks_the_token_and_the_role(api):
    assert served_routes(api.app) == set(ACCESS)
    params = {"node_id": P.NODE, "alert_id": str(api.alerts[(P.NODE, "low_heap")]), "account": "nobody-here",
              "name": "nobody", "version": "9.9.9", "rollout_id": "1"}
    for (method, template), allowed in sorted(ACCESS.items()):
        path = template.format(**params)
        body = {"json": {}} if method == "POST" else {}
        res = api.client.request(method, path, None, **body)
        assert error(res, 401, "unauthorized") and res.headers["www-authenticate"].startswith("Bearer"), path
        for bad in ("iwk_" + "x" * 43, api.revoked, "not-even-a-token"):
            error(api.client.request(method, path, bad, **body), 401, "unauthorized")
        for role, token in api.tokens.items():
            res = api.client.request(method, path, token, **body)
            if role in allowed:
                assert res.status_code not in (401, 403), (method, path, role, res.text)
            else:
                detail = error(res, 403, "forbidden")["detail"]
                assert "admin" in detail and role in detail, detail


def test_a_token_in_another_scheme_or_without_bearer_is_refused(api):
    token = api.tokens["admin"]
    for header in (f"Basic {token}", token, "Bearer"):
        res = api.client.get("/api/v1/summary", headers={"Authorization": header})
        error(res, 401, "unauthorized")


# -- reading the fleet ----------------------------------------------------------

def test_summary_counts_the_fleet(api):
    s = ok(api.client.get("/api/v1/summary", api.tokens["viewer"]))
    assert {k: s[k] for k in ("nodes", "online", "offline", "unknown", "alerting", "alerts_open",
                               "telemetry_stored", "invalid", "gaps")} == {
        "nodes": 3, "online": 1, "offline": 1, "unknown": 1, "alerting": 2, "alerts_open": 3,
        "telemetry_stored": N_TELEMETRY + 2, "invalid": 1, "gaps": 2}
    assert s["relay"] == {"backlog": 1, "delivered": 2, "failed": 0}
    assert datetime.fromisoformat(s["generated_at"]) > T0


def test_nodes_list_with_latest_health_alerts_and_state_filter(api):
    page = ok(api.client.get("/api/v1/nodes", api.tokens["platform"]))
    assert [n["id"] for n in page["items"]] == [P.NODE, OFFLINE, SILENT] and page["total"] == 3
    first = page["items"][0]
    assert first["channels"] == {"temp_c": {"sensor": "bme280"}, "rh_pct": {"sensor": "bme280"}}
    assert first["alerts_open"] == 2 and first["state"] == "online" and first["fw"] == "0.1.0"
    assert first["health"] == {"heap_free": 9000, "rssi": -61, "lag_max_ms": 7, "overruns": 0, "outbox_depth": 2,
                               "received_at": iso(minutes(107))}
    assert page["items"][2]["health"] is None and page["items"][2]["state"] == "unknown"
    offline = ok(api.client.get("/api/v1/nodes?state=offline", api.tokens["viewer"]))
    assert [n["id"] for n in offline["items"]] == [OFFLINE] and offline["items"][0]["alerts_open"] == 1
    assert offline["items"][0]["channels"] is None  # never sent a birth
    bad = error(api.client.get("/api/v1/nodes?state=asleep", api.tokens["viewer"]), 422, "invalid_request")
    assert bad["fields"][0]["field"] == "state" and "online" in bad["fields"][0]["problem"]


def test_pagination_walks_every_item_once(api):
    url = f"/api/v1/nodes/{P.NODE}/telemetry?limit=25"
    seen, offset = [], 0
    while offset is not None:
        page = ok(api.client.get(f"{url}&offset={offset}", api.tokens["viewer"]))
        assert page["total"] == 2 * N_TELEMETRY and page["limit"] == 25 and page["offset"] == offset
        assert len(page["items"]) == min(25, 2 * N_TELEMETRY - offset)
        seen += page["items"]
        offset = page["next_offset"]
        assert offset is None or offset == page["offset"] + 25
    assert len(seen) == 2 * N_TELEMETRY and len({r["id"] for r in seen}) == len(seen)
    assert [r["received_at"] for r in seen] == sorted(r["received_at"] for r in seen)  # oldest first
    last = ok(api.client.get(f"{url}&offset=200", api.tokens["viewer"]))
    assert len(last["items"]) == 10 and last["next_offset"] is None
    beyond = ok(api.client.get(f"{url}&offset=5000", api.tokens["viewer"]))
    assert beyond["items"] == [] and beyond["total"] == 2 * N_TELEMETRY and beyond["next_offset"] is None
    default = ok(api.client.get(f"/api/v1/nodes/{P.NODE}/telemetry", api.tokens["viewer"]))
    assert default["limit"] == 100 and default["offset"] == 0 and default["next_offset"] == 100
    assert len(ok(api.client.get(f"/api/v1/nodes/{P.NODE}/telemetry?limit=1000", api.tokens["viewer"]))["items"]) == 210
    for query, field in (("limit=0", "limit"), ("limit=1001", "limit"), ("limit=ten", "limit"),
                         ("offset=-1", "offset")):
        body = error(api.client.get(f"/api/v1/events?{query}", api.tokens["viewer"]), 422, "invalid_request")
        assert [f["field"] for f in body["fields"]] == [field], body


def test_time_ranges_are_half_open_on_received_at(api):
    url = f"/api/v1/nodes/{P.NODE}/telemetry?limit=1000"
    since, until = iso(minutes(10)), iso(minutes(20))
    rows = ok(api.client.get(f"{url}&since={since}&until={until}", api.tokens["viewer"]))["items"]
    assert sorted({r["seq"] for r in rows}) == list(range(10, 20)) and len(rows) == 20
    # the same instants written with a +09:00 offset (Japan)
    jst = timezone(timedelta(hours=9))
    rows_jst = ok(api.client.get(url, api.tokens["viewer"], params={
        "since": minutes(10).astimezone(jst).isoformat(), "until": minutes(20).astimezone(jst).isoformat()}))["items"]
    assert rows_jst == rows
    temp = ok(api.client.get(f"{url}&channel=temp_c&since={since}", api.tokens["viewer"]))["items"]
    assert {r["channel"] for r in temp} == {"temp_c"} and len(temp) == N_TELEMETRY - 10
    health = ok(api.client.get(f"/api/v1/nodes/{P.NODE}/health?until={iso(minutes(107))}",
                               api.tokens["viewer"]))["items"]
    assert [h["seq"] for h in health] == [106, 105]  # newest first; 107 is at `until`, excluded
    events = ok(api.client.get(f"/api/v1/events?since={iso(minutes(125))}", api.tokens["viewer"]))["items"]
    assert [e["seq"] for e in events] == [129, 128, 127, 126, 125]
    for query, field, problem in (("since=2024-05-01T12:00:00", "since", "no time zone"),
                                  ("until=yesterday", "until", "not an ISO 8601 time"),
                                  (f"since={until}&until={since}", "until", "must be later than since")):
        body = error(api.client.get(f"{url}&{query}", api.tokens["viewer"]), 422, "invalid_request")
        assert body["fields"][0]["field"] == field and problem in body["fields"][0]["problem"], body


def test_node_detail_has_recent_history_alerts_gaps_and_events(api):
    d = ok(api.client.get(f"/api/v1/nodes/{P.NODE}", api.tokens["technician"]))
    assert d["id"] == P.NODE and d["board"] == "env-station" and d["last_seq"] == 129
    assert [h["seq"] for h in d["health"]] == [107, 106, 105]
    assert d["health"][0]["payload"]["heap_free"] == 9000 and d["health"][0]["payload"]["clock_set"] is False
    assert set(d["telemetry"]) == {"temp_c", "rh_pct"}
    temp = d["telemetry"]["temp_c"]
    assert len(temp) == 100 and [r["seq"] for r in temp] == list(range(N_TELEMETRY - 100, N_TELEMETRY))
    assert set(temp[0]) == {"ts", "received_at", "n", "min", "max", "mean", "last", "sum", "boot", "seq"}
    assert temp[-1]["mean"] == 21.71 and temp[-1]["received_at"] == iso(minutes(N_TELEMETRY - 1))
    assert sorted(a["kind"] for a in d["alerts"]) == ["clock_not_set", "low_heap"]
    assert d["gaps"] == []
    assert len(d["events"]) == 20 and d["events"][0]["seq"] == 129 and d["events"][-1]["seq"] == 110
    assert d["events"][0]["data"] == {"sensor": "scd4x", "reason": "no answer"}
    gap = ok(api.client.get(f"/api/v1/nodes/{OFFLINE}", api.tokens["viewer"]))["gaps"]
    assert [(g["node"], g["from_seq"], g["to_seq"], g["missing"]) for g in gap] == [(OFFLINE, 1, 2, 2)]
    silent = ok(api.client.get(f"/api/v1/nodes/{SILENT}", api.tokens["viewer"]))
    assert silent["telemetry"] == {"temp_c": [], "rh_pct": []} and silent["health"] == []


def test_unknown_nodes_are_404(api):
    for path in ("/api/v1/nodes/env-9999", "/api/v1/nodes/env-9999/telemetry", "/api/v1/nodes/env-9999/health"):
        body = error(api.client.get(path, api.tokens["admin"]), 404, "not_found")
        assert "env-9999" in body["detail"]


def test_events_alerts_and_gaps_filter(api):
    crit = ok(api.client.get("/api/v1/events?severity=critical&limit=3", api.tokens["platform"]))
    assert crit["total"] == 7 and {e["severity"] for e in crit["items"]} == {"critical"}
    assert crit["items"][0]["seq"] > crit["items"][1]["seq"] and crit["next_offset"] == 3
    assert ok(api.client.get(f"/api/v1/events?node={OFFLINE}", api.tokens["viewer"]))["total"] == 0
    error(api.client.get("/api/v1/events?severity=fatal", api.tokens["viewer"]), 422, "invalid_request")
    open_ = ok(api.client.get("/api/v1/alerts", api.tokens["viewer"]))
    assert sorted(a["kind"] for a in open_["items"]) == ["clock_not_set", "low_heap", "offline"]
    closed = ok(api.client.get("/api/v1/alerts?state=closed", api.tokens["viewer"]))["items"]
    assert [(a["kind"], a["closed_at"]) for a in closed] == [("loop_overruns", iso(EVALUATED))]
    assert ok(api.client.get("/api/v1/alerts?state=all", api.tokens["viewer"]))["total"] == 4
    assert [a["kind"] for a in ok(api.client.get(f"/api/v1/alerts?node={OFFLINE}", api.tokens["viewer"]))["items"]] \
        == ["offline"]
    gaps = ok(api.client.get("/api/v1/gaps", api.tokens["viewer"]))
    assert gaps["total"] == 1 and gaps["items"][0]["missing"] == 2
    assert ok(api.client.get(f"/api/v1/gaps?node={P.NODE}", api.tokens["viewer"]))["items"] == []


# -- acting on the fleet ---------------------------------------------------------

def test_ack_records_the_token_name_in_the_alert_and_the_audit_log(api):
    alert = api.alerts[(OFFLINE, "offline")]
    a = ok(api.client.request("POST", f"/api/v1/alerts/{alert}/ack", api.tokens["operator"]))
    assert a["id"] == alert and a["acked_by"] == "op-sato" and a["acked_at"] and a["closed_at"] is None
    audit = ok(api.client.get("/api/v1/audit", api.tokens["admin"]))["items"]
    assert (audit[0]["actor"], audit[0]["action"], audit[0]["target"]) == ("op-sato", "alert.ack", f"{OFFLINE}/offline")
    error(api.client.request("POST", "/api/v1/alerts/9999/ack", api.tokens["operator"]), 404, "not_found")
    closed = api.alerts[(P.NODE, "loop_overruns")]
    assert "closed" in error(api.client.request("POST", f"/api/v1/alerts/{closed}/ack", api.tokens["admin"]),
                             409, "conflict")["detail"]
    bad = error(api.client.request("POST", "/api/v1/alerts/first/ack", api.tokens["admin"]), 422, "invalid_request")
    assert bad["fields"][0]["field"] == "alert_id"


def test_credentials_are_shown_once_and_kept_as_a_hash(api):
    tech, admin = api.tokens["technician"], api.tokens["admin"]
    issued = ok(api.client.request("POST", "/api/v1/credentials", tech, json={"account": "env-0042"}), 201)
    assert issued["account"] == "env-0042" and issued["kind"] == "node" and len(issued["password"]) >= 24
    with Registry(api.db, create=False) as reg:
        row = next(reg.db["credentials"].rows_where("account = 'env-0042'"))
        assert C.verify_password(issued["password"], row["password_hash"])
        assert issued["password"] not in json.dumps(list(reg.db["credentials"].rows))
    listed = ok(api.client.get("/api/v1/credentials", admin))
    assert listed["items"] == [{"account": "env-0042", "kind": "node", "created_at": row["created_at"],
                                "revoked_at": None}]
    assert issued["password"] not in json.dumps(listed) and "password_hash" not in json.dumps(listed)
    again = error(api.client.request("POST", "/api/v1/credentials", tech, json={"account": "env-0042"}),
                  409, "conflict")
    assert "rotate" in again["detail"]
    rotated = ok(api.client.request("POST", "/api/v1/credentials", tech,
                                    json={"account": "env-0042", "rotate": True}), 201)
    assert rotated["password"] != issued["password"]
    fleet = error(api.client.request("POST", "/api/v1/credentials", tech, json={"account": "fleet-2", "kind": "fleet"}),
                  403, "forbidden")
    assert "admin" in fleet["detail"]
    assert ok(api.client.request("POST", "/api/v1/credentials", admin,
                                 json={"account": "fleet-2", "kind": "fleet"}), 201)["kind"] == "fleet"
    for body, field in (({"account": "Bad Name"}, "account"), ({"account": "x-1", "kind": "root"}, "kind"),
                        ({"kind": "node"}, "account"), ({"account": "x-1", "colour": "red"}, "colour")):
        res = api.client.request("POST", "/api/v1/credentials", admin, json=body)
        assert field in [f["field"] for f in error(res, 422, "invalid_request")["fields"]], body
    gone = ok(api.client.request("DELETE", "/api/v1/credentials/env-0042", admin))
    assert gone["account"] == "env-0042" and gone["revoked_at"]
    error(api.client.request("DELETE", "/api/v1/credentials/env-9999", admin), 404, "not_found")
    with Registry(api.db, create=False) as reg:
        actions = [(r["actor"], r["action"], r["target"]) for r in reg.db["audit"].rows_where(
            "action LIKE 'credentials.%'", order_by="id")]
    assert actions == [("tech-ito", "credentials.issue", "env-0042"), ("tech-ito", "credentials.rotate", "env-0042"),
                       ("admin-1", "credentials.issue", "fleet-2"), ("admin-1", "credentials.revoke", "env-0042")]


def test_tokens_issued_and_revoked_through_the_api(api):
    admin = api.tokens["admin"]
    made = ok(api.client.request("POST", "/api/v1/tokens", admin, json={"name": "grafana", "role": "platform"}), 201)
    assert made["name"] == "grafana" and made["role"] == "platform" and made["token"].startswith("iwk_")
    assert api.client.get("/metrics", made["token"]).status_code == 200  # the new token works at once
    listed = api.client.get("/api/v1/tokens", admin)
    assert [t["name"] for t in ok(listed)["items"]] == sorted([*ROLE_TOKENS.values(), "old-admin", "grafana"])
    assert made["token"] not in listed.text and hashlib.sha256(made["token"].encode()).hexdigest() not in listed.text
    assert all("token_hash" not in t and "token" not in t for t in listed.json()["items"])
    error(api.client.request("POST", "/api/v1/tokens", admin, json={"name": "grafana", "role": "viewer"}),
          409, "conflict")
    role = error(api.client.request("POST", "/api/v1/tokens", admin, json={"name": "x", "role": "root"}),
                 422, "invalid_request")
    assert role["fields"][0]["field"] == "role"
    name = error(api.client.request("POST", "/api/v1/tokens", admin, json={"name": "Has Space", "role": "viewer"}),
                 422, "invalid_request")
    assert name["fields"][0]["field"] == "name" and "not a token name" in name["fields"][0]["problem"]
    revoked = ok(api.client.request("DELETE", "/api/v1/tokens/grafana", admin))
    assert revoked["name"] == "grafana" and revoked["revoked_at"]
    error(api.client.get("/metrics", made["token"]), 401, "unauthorized")
    error(api.client.request("DELETE", "/api/v1/tokens/grafana", admin), 409, "conflict")
    error(api.client.request("DELETE", "/api/v1/tokens/nobody", admin), 404, "not_found")
    audit = ok(api.client.get("/api/v1/audit?limit=2", admin))["items"]
    assert [(a["actor"], a["action"], a["target"]) for a in audit] == [("admin-1", "token.revoke", "grafana"),
                                                                      ("admin-1", "token.issue", "grafana")]


# -- errors ---------------------------------------------------------------------

def test_errors_are_json_everywhere(api):
    admin = api.tokens["admin"]
    body = error(api.client.get("/api/v2/nodes", admin), 404, "not_found")
    assert "/api/v1" in body["detail"]
    res = api.client.request("DELETE", "/api/v1/summary", admin)
    assert "GET" in error(res, 405, "method_not_allowed")["detail"] and res.headers["allow"] == "GET"
    res = api.client.request("POST", "/api/v1/tokens", admin, content=b"{not json",
                             headers={"content-type": "application/json"})
    assert error(res, 400, "invalid_request")["detail"] == "the body is not valid JSON"
    missing = create_app(Settings(db=str(api.db.parent / "elsewhere" / "fleet.db")), dashboard=None)
    body = error(Client(missing).get("/api/v1/summary", admin), 503, "unavailable")
    assert "no registry at" in body["detail"]


def test_openapi_lists_every_route_with_the_bearer_scheme(api):
    doc = api.client.get("/openapi.json").json()
    assert doc["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http", "scheme": "bearer", "bearerFormat": "iwk_...",
        "description": doc["components"]["securitySchemes"]["HTTPBearer"]["description"]}
    listed = {(m.upper(), path) for path, ops in doc["paths"].items() for m in ops}
    assert listed == set(ACCESS)
    tags = {t["name"] for t in doc["tags"]}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op["security"] == [{"HTTPBearer": []}], (method, path)
            assert op["summary"] and op["tags"] and set(op["tags"]) <= tags, (method, path)
            roles = op["description"].rsplit("Roles: ", 1)[1].rstrip(".").split(", ")
            assert set(roles) == ACCESS[(method.upper(), path)], (method, path)
            assert op["responses"]["401"]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/Problem"}


# -- metrics --------------------------------------------------------------------

class Relay:
    """The relay's counting interface (fleet/relay.py): counts() and backlog()."""

    def counts(self):
        return {"delivered": 7, "failed": 1, "attempts": 9, "errors": 2, "backlog": 4}

    def backlog(self):
        return 4


def scrape(client, token) -> dict:
    res = client.get("/metrics", token)
    assert res.status_code == 200, res.text
    assert res.headers["content-type"].startswith("text/plain; version=")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(res.text) for s in family.samples}


def test_metrics_show_the_registry_and_the_live_counters(api, tmp_path):
    ingest = Ingest(Settings(db=str(api.db)))  # not started: zero counts, not connected
    app = create_app(Settings(db=str(api.db)), ingest=ingest, relay=Relay(), dashboard=None)
    client = Client(app)
    client.get("/api/v1/nodes", api.tokens["viewer"])
    client.get("/api/v1/nodes/env-9999", api.tokens["viewer"])
    client.get("/api/v1/summary")
    m = scrape(client, api.tokens["platform"])
    assert {k: v for k, v in m.items() if k[0] == "iwaki_nodes"} == {
        ("iwaki_nodes", (("state", s),)): 1.0 for s in ("online", "offline", "unknown")}
    assert m[("iwaki_alerts_open", (("severity", "warning"),))] == 2
    assert m[("iwaki_alerts_open", (("severity", "info"),))] == 1
    assert m[("iwaki_alerts_open", (("severity", "critical"),))] == 0
    assert m[("iwaki_telemetry_stored_total", ())] == N_TELEMETRY + 2
    assert m[("iwaki_invalid_total", ())] == 1 and m[("iwaki_duplicates_total", ())] == 1
    assert m[("iwaki_sequence_gaps", ())] == 2
    assert m[("iwaki_upstream_backlog", ())] == 1 and m[("iwaki_upstream_delivered_total", ())] == 2
    assert m[("iwaki_ingest_connected", ())] == 0 and m[("iwaki_ingest_received_total", ())] == 0
    assert m[("iwaki_ingest_messages_total", (("outcome", "stored"),))] == 0
    assert m[("iwaki_relay_delivered_total", ())] == 7 and m[("iwaki_relay_errors_total", ())] == 2
    assert m[("iwaki_relay_backlog", ())] == 4
    requests = {dict(k[1])["route"] + " " + dict(k[1])["status"]: v for k, v in m.items()
                if k[0] == "iwaki_api_requests_total"}
    assert requests == {"/api/v1/nodes 200": 1, "/api/v1/nodes/{node_id} 404": 1, "/api/v1/summary 401": 1}
    bare = scrape(api.client, api.tokens["viewer"])  # without ingest and relay: none of theirs
    assert not [k for k in bare if k[0].startswith(("iwaki_ingest", "iwaki_relay"))]


@pytest.mark.broker
def test_live_ingest_writes_while_the_api_reads(tmp_path, broker):
    settings = Settings(db=str(tmp_path / "fleet.db"), mqtt_port=broker.port, client_id="fleet-api-test")
    with Registry(settings.db) as reg:
        token = T.issue(reg, "ops", "operator")
    ingest = Ingest(settings, reconnect_delay=(0.1, 0.5)).start()
    node = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="api-test-node")
    node.connect("127.0.0.1", broker.port)
    node.loop_start()
    try:
        client = Client(create_app(settings, ingest=ingest, dashboard=None))
        totals = []
        for seq in range(40):
            node.publish(P.topic("telemetry"), P.encode(P.telemetry(seq=seq)), qos=1).wait_for_publish(5)
            totals.append(ok(client.get("/api/v1/summary", token))["telemetry_stored"])
        deadline = time.monotonic() + 10
        while ingest.counts()["stored"] < 40 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ok(client.get(f"/api/v1/nodes/{P.NODE}/telemetry?limit=1", token))["total"] == 80
        assert totals == sorted(totals)  # read while it grew, never an error
        m = scrape(client, token)
        assert m[("iwaki_ingest_connected", ())] == 1
        assert m[("iwaki_ingest_messages_total", (("outcome", "stored"),))] == 40
        assert m[("iwaki_telemetry_stored_total", ())] == 40
    finally:
        node.loop_stop()
        node.disconnect()
        ingest.stop()


@pytest.mark.broker
def test_a_command_reaches_the_node_its_answer_is_listed_and_it_is_audited(tmp_path, broker):
    settings = Settings(db=str(tmp_path / "fleet.db"), mqtt_port=broker.port, client_id="fleet-cmd-test")
    with Registry(settings.db) as reg:
        token = T.issue(reg, "night-shift", "operator")
        viewer = T.issue(reg, "wall", "viewer")
        reg.ingest(P.NODE, "birth", P.birth())
    ingest = Ingest(settings, reconnect_delay=(0.1, 0.5)).start()
    got = []

    def answer(client, userdata, message):          # the node: answers every command it gets
        cmd = json.loads(message.payload)
        got.append((message.topic, cmd))
        client.publish(P.topic("reply"), P.encode(P.reply(seq=len(got) - 1, id=cmd["id"],
                                                          result={"up_ms": 4242})), qos=1)

    node = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="cmd-test-node")
    node.on_message = answer
    node.connect("127.0.0.1", broker.port)
    node.loop_start()
    subscribe(node, f"iwaki/{P.NODE}/cmd/#")
    try:
        client = Client(create_app(settings, ingest=ingest, dashboard=None))
        sent = ok(client.request("POST", f"/api/v1/nodes/{P.NODE}/commands", token,
                                 json={"name": "ping"}), 202)
        assert (sent["node"], sent["name"], sent["node_state"]) == (P.NODE, "ping", "online")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not ok(client.get(sent["replies"], viewer))["total"]:
            time.sleep(0.05)
        assert got == [(f"iwaki/{P.NODE}/cmd/ping", {"v": 1, "id": sent["id"], "args": {}})]
        replies = ok(client.get(sent["replies"], viewer))["items"]
        assert [(r["cmd_id"], r["ok"], r["result"]) for r in replies] == [(sent["id"], True, {"up_ms": 4242})]
        with Registry(settings.db) as reg:
            audit = [(a["actor"], a["action"], a["target"], a["detail"]) for a in reg.db["audit"].rows]
        assert ("night-shift", "node.command", P.NODE, f"ping {sent['id']}") in audit
        # refused with a reason: an OTA (rollouts do that), an unknown node, no broker behind the API
        bad = error(client.request("POST", f"/api/v1/nodes/{P.NODE}/commands", token,
                                   json={"name": "ota", "args": {}}), 422, "invalid_request")
        assert "ping" in json.dumps(bad)
        error(client.request("POST", "/api/v1/nodes/env-9999/commands", token, json={"name": "ping"}),
              404, "not_found")
        offline = Client(create_app(settings, dashboard=None))
        assert "fleet serve" in error(offline.request("POST", f"/api/v1/nodes/{P.NODE}/commands", token,
                                                      json={"name": "health"}), 503, "unavailable")["detail"]
        assert len(got) == 1
    finally:
        node.loop_stop()
        node.disconnect()
        ingest.stop()


# -- real HTTP ------------------------------------------------------------------

def test_served_over_real_http_by_uvicorn(api):
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(api.app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            auth = {"Authorization": f"Bearer {api.tokens['operator']}"}
            nodes = http.get("/api/v1/nodes", params={"limit": 2}, headers=auth)
            assert nodes.status_code == 200 and nodes.json()["next_offset"] == 2
            refused = http.get("/api/v1/summary")
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
            acked = http.post(f"/api/v1/alerts/{api.alerts[(P.NODE, 'low_heap')]}/ack", headers=auth)
            assert acked.status_code == 200 and acked.json()["acked_by"] == "op-sato"
            metrics = http.get("/metrics", headers=auth)
            names = {f.name for f in text_string_to_metric_families(metrics.text)}
            assert {"iwaki_nodes", "iwaki_api_requests"} <= names
    finally:
        server.should_exit = True
        thread.join(10)


# -- the dashboard's files -------------------------------------------------------

def test_the_dashboard_is_served_without_a_token(api, tmp_path):
    page = tmp_path / "dash"
    page.mkdir()
    (page / "index.html").write_text("<!doctype html><title>Iwaki</title>")
    (page / "app.js").write_text("console.log('fleet')")
    client = Client(create_app(Settings(db=str(api.db)), dashboard=page))
    index = client.get("/")
    assert index.status_code == 200 and "<title>Iwaki</title>" in index.text
    assert index.headers["content-type"].startswith("text/html")
    script = client.get("/static/app.js")
    assert script.status_code == 200 and script.text == "console.log('fleet')"
    error(client.get("/static/missing.js"), 404, "not_found")
    error(client.get("/api/v1/summary"), 401, "unauthorized")  # the data still needs a token
    error(Client(create_app(Settings(db=str(api.db)), dashboard=tmp_path / "none")).get("/"), 404, "not_found")
