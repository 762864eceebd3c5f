"""The fleet's HTTP API (FastAPI), its Prometheus metrics and the dashboard's files.

    app = create_app(get_settings(), ingest=ingest, relay=relay)
    uvicorn.run(app, host="127.0.0.1", port=8080)

Every `/api/v1` route and `/metrics` needs `Authorization: Bearer <token>`
(tokens: fleet/tokens.py, `fleet tokens issue NAME --role ROLE`); each route
names the roles it accepts with `requires(...)`, and admin is accepted
everywhere. The reference for users is docs/api.md; the OpenAPI document is
at /openapi.json (and /docs).

Each request opens the registry (`Registry(settings.db, create=False)`) and
closes it when the response is sent; SQLite in WAL mode lets it read while
the ingest service writes. Handlers are `async` and do their short SQLite
work on the event loop's thread, because a sqlite3 connection belongs to
the thread that opened it and a request's dependencies and handler would
otherwise run on different worker threads.

Errors are JSON: `{"error": code, "detail": what to do}`, with `"fields"`
for a request that is not valid.
"""
from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, FastAPI, Path as PathParam, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from fleet import credentials, health, tokens
from fleet.metrics import CONTENT_TYPE, FleetMetrics
from fleet.registry import Registry, RegistryError, iso, utc_now
from fleet.settings import Settings

log = logging.getLogger("fleet.api")

PREFIX = "/api/v1"
DASHBOARD = Path(__file__).resolve().parent / "dashboard"
MAX_LIMIT = 1000
#: the roles that read the fleet (admin is accepted by every route)
READERS = ("viewer", "operator", "technician")
ALL_ROLES = tokens.ROLES
_DETAIL_ROWS = 100
_DETAIL_EVENTS = 20


# -- errors ---------------------------------------------------------------------

class ApiError(Exception):
    """An error answer: HTTP status, error code, a sentence a user can act on, and the bad fields."""

    def __init__(self, status: int, code: str, detail: str, fields: list[dict] | None = None,
                 headers: dict | None = None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.fields, self.headers = status, code, detail, fields, headers


class Field(BaseModel):
    field: str
    problem: str


class Problem(BaseModel):
    """Every error answer."""
    error: str
    detail: str
    fields: list[Field] | None = None


def error_response(status: int, code: str, detail: str, fields: list[dict] | None = None,
                   headers: dict | None = None) -> JSONResponse:
    body = {"error": code, "detail": detail}
    if fields is not None:
        body["fields"] = fields
    return JSONResponse(body, status_code=status, headers=headers)


def invalid(field: str, problem: str) -> ApiError:
    return ApiError(422, "invalid_request", f"{field}: {problem}", [{"field": field, "problem": problem}])


_ERRORS = {  # shown in the OpenAPI document of every route
    401: {"model": Problem, "description": "no token, or an unknown or revoked one (`unauthorized`)"},
    403: {"model": Problem, "description": "the token's role may not do this (`forbidden`)"},
    422: {"model": Problem, "description": "a parameter or the body is not valid (`invalid_request`)"},
    503: {"model": Problem, "description": "the registry cannot be opened (`unavailable`)"},
}
_NOT_FOUND = {404: {"model": Problem, "description": "no such item (`not_found`)"}}
_CONFLICT = {409: {"model": Problem, "description": "the item is in a state that does not allow this (`conflict`)"}}


# -- dependencies: the registry, the caller, paging and time ranges --------------

async def open_registry(request: Request) -> AsyncIterator[Registry]:
    """The registry for one request, closed after it."""
    try:
        reg = Registry(request.app.state.settings.db, create=False)
    except RegistryError as exc:
        raise ApiError(503, "unavailable", str(exc)) from None
    try:
        yield reg
    finally:
        reg.close()


Reg = Annotated[Registry, Depends(open_registry)]
bearer = HTTPBearer(auto_error=False, bearerFormat="iwk_...",
                    description="A token from `fleet tokens issue NAME --role ROLE` or POST /api/v1/tokens")


@dataclass(frozen=True)
class Caller:
    """Who is calling: the token's name (the actor in the audit log) and its role."""
    name: str
    role: str


def requires(*roles: str) -> Callable:
    """A dependency that lets through a valid token with one of `roles` (or admin) and
    returns the `Caller`; 401 without a valid token, 403 for another role."""
    unknown = set(roles) - set(ALL_ROLES)
    if unknown:
        raise ValueError(f"unknown roles {sorted(unknown)}")
    allowed = ("admin",) + tuple(r for r in roles if r != "admin")

    async def check(reg: Reg, auth: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Caller:
        if auth is None:
            raise ApiError(401, "unauthorized", "send your token as 'Authorization: Bearer <token>' "
                           "(an admin makes one with `fleet tokens issue NAME --role ROLE`)",
                           headers={"WWW-Authenticate": "Bearer"})
        found = tokens.verify(reg, auth.credentials)
        if found is None:
            raise ApiError(401, "unauthorized", "this token is unknown or revoked; ask an admin for a new one",
                           headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        if found["role"] not in allowed:
            raise ApiError(403, "forbidden", f"this needs the role {' or '.join(allowed)}; "
                           f"the token {found['name']!r} has the role {found['role']}")
        return Caller(found["name"], found["role"])

    check.roles = allowed
    return check


@dataclass(frozen=True)
class Page:
    limit: int
    offset: int


def paging(limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="items per page (1..1000)")] = 100,
           offset: Annotated[int, Query(ge=0, description="items to skip")] = 0) -> Page:
    return Page(limit, offset)


Paging = Annotated[Page, Depends(paging)]


@dataclass(frozen=True)
class TimeRange:
    """`since <= received_at < until`, as registry times (either may be open)."""
    since: str | None
    until: str | None

    def where(self, column: str = "received_at") -> tuple[list[str], list[str]]:
        clauses, args = [], []
        if self.since:
            clauses.append(f"{column} >= ?")
            args.append(self.since)
        if self.until:
            clauses.append(f"{column} < ?")
            args.append(self.until)
        return clauses, args


def parse_time(field: str, text: str) -> str:
    """An ISO 8601 time with a zone (`Z` or an offset) as a registry time; 422 otherwise."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise invalid(field, f"{text!r} is not an ISO 8601 time like 2024-05-01T12:00:00Z") from None
    if when.tzinfo is None:
        raise invalid(field, f"{text!r} has no time zone: add Z for UTC or an offset like +09:00")
    return iso(when)


def time_range(since: Annotated[str | None, Query(description="from this time on (ISO 8601 with a zone)")] = None,
               until: Annotated[str | None, Query(description="before this time (ISO 8601 with a zone)")] = None
               ) -> TimeRange:
    start = parse_time("since", since) if since else None
    end = parse_time("until", until) if until else None
    if start and end and start >= end:
        raise invalid("until", f"until ({until}) must be later than since ({since})")
    return TimeRange(start, end)


Times = Annotated[TimeRange, Depends(time_range)]


def page_of(reg: Registry, page: Page, sql: str, args: list, order: str,
            row: Callable[[dict], dict] = lambda r: r) -> dict:
    """One page of `sql` (a SELECT without ORDER BY) in the API's list shape."""
    total = reg.db.execute(f"SELECT count(*) FROM ({sql})", args).fetchone()[0]
    items = [row(r) for r in reg.db.query(f"{sql} ORDER BY {order} LIMIT ? OFFSET ?",
                                          [*args, page.limit, page.offset])]
    return _page(items, total, page)


def page_of_list(rows: list[dict], page: Page) -> dict:
    return _page(rows[page.offset:page.offset + page.limit], len(rows), page)


def _page(items: list, total: int, page: Page) -> dict:
    following = page.offset + page.limit
    return {"items": items, "total": total, "limit": page.limit, "offset": page.offset,
            "next_offset": following if following < total else None}


def _where(clauses: list[str]) -> str:
    return " WHERE " + " AND ".join(clauses) if clauses else ""


def _decoded(column: str) -> Callable[[dict], dict]:
    def decode(row: dict) -> dict:
        row[column] = json.loads(row[column]) if row[column] else None
        return row
    return decode


def _node_or_404(reg: Registry, node_id: str) -> dict:
    row = reg.node(node_id)
    if row is None:
        raise ApiError(404, "not_found", f"no node {node_id!r} in the registry (GET {PREFIX}/nodes lists them)")
    return _decoded("channels")(row)


def _node_where(node_id: str, times: TimeRange, **equal) -> tuple[list[str], list]:
    """The clauses of one node's rows in a time range, with `column = value` for each value given."""
    clauses, args = times.where()
    clauses, args = ["node = ?", *clauses], [node_id, *args]
    for column, value in equal.items():
        if value:
            clauses.append(f"{column} = ?")
            args.append(value)
    return clauses, args


NodeId = Annotated[str, PathParam(description="the node id, as in its topics (env-0001)")]


# -- summary --------------------------------------------------------------------

summary_router = APIRouter(prefix=PREFIX, tags=["summary"], responses=_ERRORS)


@summary_router.get("/summary", summary="The fleet at a glance")
async def get_summary(reg: Reg, _: Annotated[Caller, Depends(requires(*READERS))]) -> dict:
    """Node counts by state, nodes with open alerts, stored and refused messages, messages missing
    in open gaps (`gaps`) and the upstream outbox: entities waiting for the city platform
    (`backlog`), delivered, and refused by it for good (`failed`)."""
    one = lambda sql: reg.db.execute(sql).fetchone()[0]  # noqa: E731
    states = dict(reg.db.execute("SELECT state, count(*) FROM nodes GROUP BY state").fetchall())
    stats = reg.stats()
    return {
        "nodes": stats["nodes"],
        **{s: states.get(s, 0) for s in ("online", "offline", "unknown")},
        "alerting": one("SELECT count(DISTINCT node) FROM alerts WHERE closed_at IS NULL"),
        "alerts_open": one("SELECT count(*) FROM alerts WHERE closed_at IS NULL"),
        "telemetry_stored": stats["telemetry_stored"],
        "invalid": stats["invalid"],
        "gaps": stats["gaps"],
        "relay": {"backlog": one("SELECT count(*) FROM upstream WHERE delivered_at IS NULL AND failed_at IS NULL"),
                  "delivered": one("SELECT count(*) FROM upstream WHERE delivered_at IS NOT NULL"),
                  "failed": one("SELECT count(*) FROM upstream WHERE failed_at IS NOT NULL")},
        "generated_at": iso(utc_now()),
    }


# -- nodes ----------------------------------------------------------------------

nodes_router = APIRouter(prefix=PREFIX + "/nodes", tags=["nodes"], responses=_ERRORS)

_LATEST_HEALTH = ("SELECT heap_free, rssi, lag_max_ms, overruns, outbox_depth, received_at FROM health "
                  "WHERE node = ? ORDER BY received_at DESC, id DESC LIMIT 1")
_TELEMETRY_COLUMNS = "ts, received_at, n, min, max, mean, last, sum, boot, seq"


@nodes_router.get("", summary="List the nodes")
async def list_nodes(reg: Reg, page: Paging,
                     _: Annotated[Caller, Depends(requires(*READERS, "platform"))],
                     state: Annotated[Literal["online", "offline", "unknown"] | None,
                                      Query(description="only nodes in this state")] = None) -> dict:
    """Every node (by id) with its registry record, its open alert count and its latest health."""
    clauses, args = (["state = ?"], [state]) if state else ([], [])

    def row(r: dict) -> dict:
        r = _decoded("channels")(r)
        latest = list(reg.db.query(_LATEST_HEALTH, [r["id"]]))
        return r | {"health": latest[0] if latest else None}

    return page_of(reg, page, "SELECT n.*, (SELECT count(*) FROM alerts a WHERE a.node = n.id "
                   "AND a.closed_at IS NULL) AS alerts_open FROM nodes n" + _where(clauses), args, "id", row)


@nodes_router.get("/{node_id}", summary="One node in detail", responses=_NOT_FOUND)
async def get_node(reg: Reg, node_id: NodeId, _: Annotated[Caller, Depends(requires(*READERS))]) -> dict:
    """The node's record; its last 100 health reports (newest first); per channel its last 100
    telemetry windows (oldest first, for charts); its open alerts and gaps; its last 20 events."""
    node = _node_or_404(reg, node_id)
    health_rows = [_decoded("payload")(r) for r in reg.db.query(
        "SELECT * FROM health WHERE node = ? ORDER BY received_at DESC, id DESC LIMIT ?", [node_id, _DETAIL_ROWS])]
    channels = sorted(set(node["channels"] or {}) | {r[0] for r in reg.db.execute(
        "SELECT DISTINCT channel FROM telemetry WHERE node = ?", [node_id])})
    telemetry = {ch: list(reg.db.query(
        f"SELECT * FROM (SELECT {_TELEMETRY_COLUMNS}, id FROM telemetry WHERE node = ? AND channel = ? "
        "ORDER BY received_at DESC, id DESC LIMIT ?) ORDER BY received_at, id", [node_id, ch, _DETAIL_ROWS]))
        for ch in channels}
    for rows in telemetry.values():
        for r in rows:
            del r["id"]
    return node | {
        "health": health_rows,
        "telemetry": telemetry,
        "alerts": list(reg.db.query("SELECT * FROM alerts WHERE node = ? AND closed_at IS NULL "
                                    "ORDER BY opened_at DESC, id DESC", [node_id])),
        "gaps": list(reg.db.query(_GAPS + " WHERE node = ? ORDER BY boot, from_seq", [node_id])),
        "events": [_decoded("data")(r) for r in reg.db.query(
            "SELECT * FROM events WHERE node = ? ORDER BY received_at DESC, id DESC LIMIT ?",
            [node_id, _DETAIL_EVENTS])],
    }


@nodes_router.get("/{node_id}/telemetry", summary="A node's telemetry windows", responses=_NOT_FOUND)
async def node_telemetry(reg: Reg, node_id: NodeId, page: Paging, times: Times,
                         _: Annotated[Caller, Depends(requires(*READERS, "platform"))],
                         channel: Annotated[str | None, Query(description="only this channel")] = None) -> dict:
    """One row per channel and reporting window, oldest first, filtered on received_at."""
    _node_or_404(reg, node_id)
    clauses, args = _node_where(node_id, times, channel=channel)
    return page_of(reg, page, f"SELECT id, channel, {_TELEMETRY_COLUMNS}, clock_set FROM telemetry"
                   + _where(clauses), args, "received_at, id")


@nodes_router.get("/{node_id}/health", summary="A node's health reports", responses=_NOT_FOUND)
async def node_health(reg: Reg, node_id: NodeId, page: Paging, times: Times,
                      _: Annotated[Caller, Depends(requires(*READERS))]) -> dict:
    """Newest first; `payload` is the report as the node sent it."""
    _node_or_404(reg, node_id)
    clauses, args = times.where()
    return page_of(reg, page, "SELECT * FROM health" + _where(["node = ?", *clauses]), [node_id, *args],
                   "received_at DESC, id DESC", _decoded("payload"))


class CommandRequest(BaseModel):
    """A command for one node (docs/mqtt.md, cmd and reply). OTA updates go through rollouts."""
    model_config = ConfigDict(extra="forbid")
    name: Literal["ping", "health"]
    args: dict = {}


_UNAVAILABLE = {503: {"model": Problem, "description": "the fleet cannot reach the nodes' broker now (`unavailable`)"}}


@nodes_router.post("/{node_id}/commands", status_code=202, summary="Send a command to a node",
                   responses=_NOT_FOUND | _UNAVAILABLE)
async def send_command(request: Request, reg: Reg, node_id: NodeId, body: CommandRequest,
                       caller: Annotated[Caller, Depends(requires("operator", "technician"))]) -> dict:
    """`ping` (the node answers with its uptime) or `health` (it publishes a health report now).
    Sent with QoS 1 once the broker has it (202); the node's answer arrives in
    `GET .../replies?cmd_id=<id>`. A node that is offline gets it when it reconnects, if its
    broker session kept it. Every command is in the audit log (`node.command`)."""
    node = _node_or_404(reg, node_id)
    ingest = getattr(request.app.state, "ingest", None)
    if ingest is None:
        raise ApiError(503, "unavailable", "this API is not connected to the nodes' broker; "
                       "send commands through the API of `fleet serve`")
    from fleet.ingest import IngestError
    sent_at = iso(utc_now())  # before it leaves: a fast node's answer is never "earlier"
    try:
        cmd_id = await run_in_threadpool(ingest.command, node_id, body.name, body.args)
    except IngestError as exc:
        raise ApiError(503, "unavailable", str(exc)) from None
    with reg.transaction():
        reg.db["audit"].insert({"at": sent_at, "actor": caller.name, "action": "node.command", "target": node_id,
                                "detail": f"{body.name} {cmd_id}"})
    return {"id": cmd_id, "node": node_id, "name": body.name, "args": body.args, "sent_at": sent_at,
            "node_state": node["state"], "replies": f"{PREFIX}/nodes/{node_id}/replies?cmd_id={cmd_id}"}


@nodes_router.get("/{node_id}/replies", summary="A node's answers to commands", responses=_NOT_FOUND)
async def node_replies(reg: Reg, node_id: NodeId, page: Paging, times: Times,
                       _: Annotated[Caller, Depends(requires(*READERS))],
                       cmd_id: Annotated[str | None, Query(description="only the answers to this command")] = None
                       ) -> dict:
    """Newest first; `result` is what the node answered, `error` why it could not."""
    _node_or_404(reg, node_id)
    clauses, args = _node_where(node_id, times, cmd_id=cmd_id)

    def row(r: dict) -> dict:
        r = _decoded("result")(r)
        r["ok"] = bool(r["ok"])
        return r

    return page_of(reg, page, "SELECT * FROM replies" + _where(clauses), args, "received_at DESC, id DESC", row)


# -- events, alerts, gaps -------------------------------------------------------

events_router = APIRouter(prefix=PREFIX, tags=["events"], responses=_ERRORS)
alerts_router = APIRouter(prefix=PREFIX, tags=["alerts"], responses=_ERRORS)
gaps_router = APIRouter(prefix=PREFIX, tags=["gaps"], responses=_ERRORS)

_GAPS = "SELECT id, node, boot, from_seq, to_seq, to_seq - from_seq + 1 AS missing, detected_at FROM gaps"


@events_router.get("/events", summary="Events the nodes reported")
async def list_events(reg: Reg, page: Paging, times: Times,
                      _: Annotated[Caller, Depends(requires(*READERS, "platform"))],
                      node: Annotated[str | None, Query(description="only this node")] = None,
                      severity: Annotated[Literal["info", "warning", "critical"] | None,
                                          Query(description="only this severity")] = None) -> dict:
    """Newest first; `data` is the event's data object."""
    clauses, args = times.where()
    for column, value in (("node", node), ("severity", severity)):
        if value:
            clauses.append(f"{column} = ?")
            args.append(value)
    return page_of(reg, page, "SELECT * FROM events" + _where(clauses), args, "received_at DESC, id DESC",
                   _decoded("data"))


@alerts_router.get("/alerts", summary="Health alerts")
async def list_alerts(reg: Reg, page: Paging, _: Annotated[Caller, Depends(requires(*READERS))],
                      state: Annotated[Literal["open", "closed", "all"],
                                       Query(description="open (default), closed or all")] = "open",
                      node: Annotated[str | None, Query(description="only this node")] = None) -> dict:
    """Newest first. An alert is open while its condition holds; `acked_by` names who has seen it."""
    clauses, args = {"open": ["closed_at IS NULL"], "closed": ["closed_at IS NOT NULL"], "all": []}[state], []
    if node:
        clauses = [*clauses, "node = ?"]
        args.append(node)
    return page_of(reg, page, "SELECT * FROM alerts" + _where(clauses), args, "opened_at DESC, id DESC")


@alerts_router.post("/alerts/{alert_id}/ack", summary="Acknowledge an alert",
                    responses=_NOT_FOUND | _CONFLICT)
async def ack_alert(reg: Reg, alert_id: int, caller: Annotated[Caller, Depends(requires("operator"))]) -> dict:
    """Record that you have seen the alert (the audit log names your token); it stays open
    until its condition clears. 409 for a closed alert."""
    if next(reg.db["alerts"].rows_where("id = ?", [alert_id]), None) is None:
        raise ApiError(404, "not_found", f"no alert {alert_id} (GET {PREFIX}/alerts lists them)")
    try:
        return health.acknowledge(reg, alert_id, caller.name)
    except health.AlertError as exc:
        raise ApiError(409, "conflict", str(exc)) from None


@gaps_router.get("/gaps", summary="Open sequence gaps")
async def list_gaps(reg: Reg, page: Paging, _: Annotated[Caller, Depends(requires(*READERS))],
                    node: Annotated[str | None, Query(description="only this node")] = None) -> dict:
    """Ranges of messages a node sent but the fleet never received (`missing` of them), by node,
    boot and sequence number. A gap closes when its messages arrive late."""
    clauses, args = (["node = ?"], [node]) if node else ([], [])
    return page_of(reg, page, _GAPS + _where(clauses), args, "node, boot, from_seq")


# -- credentials, tokens, audit (administration) --------------------------------

credentials_router = APIRouter(prefix=PREFIX + "/credentials", tags=["credentials"], responses=_ERRORS)
tokens_router = APIRouter(prefix=PREFIX + "/tokens", tags=["tokens"], responses=_ERRORS)
audit_router = APIRouter(prefix=PREFIX, tags=["audit"], responses=_ERRORS)


class CredentialRequest(BaseModel):
    """Issue (or with rotate, replace) an MQTT account's password."""
    model_config = ConfigDict(extra="forbid")
    account: str
    kind: Literal["node", "fleet", "platform"] = "node"
    rotate: bool = False


class TokenRequest(BaseModel):
    """Issue an API token."""
    model_config = ConfigDict(extra="forbid")
    name: str
    role: Literal["admin", "operator", "technician", "viewer", "platform"]


@credentials_router.get("", summary="List MQTT accounts")
async def list_credentials(reg: Reg, page: Paging, _: Annotated[Caller, Depends(requires())]) -> dict:
    """Every broker account (by name), live or revoked; never a password or its hash."""
    return page_of_list(credentials.accounts(reg), page)


@credentials_router.post("", status_code=201, summary="Issue MQTT credentials", responses=_CONFLICT)
async def issue_credentials(reg: Reg, body: CredentialRequest,
                            caller: Annotated[Caller, Depends(requires("technician"))]) -> dict:
    """The password is in this answer only; the registry keeps its hash. Technicians may issue
    node accounts (provisioning a board); other kinds need admin. 409 when the account exists
    (send rotate: true to replace its password) or has another kind. The broker learns of it
    after `fleet broker-config` and a reload."""
    if caller.role != "admin" and body.kind != "node":
        raise ApiError(403, "forbidden", f"issuing {body.kind} credentials needs the role admin; "
                       f"the token {caller.name!r} has the role {caller.role} (node only)")
    exists = next(reg.db["credentials"].rows_where("account = ?", [body.account]), None) is not None
    try:
        password = credentials.issue(reg, body.account, body.kind, caller.name, body.rotate)
    except credentials.CredentialError as exc:
        if exists:
            raise ApiError(409, "conflict", str(exc)) from None
        raise invalid("account", str(exc)) from None
    return {"account": body.account, "kind": body.kind, "password": password}


@credentials_router.delete("/{account}", summary="Revoke MQTT credentials", responses=_NOT_FOUND)
async def revoke_credentials(reg: Reg, account: str, caller: Annotated[Caller, Depends(requires())]) -> dict:
    """The account's record, now revoked; it is locked out after `fleet broker-config` and a broker reload."""
    try:
        credentials.revoke(reg, account, caller.name)
    except credentials.CredentialError as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    return next(a for a in credentials.accounts(reg) if a["account"] == account)


def _token_error(exc: tokens.TokenError) -> ApiError:
    if exc.code == "invalid_request":
        return invalid("name", str(exc))
    return ApiError({"not_found": 404, "conflict": 409}[exc.code], exc.code, str(exc))


@tokens_router.get("", summary="List API tokens")
async def list_tokens(reg: Reg, page: Paging, _: Annotated[Caller, Depends(requires())]) -> dict:
    """Every token's name, role, who made it and when, when it was last used (to the minute)
    and whether it is revoked; never the token or its hash."""
    return page_of_list(tokens.tokens(reg), page)


@tokens_router.post("", status_code=201, summary="Issue an API token", responses=_CONFLICT)
async def issue_token(reg: Reg, body: TokenRequest, caller: Annotated[Caller, Depends(requires())]) -> dict:
    """The token is in this answer only; the registry keeps its SHA-256. A name with a live
    token is a conflict (409): revoke it first to replace it."""
    try:
        token = tokens.issue(reg, body.name, body.role, caller.name)
    except tokens.TokenError as exc:
        raise _token_error(exc) from None
    return {"name": body.name, "role": body.role, "token": token}


@tokens_router.delete("/{name}", summary="Revoke an API token", responses=_NOT_FOUND | _CONFLICT)
async def revoke_token(reg: Reg, name: str, caller: Annotated[Caller, Depends(requires())]) -> dict:
    """The token is refused from now on; returns its record."""
    try:
        return tokens.revoke(reg, name, caller.name)
    except tokens.TokenError as exc:
        raise _token_error(exc) from None


@audit_router.get("/audit", summary="The audit log")
async def list_audit(reg: Reg, page: Paging, _: Annotated[Caller, Depends(requires())]) -> dict:
    """Who did what and when (credentials, tokens, alert acknowledgements), newest first."""
    return page_of(reg, page, "SELECT * FROM audit", [], "at DESC, id DESC")


# -- metrics --------------------------------------------------------------------

metrics_router = APIRouter(tags=["metrics"], responses=_ERRORS)


@metrics_router.get("/metrics", summary="Prometheus metrics", response_class=Response,
                    responses={200: {"content": {CONTENT_TYPE: {}}, "description": "the text exposition format"}})
async def get_metrics(request: Request, _: Annotated[Caller, Depends(requires(*ALL_ROLES))]) -> Response:
    """The fleet's metrics in the Prometheus text format, read from the registry now
    (names and meanings in docs/api.md). Any valid token may scrape."""
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE)


ROUTERS = (summary_router, nodes_router, events_router, alerts_router, gaps_router, credentials_router,
           tokens_router, audit_router, metrics_router)



def _document_roles() -> None:
    """Put each route's roles (from its `requires(...)`) in its OpenAPI description;
    a route without a role check is a bug, refused here at import."""
    for router in ROUTERS:
        for route in router.routes:
            roles = [d.call.roles for d in route.dependant.dependencies if hasattr(d.call, "roles")]
            if len(roles) != 1:
                raise RuntimeError(f"{route.path} needs exactly one requires(...), not {len(roles)}")
            route.description = (route.description or "").rstrip() + "\n\nRoles: " + ", ".join(roles[0]) + "."


_document_roles()

TAGS = [
    {"name": "summary", "description": "The fleet at a glance."},
    {"name": "nodes", "description": "Nodes, their telemetry and their health reports."},
    {"name": "events", "description": "Events the nodes reported (sensor faults, restarts...)."},
    {"name": "alerts", "description": "Health alerts; operators acknowledge them."},
    {"name": "gaps", "description": "Messages lost between the nodes and the fleet."},
    {"name": "credentials", "description": "Per-device MQTT accounts (passwords shown once)."},
    {"name": "tokens", "description": "API tokens and their roles (tokens shown once)."},
    {"name": "audit", "description": "Who did what."},
    {"name": "metrics", "description": "Prometheus metrics."},
    {"name": "releases", "description": "Signed OTA releases (fleet/api_ota.py)."},
    {"name": "rollouts", "description": "OTA releases sent to the nodes in waves; pause, resume, abort."},
    {"name": "provision", "description": "Node identities for new boards (fleet/api_provision.py)."},
]


# -- the app --------------------------------------------------------------------

def create_app(settings: Settings, *, ingest=None, relay=None, dashboard: Path | None = DASHBOARD) -> FastAPI:
    """The API for the registry at `settings.db`.

    `ingest` (a running `fleet.ingest.Ingest`) and `relay` (with `counts()` and
    `backlog()`) add their live counters to /metrics; `ingest` also sends the
    node commands (without it, those answer 503). The dashboard's files
    in `dashboard` (fleet/dashboard/) are served at / and /static when that
    directory has an index.html.
    """
    app = FastAPI(title="Iwaki fleet API", version="1",
                  description="The Iwaki sensor fleet: nodes, telemetry, health, alerts, credentials "
                              "and tokens. Every route needs `Authorization: Bearer <token>`; "
                              "see docs/api.md for the roles.",
                  openapi_tags=TAGS)
    app.state.settings = settings
    app.state.ingest = ingest
    app.state.metrics = FleetMetrics(settings.db, ingest=ingest, relay=relay)
    for router in ROUTERS:
        app.include_router(router)
    from fleet.api_ota import ROUTERS as OTA_ROUTERS  # imported here: fleet/api_ota.py builds on this module
    for router in OTA_ROUTERS:
        app.include_router(router)
    from fleet.api_provision import provision_router  # builds on this module, as fleet/api_ota.py does
    app.include_router(provision_router)
    for exc_type, handler in _HANDLERS.items():
        app.add_exception_handler(exc_type, handler)
    app.add_middleware(_CountRequests, metrics=app.state.metrics)
    if dashboard is not None and (Path(dashboard) / "index.html").is_file():
        index = Path(dashboard) / "index.html"

        @app.get("/", include_in_schema=False)
        async def dashboard_page() -> FileResponse:
            return FileResponse(index)

        app.mount("/static", StaticFiles(directory=dashboard), name="static")
    return app


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.detail, exc.fields, exc.headers)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        return error_response(404, "not_found", f"nothing at {request.url.path}; the API is under {PREFIX} "
                              "(routes in /openapi.json)")
    if exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow", "")
        return error_response(405, "method_not_allowed", f"{request.method} is not allowed on {request.url.path}"
                              + (f"; use {allow}" if allow else ""), headers=exc.headers)
    code = "invalid_request" if exc.status_code in (400, 413, 422) else "error"
    return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    fields = []
    for e in exc.errors():
        loc = [str(part) for part in e.get("loc", ()) if part not in ("query", "path", "body", "header")]
        fields.append({"field": ".".join(loc) or "body", "problem": e.get("msg", "not valid")})
    bad_json = any(e.get("type") == "json_invalid" for e in exc.errors())
    detail = "the body is not valid JSON" if bad_json else "; ".join(f"{f['field']}: {f['problem']}" for f in fields)
    return error_response(400 if bad_json else 422, "invalid_request", detail, fields)


async def _registry_error(request: Request, exc: Exception) -> JSONResponse:
    log.warning("registry unavailable for %s %s: %s", request.method, request.url.path, exc,
                exc_info=isinstance(exc, sqlite3.Error))
    detail = str(exc) if isinstance(exc, RegistryError) else f"the registry is busy or unreadable ({exc}); retry"
    return error_response(503, "unavailable", detail)


_HANDLERS = {ApiError: _api_error, StarletteHTTPException: _http_error, RequestValidationError: _validation_error,
             RegistryError: _registry_error, sqlite3.OperationalError: _registry_error}


class _CountRequests:
    """ASGI middleware: count each request under its route template and status for /metrics."""

    def __init__(self, app, metrics: FleetMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_and_see(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_see)
        finally:
            self.metrics.count_request(getattr(scope.get("route"), "path", None) or "unmatched", status)
