"""API bearer tokens: issued once, kept as a hash, refused once revoked; `fleet tokens`."""
import hashlib
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from fleet import tokens as T
from fleet.registry import Registry, iso, utc_now

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def reg(tmp_path):
    with Registry(tmp_path / "fleet.db") as r:
        yield r


def audit(reg):
    return [(r["actor"], r["action"], r["target"], r["detail"]) for r in reg.db["audit"].rows_where(order_by="id")]


def test_a_token_is_shown_once_and_only_its_hash_is_kept(reg):
    token = T.issue(reg, "ops-sato", "operator", actor="tanaka")
    assert token.startswith("iwk_") and len(token) == 4 + 43
    row = next(reg.db["api_tokens"].rows_where())
    assert row["token_hash"] == hashlib.sha256(token.encode()).hexdigest()
    assert token not in json.dumps(row) and token[4:] not in json.dumps(row)
    assert (row["name"], row["role"], row["created_by"], row["revoked_at"]) == ("ops-sato", "operator", "tanaka", None)
    assert T.issue(reg, "ops-ito", "operator") != token
    assert audit(reg) == [("tanaka", "token.issue", "ops-sato", "operator"),
                          ("cli", "token.issue", "ops-ito", "operator")]


def test_verify_knows_live_tokens_only(reg):
    token = T.issue(reg, "grafana", "platform")
    found = T.verify(reg, token)
    assert found["name"] == "grafana" and found["role"] == "platform" and "token_hash" not in found
    assert T.verify(reg, token + "x") is None
    assert T.verify(reg, "iwk_" + "A" * 43) is None
    assert T.verify(reg, token[4:]) is None  # the prefix belongs to the token
    assert T.verify(reg, "") is None
    T.revoke(reg, "grafana", actor="tanaka")
    assert T.verify(reg, token) is None


def test_last_used_is_written_at_most_once_a_minute(reg):
    token = T.issue(reg, "viewer-1", "viewer")
    assert T.tokens(reg)[0]["last_used_at"] is None
    first = T.verify(reg, token)["last_used_at"]
    assert first is not None and T.tokens(reg)[0]["last_used_at"] == first
    writes = reg.db.conn.total_changes
    for _ in range(5):
        assert T.verify(reg, token)["last_used_at"] == first
    assert reg.db.conn.total_changes == writes  # no write for these five requests
    earlier = iso(utc_now() - timedelta(seconds=61))
    reg.db.execute("UPDATE api_tokens SET last_used_at = ?", [earlier])
    reg.db.conn.commit()
    assert T.verify(reg, token)["last_used_at"] > earlier
    assert T.tokens(reg)[0]["last_used_at"] > earlier


def test_refusals_say_why_and_what_kind_of_problem(reg):
    T.issue(reg, "admin", "admin")
    with pytest.raises(T.TokenError, match="already has a token; revoke it first") as exc:
        T.issue(reg, "admin", "viewer")
    assert exc.value.code == "conflict"
    with pytest.raises(T.TokenError, match="unknown role 'root'") as exc:
        T.issue(reg, "x", "root")
    assert exc.value.code == "invalid_request"
    for bad in ("", "Admin", "has space", "-lead", "x" * 65):
        with pytest.raises(T.TokenError, match="is not a token name"):
            T.issue(reg, bad, "viewer")
    with pytest.raises(T.TokenError, match="no token named 'nobody'") as exc:
        T.revoke(reg, "nobody")
    assert exc.value.code == "not_found"
    T.revoke(reg, "admin")
    with pytest.raises(T.TokenError, match="already revoked") as exc:
        T.revoke(reg, "admin")
    assert exc.value.code == "conflict"


def test_a_revoked_name_can_be_issued_again_and_only_the_new_token_works(reg):
    old = T.issue(reg, "tech-1", "technician", actor="a")
    record = T.revoke(reg, "tech-1", actor="b")
    assert record["revoked_at"] is not None and "token_hash" not in record
    new = T.issue(reg, "tech-1", "viewer", actor="c")
    assert T.verify(reg, old) is None and T.verify(reg, new)["role"] == "viewer"
    assert [t["name"] for t in T.tokens(reg)] == ["tech-1"] and T.tokens(reg)[0]["revoked_at"] is None
    assert [a[1] for a in audit(reg)] == ["token.issue", "token.revoke", "token.reissue"]
    assert set(T.tokens(reg)[0]) == {"name", "role", "created_at", "created_by", "revoked_at", "last_used_at"}


# -- fleet tokens ---------------------------------------------------------------

def fleet(*args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("IWAKI_")}
    return subprocess.run([sys.executable, "-m", "fleet", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=30)


def test_cli_issues_lists_and_revokes(tmp_path):
    db = str(tmp_path / "new" / "fleet.db")  # issue makes the registry: the first admin comes first
    proc = fleet("tokens", "issue", "admin", "--role", "admin", "--db", db, "--actor", "setup")
    assert proc.returncode == 0, proc.stderr
    token = proc.stdout.strip()
    assert proc.stdout == token + "\n" and token.startswith("iwk_")  # alone on stdout, for $(...)
    assert "shown once" in proc.stderr and token not in proc.stderr
    with Registry(db, create=False) as reg:
        assert T.verify(reg, token)["role"] == "admin"
    listed = fleet("tokens", "list", "--db", db)
    assert listed.returncode == 0 and listed.stdout.split()[:3] == ["admin", "admin", "active"]
    assert token not in listed.stdout
    again = fleet("tokens", "issue", "admin", "--role", "viewer", "--db", db)
    assert again.returncode == 1 and again.stderr == "fleet: admin already has a token; revoke it first to replace it\n"
    revoked = fleet("tokens", "revoke", "admin", "--db", db, "--actor", "setup")
    assert revoked.returncode == 0 and revoked.stdout == "" and "revoked" in revoked.stderr
    rows = json.loads(fleet("tokens", "list", "--json", "--db", db).stdout)
    assert rows[0]["name"] == "admin" and rows[0]["revoked_at"] and "token_hash" not in rows[0]
    with Registry(db, create=False) as reg:
        assert T.verify(reg, token) is None
        assert [(r["actor"], r["action"]) for r in reg.db["audit"].rows_where(order_by="id")] == [
            ("setup", "token.issue"), ("setup", "token.revoke")]


def test_cli_usage_errors(tmp_path):
    db = str(tmp_path / "fleet.db")
    no_role = fleet("tokens", "issue", "x", "--db", db)
    assert no_role.returncode == 2 and "tokens issue needs --role (admin, operator" in no_role.stderr
    no_name = fleet("tokens", "revoke", "--db", db)
    assert no_name.returncode == 2 and "needs a token name" in no_name.stderr
    missing = fleet("tokens", "list", "--db", db)  # list and revoke never create a registry
    assert missing.returncode == 1 and "no registry at" in missing.stderr and not Path(db).exists()
    bad_name = fleet("tokens", "issue", "Bad Name", "--role", "viewer", "--db", db)
    assert bad_name.returncode == 1 and "is not a token name" in bad_name.stderr
    for proc in (no_role, no_name, missing, bad_name):
        assert "Traceback" not in proc.stderr
