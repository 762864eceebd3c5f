"""Bearer tokens for the fleet's HTTP API, each with a name and a role.

    token = issue(registry, "grafana", "platform", actor="tanaka")   # shown once
    verify(registry, token)   # -> {"name": "grafana", "role": "platform", ...} or None
    revoke(registry, "grafana", actor="tanaka")

A token is `iwk_` followed by 43 random URL-safe characters. The registry
keeps only its SHA-256 (table `api_tokens`), so a lost token cannot be
shown again: revoke it and issue a new one under the same name. The name is
who the caller is in the audit log. Issuing and revoking are audited.

Roles (what each may do is in docs/api.md):

| role | for |
| --- | --- |
| `admin` | everything, including tokens, credentials and the audit log |
| `operator` | read the fleet and acknowledge alerts |
| `technician` | read the fleet and provision boards (node credentials) |
| `viewer` | read the fleet |
| `platform` | the city data platform: nodes, telemetry, events and metrics |
"""
from __future__ import annotations

import hashlib
import re
import secrets
from datetime import timedelta

from fleet.registry import Registry, iso, parse_iso, utc_now

ROLES = ("admin", "operator", "technician", "viewer", "platform")
PREFIX = "iwk_"
#: last_used_at is written at most this often per token, not on every request
TOUCH_EVERY = timedelta(minutes=1)
_NAME = re.compile(r"^[a-z0-9][a-z0-9._@-]{0,63}$")
_PUBLIC = ("name", "role", "created_at", "created_by", "revoked_at", "last_used_at")


class TokenError(Exception):
    """A token name or role is not allowed, is unknown, or is already in use.

    `code` says which, in the API's words: "invalid_request", "not_found" or "conflict".
    """

    def __init__(self, message: str, code: str = "invalid_request"):
        super().__init__(message)
        self.code = code


def hash_token(token: str) -> str:
    """What the registry keeps of a token: its SHA-256 in hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def issue(reg: Registry, name: str, role: str, actor: str = "cli") -> str:
    """A new token for `name` with `role`; returned once, only its hash is kept.

    A name whose token was revoked can be issued again (that is how a token
    is replaced); a name with a live token cannot.
    """
    if role not in ROLES:
        raise TokenError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
    if not isinstance(name, str) or not _NAME.match(name):
        raise TokenError(f"{name!r} is not a token name (1-64 of a-z, 0-9, '.', '_', '@', '-', "
                         "starting with a letter or digit)")
    row = _row(reg, name)
    if row and row["revoked_at"] is None:
        raise TokenError(f"{name} already has a token; revoke it first to replace it", "conflict")
    token = PREFIX + secrets.token_urlsafe(32)
    with reg.transaction():
        reg.db["api_tokens"].upsert({"name": name, "role": role, "token_hash": hash_token(token),
                                     "created_at": iso(utc_now()), "created_by": actor,
                                     "revoked_at": None, "last_used_at": None}, pk="name")
        _audit(reg, actor, "token.reissue" if row else "token.issue", name, role)
    return token


def revoke(reg: Registry, name: str, actor: str = "cli") -> dict:
    """The token stops working at once; returns its record (without the hash)."""
    row = _row(reg, name)
    if row is None:
        raise TokenError(f"no token named {name!r}", "not_found")
    if row["revoked_at"] is not None:
        raise TokenError(f"the token {name} was already revoked at {row['revoked_at']}", "conflict")
    with reg.transaction():
        reg.db["api_tokens"].update(name, {"revoked_at": iso(utc_now())})
        _audit(reg, actor, "token.revoke", name, row["role"])
    return _public(_row(reg, name))


def verify(reg: Registry, token: str) -> dict | None:
    """The live token's record ({name, role, ...}), or None for an unknown or revoked one.

    Records when the token was last used, at most once a minute.
    """
    if not isinstance(token, str) or not token.startswith(PREFIX):
        return None
    rows = list(reg.db.query("SELECT * FROM api_tokens WHERE token_hash = ? AND revoked_at IS NULL",
                             [hash_token(token)]))
    if not rows:
        return None
    row = rows[0]
    now = utc_now()
    if row["last_used_at"] is None or now - parse_iso(row["last_used_at"]) >= TOUCH_EVERY:
        row["last_used_at"] = iso(now)
        with reg.transaction():
            reg.db.execute("UPDATE api_tokens SET last_used_at = ? WHERE name = ?", [row["last_used_at"], row["name"]])
    return _public(row)


def tokens(reg: Registry) -> list[dict]:
    """Every token's record by name (live and revoked), never the hash."""
    return [_public(r) for r in reg.db["api_tokens"].rows_where(order_by="name")]


def _row(reg: Registry, name: str) -> dict | None:
    return next(reg.db["api_tokens"].rows_where("name = ?", [name]), None)


def _public(row: dict) -> dict:
    return {k: row[k] for k in _PUBLIC}


def _audit(reg: Registry, actor: str, action: str, target: str, detail: str = "") -> None:
    reg.db["audit"].insert({"at": iso(utc_now()), "actor": actor, "action": action,
                            "target": target, "detail": detail})
