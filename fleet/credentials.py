"""Per-device MQTT credentials and the broker's password and ACL files.

Every node, the fleet itself and the platform have their own account; no
shared or default password exists. The registry keeps only a PBKDF2-SHA512
hash in mosquitto's own format (`$7$<iterations>$<salt>$<hash>`), so the
password file is written straight from it: the password itself is shown
once, when it is issued, and never stored.

ACL (docs/mqtt.md): a node may publish only its own birth, state,
telemetry, health, event and reply topics and read only its own commands;
the fleet reads every node topic and writes commands; the platform reads
telemetry, events, birth and state.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

from fleet.registry import Registry, iso, utc_now

KINDS = ("node", "fleet", "platform")
ITERATIONS = 1000
_ACCOUNT = re.compile(r"^[a-z0-9][a-z0-9-]{1,31}$")
NODE_PUBLISHES = ("birth", "state", "telemetry", "health", "event", "reply")


class CredentialError(Exception):
    """An account is unknown, already exists, or its name is not allowed."""


def hash_password(password: str, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    """The mosquitto 2.x password hash of `password`."""
    salt = salt or os.urandom(12)
    dk = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return "$7$%d$%s$%s" % (iterations, base64.b64encode(salt).decode(), base64.b64encode(dk).decode())


def verify_password(password: str, hashed: str) -> bool:
    try:
        _, kind, it, salt, dk = hashed.split("$")
        if kind != "7":
            return False
        want = base64.b64decode(dk)
        got = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt), int(it))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


def _audit(reg: Registry, actor: str, action: str, target: str, detail: str = "") -> None:
    reg.db["audit"].insert({"at": iso(utc_now()), "actor": actor, "action": action,
                            "target": target, "detail": detail})


def issue(reg: Registry, account: str, kind: str = "node", actor: str = "cli",
          rotate: bool = False) -> str:
    """Create (or with rotate, replace) an account's password; return it.
    It is shown to the caller once and only its hash is kept."""
    if kind not in KINDS:
        raise CredentialError(f"unknown account kind {kind!r} (kinds: {', '.join(KINDS)})")
    if not _ACCOUNT.match(account):
        raise CredentialError(f"{account!r} is not an account name (2-32 of a-z, 0-9, '-')")
    row = next(reg.db["credentials"].rows_where("account = ?", [account]), None)
    if row and not rotate and row["revoked_at"] is None:
        raise CredentialError(f"{account} already has credentials; use --rotate to replace them")
    if row and row["kind"] != kind:
        raise CredentialError(f"{account} is a {row['kind']} account, not {kind}")
    password = secrets.token_urlsafe(24)
    with reg.transaction():
        reg.db["credentials"].upsert({"account": account, "kind": kind,
                                      "password_hash": hash_password(password),
                                      "created_at": iso(utc_now()), "revoked_at": None}, pk="account")
        _audit(reg, actor, "credentials.rotate" if row else "credentials.issue", account, kind)
    return password


def revoke(reg: Registry, account: str, actor: str = "cli") -> None:
    """The account can no longer connect once the broker reloads its files."""
    row = next(reg.db["credentials"].rows_where("account = ?", [account]), None)
    if row is None:
        raise CredentialError(f"no account {account!r}")
    with reg.transaction():
        reg.db["credentials"].update(account, {"revoked_at": iso(utc_now())})
        _audit(reg, actor, "credentials.revoke", account)


def accounts(reg: Registry) -> list[dict]:
    return [{k: r[k] for k in ("account", "kind", "created_at", "revoked_at")}
            for r in reg.db["credentials"].rows_where(order_by="account")]


def acl_text(live: list[dict], root: str) -> str:
    """mosquitto ACL for the live accounts."""
    out = ["# written by `fleet broker-config`; do not edit: re-run it"]
    for a in live:
        name = a["account"]
        out.append(f"\nuser {name}")
        if a["kind"] == "node":
            out += [f"topic write {root}/{name}/{t}" for t in NODE_PUBLISHES]
            out.append(f"topic read {root}/{name}/cmd/#")
        elif a["kind"] == "fleet":
            out += [f"topic read {root}/+/{t}" for t in NODE_PUBLISHES]
            out.append(f"topic write {root}/+/cmd/#")
        else:  # platform
            out += [f"topic read {root}/+/{t}" for t in ("birth", "state", "telemetry", "event")]
    return "\n".join(out) + "\n"


def broker_config(reg: Registry, out_dir: str | Path, root: str = "iwaki") -> tuple[Path, Path]:
    """Write `passwd` and `acl` for mosquitto into out_dir (replaced
    atomically); point mosquitto's password_file and acl_file at them and
    send it SIGHUP to reload."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    live = [r for r in reg.db["credentials"].rows_where("revoked_at IS NULL", order_by="account")]
    files = {"passwd": "".join(f"{r['account']}:{r['password_hash']}\n" for r in live),
             "acl": acl_text(live, root)}
    paths = []
    for name, text in files.items():
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.chmod(tmp, 0o600)
        tmp.replace(out / name)
        paths.append(out / name)
    return paths[0], paths[1]
