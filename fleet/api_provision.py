"""Provisioning a board: `POST /api/v1/provision` gives a node its identity.

    POST /api/v1/provision {"board": "env-station", "site": "taira-3"}                  # the next free env-NNNN
    POST /api/v1/provision {"board": "env-station", "site": "taira-3", "node": "env-0007", "replace": true}

The answer is everything `tools.provision` writes into the board's
identity.json: the node id, its own MQTT account and a new password (shown
in this answer only: the registry keeps its hash, fleet/credentials.py), the
broker the node should use (`IWAKI_NODE_BROKER_HOST`/`_PORT`, else the
fleet's own `IWAKI_MQTT_HOST`/`_PORT`), the topic root, the CA certificate
(`IWAKI_NODE_CA`, else null), the OTA public key (fleet/keys.py; an empty
list while the fleet has no signing key, which the tool reports), and the URL
nodes fetch updates from (`IWAKI_NODE_FLEET_URL`, else the http:// URL the
request came in on).

A new node id is the board's prefix (env, gate, ev, river; other boards use
their name) and one more than the highest number ever given with that prefix,
counting revoked accounts too, so an id is never reused. A named node keeps
its id; if its account is live, `replace: true` is needed and issues a new
password (the board holding the old one is locked out at the next broker
reload). With `IWAKI_BROKER_CONF_DIR` set the broker's password and ACL files
are rewritten at once, and with `IWAKI_BROKER_PID_FILE` mosquitto is told to
reload them (SIGHUP); `broker_updated` in the answer says whether that
happened. Every provisioning is in the audit log (`node.provision`).
"""
from __future__ import annotations

import logging
import os
import re
import signal
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from fleet import credentials
from fleet import keys as K
from fleet.api import _CONFLICT, _ERRORS, PREFIX, ApiError, Caller, Reg, invalid, requires
from fleet.registry import Registry, iso, utc_now
from fleet.settings import Settings

log = logging.getLogger("fleet.api_provision")

BOARDS_DIR = Path(__file__).resolve().parents[1] / "boards"
#: node id prefix per board name (the demo's mix of boards, too); other boards use their own name
PREFIXES = {"env-station": "env", "people-gate": "gate", "ev-charger": "ev", "river-station": "river"}
_ID = re.compile(r"^[a-z0-9][a-z0-9-]{1,31}$")
_SITE = re.compile(r"^[\w][\w .,/#()-]{0,63}$")


class ProvisionRequest(BaseModel):
    """Ask for a node identity for one board."""
    model_config = ConfigDict(extra="forbid")
    board: str = Field(description="the board profile's name, as in boards/<name>.toml (env-station)")
    site: str = Field(description="where the board is installed, for the audit log and the work log")
    node: str | None = Field(None, description="keep this node id (default: the next free one for the board)")
    replace: bool = Field(False, description="issue a new password for a node whose account is live")


def known_boards(boards_dir: Path = BOARDS_DIR) -> list[str]:
    """The board names the fleet knows (boards/*.toml); empty when the fleet host has no boards/."""
    return sorted(p.stem for p in boards_dir.glob("*.toml"))


def prefix_of(board: str) -> str:
    return PREFIXES.get(board, board)


def next_node_id(reg: Registry, prefix: str) -> str:
    """`<prefix>-NNNN`, one above the highest number used by a node or an account (revoked ones too)."""
    pattern = re.compile(r"^%s-(\d{4,})$" % re.escape(prefix))
    used = [r[0] for r in reg.db.execute("SELECT id FROM nodes UNION SELECT account FROM credentials")]
    highest = max((int(m.group(1)) for u in used if (m := pattern.match(u))), default=0)
    return "%s-%04d" % (prefix, highest + 1)


def fleet_url(settings: Settings, request: Request) -> str | None:
    """Where nodes fetch OTA files: the setting, else the http:// URL this request came in on."""
    if settings.node_fleet_url:
        return settings.node_fleet_url.rstrip("/")
    base = str(request.base_url).rstrip("/")
    return base if base.startswith("http://") else None


def ota_keys() -> list[str]:
    """The current OTA public key (a list of one), or [] while the fleet has none (fleet/keys.py)."""
    try:
        return [next(iter(K.public_keys().values()))]
    except K.KeysError:
        return []


def read_ca(settings: Settings) -> str | None:
    if not settings.node_ca:
        return None
    try:
        pem = Path(settings.node_ca).read_text()
    except OSError as exc:
        raise ApiError(503, "unavailable", f"IWAKI_NODE_CA={settings.node_ca} cannot be read "
                       f"({exc.strerror or exc}); an admin must fix the fleet's settings") from None
    if "-----BEGIN CERTIFICATE-----" not in pem:
        raise ApiError(503, "unavailable", f"IWAKI_NODE_CA={settings.node_ca} is not a PEM certificate; "
                       "an admin must fix the fleet's settings")
    return pem


def update_broker(reg: Registry, settings: Settings) -> bool:
    """Rewrite the broker's passwd/acl (IWAKI_BROKER_CONF_DIR) and SIGHUP it (IWAKI_BROKER_PID_FILE).
    True when both are configured and were done; problems are logged, not raised."""
    if not settings.broker_conf_dir:
        return False
    try:
        credentials.broker_config(reg, settings.broker_conf_dir, settings.root)
    except OSError as exc:
        log.warning("cannot rewrite the broker's files in %s: %s", settings.broker_conf_dir, exc)
        return False
    if not settings.broker_pid_file:
        return False
    try:
        pid = int(Path(settings.broker_pid_file).read_text().split()[0])
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError, IndexError) as exc:
        log.warning("cannot tell the broker to reload (pid file %s): %s", settings.broker_pid_file, exc)
        return False
    return True


provision_router = APIRouter(prefix=PREFIX, tags=["provision"], responses=_ERRORS)


@provision_router.post("/provision", status_code=201, summary="Provision a board", responses=_CONFLICT)
async def provision(reg: Reg, request: Request, body: ProvisionRequest,
                    caller: Annotated[Caller, Depends(requires("technician"))]) -> dict:
    """A node identity for a board: node id, MQTT account and password (in this answer only),
    broker, topic root, CA, OTA public keys and the fleet's URL for updates. 409 when the named
    node's account is live and `replace` is false, or the name belongs to a non-node account."""
    settings: Settings = request.app.state.settings
    boards = known_boards()
    if not _ID.match(body.board) or (boards and body.board not in boards):
        raise invalid("board", f"unknown board {body.board!r}" + (f" (boards: {', '.join(boards)})" if boards else ""))
    site = body.site.strip()
    if not _SITE.match(site):
        raise invalid("site", f"{body.site!r} is not a site name (1-64 letters, digits, spaces and . , / # ( ) -)")
    if body.node is not None and not _ID.match(body.node):
        raise invalid("node", f"{body.node!r} is not a node id (2-32 of a-z, 0-9, '-')")
    ca = read_ca(settings)
    node = body.node or next_node_id(reg, prefix_of(body.board))
    row = next(reg.db["credentials"].rows_where("account = ?", [node]), None)
    if row and row["kind"] != "node":
        raise ApiError(409, "conflict", f"{node} is a {row['kind']} account, not a node; choose another node id")
    if row and row["revoked_at"] is None and not body.replace:
        raise ApiError(409, "conflict", f"{node} already has live MQTT credentials (issued {row['created_at']}); "
                       "send replace: true to issue a new password (the board that has the old one "
                       "is locked out)")
    password = credentials.issue(reg, node, "node", caller.name, rotate=body.replace)
    keys = ota_keys()
    with reg.transaction():
        reg.db["audit"].insert({"at": iso(utc_now()), "actor": caller.name, "action": "node.provision",
                                "target": node, "detail": f"board={body.board} site={site} "
                                f"replace={str(bool(row)).lower()} ota_keys={len(keys)}"})
    updated = update_broker(reg, settings)
    return {"node": node, "user": node, "password": password,
            "broker": {"host": settings.node_broker_host or settings.mqtt_host,
                       "port": settings.node_broker_port or settings.mqtt_port},
            "root": settings.root, "tls": ca is not None, "ca": ca, "ota_keys": keys,
            "fleet_url": fleet_url(settings, request), "board": body.board, "site": site,
            "replaced": bool(row), "broker_updated": updated}


ROUTERS = (provision_router,)


def _document_roles() -> None:
    """As fleet/api.py does: the route names its roles in its description; exactly one role check."""
    for route in provision_router.routes:
        roles = [d.call.roles for d in route.dependant.dependencies if hasattr(d.call, "roles")]
        if len(roles) != 1:
            raise RuntimeError(f"{route.path} needs exactly one requires(...), not {len(roles)}")
        route.description = (route.description or "").rstrip() + "\n\nRoles: " + ", ".join(roles[0]) + "."


_document_roles()
