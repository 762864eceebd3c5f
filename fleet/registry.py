"""The fleet registry: SQLite through sqlite-utils, in WAL mode, with migrations.

One `Registry` wraps one connection, so it belongs to the thread that made
it; the ingest service does every write from one writer thread. Readers (the
`nodes` command, later the API) open their own `Registry` on the same file:
WAL mode lets them read while the writer writes.

Schema changes are migrations: functions appended to `MIGRATIONS`, applied
in order; the pending ones and their rows in the `migrations` table are
written in one transaction, so an upgrade happens entirely or not at all.
Opening an older database upgrades it in place; nothing is ever dropped and
recreated. Never edit a migration that has shipped: add the next one.

Times are UTC ISO 8601 strings with milliseconds (`2024-05-01T12:00:00.123Z`),
so they sort and compare as text.
"""
from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlite_utils import Database

from fleet.schemas import NODE_KINDS, SEQ_KINDS

log = logging.getLogger("fleet.registry")

_EXCERPT_CHARS = 200
_BUSY_TIMEOUT_MS = 5000
# One write lock per registry file and process, taken before SQLite's: threads of one
# process (the ingest writer, the relay, the API) then queue for it in turn, where
# SQLite's busy handler alone lets a writer that commits back to back starve the others.
_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _file_lock(path: Path | None) -> threading.Lock:
    key = str(path.resolve()) if path is not None else f"memory-{threading.get_ident()}"
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(key, threading.Lock())


class RegistryError(Exception):
    """The registry cannot be opened, is newer than this code, or refused a write."""


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def iso(when: datetime) -> str:
    """`when` (aware, or naive meaning UTC) as `YYYY-MM-DDTHH:MM:SS.mmmZ`."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_iso(text: str) -> datetime:
    """The inverse of `iso()`."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)


# -- migrations ---------------------------------------------------------------

def _m001_initial(db: Database) -> None:
    db["nodes"].create({
        "id": str, "state": str, "state_reason": str, "state_at": str,
        "first_seen": str, "last_seen": str,
        "fw": str, "board": str, "chip": str, "config_hash": str,
        "boot": int, "boot_count": int, "reset_cause": str, "last_seq": int,
        "gaps": int, "duplicates": int, "invalid": int,
    }, pk="id", not_null=["state", "first_seen", "gaps", "duplicates", "invalid"],
        defaults={"state": "unknown", "gaps": 0, "duplicates": 0, "invalid": 0})
    db["seen"].create({"node": str, "boot": int, "seq": int, "kind": str, "received_at": str},
                      pk=("node", "boot", "seq"), not_null=["kind", "received_at"])
    db["telemetry"].create({
        "id": int, "node": str, "boot": int, "seq": int, "ts": str, "received_at": str,
        "clock_set": int, "channel": str, "n": int, "min": float, "max": float, "mean": float,
        "last": float, "sum": float,
    }, pk="id", not_null=["node", "boot", "seq", "received_at", "channel", "n"])
    db["telemetry"].create_index(["node", "channel", "received_at"])
    db["health"].create({
        "id": int, "node": str, "boot": int, "seq": int, "ts": str, "received_at": str,
        "heap_free": int, "lag_max_ms": int, "overruns": int, "outbox_depth": int,
        "outbox_dropped": int, "rssi": int, "vbat_mv": int, "payload": str,
    }, pk="id", not_null=["node", "boot", "seq", "received_at", "payload"])
    db["health"].create_index(["node", "received_at"])
    db["events"].create({
        "id": int, "node": str, "boot": int, "seq": int, "ts": str, "received_at": str,
        "event": str, "severity": str, "data": str,
    }, pk="id", not_null=["node", "boot", "seq", "received_at", "event", "severity"])
    db["events"].create_index(["node", "received_at"])
    db["replies"].create({
        "id": int, "node": str, "boot": int, "seq": int, "ts": str, "received_at": str,
        "cmd_id": str, "ok": int, "result": str, "error": str,
    }, pk="id", not_null=["node", "boot", "seq", "received_at", "cmd_id", "ok"])
    db["replies"].create_index(["node", "cmd_id"])
    db["gaps"].create({"id": int, "node": str, "boot": int, "from_seq": int, "to_seq": int,
                       "detected_at": str}, pk="id", not_null=["node", "boot", "from_seq", "to_seq"])
    db["gaps"].create_index(["node", "boot", "from_seq"])
    db["invalid"].create({"id": int, "received_at": str, "topic": str, "node": str, "reason": str,
                          "size": int, "excerpt": str}, pk="id", not_null=["received_at", "topic", "reason"])


def _m002_credentials(db: Database) -> None:
    # per-device broker accounts (hashes only) and the operators' audit log
    db["credentials"].create({"account": str, "kind": str, "password_hash": str,
                              "created_at": str, "revoked_at": str},
                             pk="account", not_null=["kind", "password_hash", "created_at"])
    db["audit"].create({"id": int, "at": str, "actor": str, "action": str, "target": str,
                        "detail": str}, pk="id", not_null=["at", "actor", "action"])
    db["audit"].create_index(["at"])


def _m003_alerts(db: Database) -> None:
    # health alerts (fleet/health.py): open while their condition holds
    db["alerts"].create({"id": int, "node": str, "kind": str, "severity": str, "message": str,
                         "opened_at": str, "closed_at": str, "acked_at": str, "acked_by": str},
                        pk="id", not_null=["node", "kind", "severity", "opened_at"])
    db["alerts"].create_index(["node", "kind", "closed_at"])


def _m004_relay_and_api(db: Database) -> None:
    # the channels a node announced in its birth ({name: {"sensor": kind}}), for the platform mapping
    db["nodes"].add_column("channels", str)
    # the upstream outbox (fleet/relay.py): NGSI-LD entities waiting for the city platform,
    # written in the same transaction as the message they come from; AUTOINCREMENT so an id
    # is never reused and delivery order is insertion order
    db.execute("""CREATE TABLE upstream (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        node TEXT NOT NULL, boot INTEGER, seq INTEGER, kind TEXT NOT NULL,
        entity_id TEXT NOT NULL, entity_type TEXT NOT NULL, body TEXT NOT NULL,
        created_at TEXT NOT NULL, delivered_at TEXT, failed_at TEXT, attempts INTEGER NOT NULL DEFAULT 0,
        lease_owner TEXT, lease_until TEXT, last_error TEXT)""")
    db.execute("CREATE INDEX upstream_pending ON upstream (id) WHERE delivered_at IS NULL AND failed_at IS NULL")
    db.execute("CREATE INDEX upstream_delivered ON upstream (delivered_at) WHERE delivered_at IS NOT NULL")
    # API bearer tokens (fleet/tokens.py): only a SHA-256 of each token is kept
    db["api_tokens"].create({"name": str, "role": str, "token_hash": str, "created_at": str,
                             "created_by": str, "revoked_at": str, "last_used_at": str},
                            pk="name", not_null=["role", "token_hash", "created_at"])
    db["api_tokens"].create_index(["token_hash"], unique=True)


def _m005_ota(db: Database) -> None:
    # OTA (fleet/releases.py, fleet/rollouts.py): signed releases, rollouts in waves,
    # one deployment per node and rollout, and every state a deployment went through
    db["releases"].create({"version": str, "kind": str, "boards": str, "min_version": str, "key_id": str,
                           "created_at": str, "created_by": str, "total_size": int, "source_bytes": int,
                           "path": str}, pk="version",
                          not_null=["kind", "boards", "key_id", "created_at", "total_size", "path"])
    db["rollouts"].create({"id": int, "release": str, "state": str, "waves": str, "soak_s": float,
                           "failure_threshold": float, "force": int, "created_at": str, "created_by": str,
                           "updated_at": str, "reason": str}, pk="id",
                          not_null=["release", "state", "waves", "soak_s", "failure_threshold", "force",
                                    "created_at", "updated_at"],
                          foreign_keys=[("release", "releases", "version")])
    db["rollouts"].create_index(["state"])
    db["deployments"].create({"id": int, "rollout": int, "node": str, "wave": int, "state": str,
                              "attempt": int, "cmd_id": str, "from_version": str, "updated_at": str,
                              "reason": str}, pk="id", not_null=["rollout", "node", "state", "attempt", "updated_at"],
                             foreign_keys=[("rollout", "rollouts", "id")])
    db["deployments"].create_index(["rollout", "node"], unique=True)
    db["deployments"].create_index(["node"])
    db["deployments"].create_index(["cmd_id"])
    db["deployment_history"].create({"id": int, "deployment": int, "at": str, "state": str, "detail": str},
                                    pk="id", not_null=["deployment", "at", "state"],
                                    foreign_keys=[("deployment", "deployments", "id")])
    db["deployment_history"].create_index(["deployment", "id"])


#: Applied in order; version N is MIGRATIONS[N - 1]. Append only.
MIGRATIONS: list[Callable[[Database], None]] = [_m001_initial, _m002_credentials, _m003_alerts,
                                                _m004_relay_and_api, _m005_ota]


# -- the registry ---------------------------------------------------------------

#: Rows `Registry.prune` deletes per transaction.
PRUNE_CHUNK = 10_000


class Registry:
    """The fleet's SQLite registry at `path` (created, with parents, unless `create` is false)."""

    def __init__(self, path: str | Path, *, create: bool = True,
                 migrations: list[Callable[[Database], None]] | None = None):
        self.path = Path(path) if str(path) != ":memory:" else None
        self._in_batch = False
        # inside a batch: node rows read once and written once at its end, and the
        # message path's multi-row inserts gathered by table (see batch())
        self._rows: dict[str, dict] = {}
        self._dirty: dict[str, dict] = {}
        self._deferred: dict[tuple, list] = {}
        self._lock = _file_lock(self.path)
        self.migrations = MIGRATIONS if migrations is None else migrations
        where = str(path)
        if self.path is not None and not self.path.exists() and not create:
            raise RegistryError(f"no registry at {where} (start `fleet serve --db {where}` first, "
                                "or point --db / IWAKI_DB at an existing one)")
        try:
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = Database(where)
        except (OSError, sqlite3.Error) as exc:
            raise RegistryError(f"cannot open the registry at {where}: {_why(exc)} "
                                "(is the directory writable? choose another with --db or IWAKI_DB)") from None
        try:
            self.db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            # a 64 MiB page cache, and a checkpoint every ~40 MiB of WAL rather than every 4 MiB:
            # the message path's inserts stay in memory and commits fsync only the WAL
            self.db.execute("PRAGMA cache_size = -65536")
            self.db.execute("PRAGMA wal_autocheckpoint = 10000")
            if self.path is not None:
                self.db.enable_wal()
            self._migrate()
        except sqlite3.Error as exc:
            self.db.close()
            raise RegistryError(f"cannot use the registry at {where}: {_why(exc)}") from None
        except RegistryError:
            self.db.close()
            raise

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- migrations --

    def _migrate(self) -> None:
        if self._applied() == set(range(1, len(self.migrations) + 1)):
            return  # the usual case: nothing to do and no write lock taken
        with self._write():  # another process may be migrating: decide under the write lock
            self.db["migrations"].create({"version": int, "name": str, "applied_at": str},
                                         pk="version", if_not_exists=True)
            applied = self._applied()
            newest = max(applied, default=0)
            if newest > len(self.migrations):
                raise RegistryError(f"the registry at {self.path} is at schema version {newest}, "
                                    f"newer than this fleet ({len(self.migrations)}); upgrade the fleet")
            for version, migration in enumerate(self.migrations, start=1):
                if version in applied:
                    continue
                migration(self.db)
                self.db["migrations"].insert({"version": version, "name": migration.__name__,
                                              "applied_at": iso(utc_now())})
                log.info("registry %s: applied migration %d (%s)", self.path, version, migration.__name__)

    def _applied(self) -> set[int]:
        if not self.db["migrations"].exists():
            return set()
        return {row[0] for row in self.db.execute("SELECT version FROM migrations")}

    @contextlib.contextmanager
    def _write(self):
        """One write transaction, taking the write lock at once (BEGIN IMMEDIATE), so two
        writers wait for each other (busy timeout) instead of failing on a lock upgrade.
        Inside `batch()` it is part of the batch's transaction."""
        if self._in_batch:
            yield
            return
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self.db.rollback()
                raise
            else:
                self.db.commit()

    def transaction(self):
        """A write transaction for code outside the registry (`with registry.transaction(): ...`):
        it holds the write lock from the start, so read-then-write is safe across processes."""
        return self._write()

    @contextlib.contextmanager
    def batch(self):
        """Many writes in one transaction (one commit, one fsync), all or nothing: the ingest
        writer stores a burst of messages this way and acknowledges them after the commit.

        Inside, each node's row is read once and written once, at the end, and the
        telemetry and outbox rows are inserted together; an exception undoes the
        whole batch (the caller may then store its messages one by one)."""
        if self._in_batch:
            raise RegistryError("batches do not nest")
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            self._in_batch = True
            try:
                yield self
                self._flush()
            except BaseException:
                self._end_batch()
                self.db.rollback()
                raise
            self._end_batch()
            self.db.commit()

    def _flush(self) -> None:
        for node, changes in self._dirty.items():
            self.db.conn.execute(f"UPDATE nodes SET {', '.join(f'{k} = ?' for k in changes)} WHERE id = ?",
                                 [*changes.values(), node])
        for (table, cols), rows in self._deferred.items():
            self.db.conn.executemany(
                f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", rows)

    def _end_batch(self) -> None:
        self._in_batch = False
        self._rows.clear()
        self._dirty.clear()
        self._deferred.clear()

    @property
    def version(self) -> int:
        return self.db.execute("SELECT coalesce(max(version), 0) FROM migrations").fetchone()[0]

    # -- writes --

    def ingest(self, node: str, kind: str, payload: dict, received_at: datetime | None = None,
               retained: bool = False, upstream: Callable[[dict, str, dict, str], list[dict]] | None = None
               ) -> str:
        """Store one validated message; return "stored" or "duplicate".

        Telemetry, health, events and replies are de-duplicated by
        `(node, boot, seq)` and checked for gaps, in the same transaction
        as the insert. `retained` marks a message the broker replayed (a
        retained birth or state): it updates identity and state but is no
        proof that the node is alive now, so `last_seen` stays.

        `upstream(node_row, kind, payload, received_at)` (the platform
        mapping, `fleet.ngsi.entities`) gives the entities to deliver for a
        stored message; they enter the upstream outbox in the same
        transaction, so a message is stored and queued for the platform, or
        neither. Duplicates and replayed retained messages queue nothing.
        """
        if kind not in NODE_KINDS:
            raise RegistryError(f"unknown message kind {kind!r}")
        at = iso(received_at or utc_now())
        boot, seq = payload["boot"], payload["seq"]
        with self._write():
            row = self._node_row(node, at)
            changes: dict = {}
            if not retained:
                changes["last_seen"] = at
            newer_boot = row["boot"] is None or boot > row["boot"]
            current = newer_boot or boot == row["boot"]
            if newer_boot:
                changes.update(boot=boot, last_seq=None)
            if kind in SEQ_KINDS:
                # the node row knows the highest seq of its current boot; older boots are looked up
                highest = (None if newer_boot else row["last_seq"] if current and row["last_seq"] is not None
                           else self._highest_seq(node, boot))
                if not self._mark_seen(node, boot, seq, kind, at):
                    self._update_node(node, {"duplicates": row["duplicates"] + 1})
                    return "duplicate"
                changes["gaps"] = row["gaps"] + self._track_gaps(node, boot, seq, highest, at)
                if current:
                    last = None if newer_boot else row["last_seq"]
                    changes["last_seq"] = seq if last is None else max(last, seq)
                getattr(self, "_store_" + kind)(node, payload, at)
                if kind == "health" and current:
                    changes.update({k: payload[k] for k in ("fw", "config_hash", "boot_count", "reset_cause")})
            elif kind == "birth" and current:
                changes.update({k: payload[k] for k in ("fw", "board", "chip", "config_hash",
                                                         "boot_count", "reset_cause")})
                changes["channels"] = json.dumps(payload.get("channels", {}), separators=(",", ":"))
            elif kind == "state" and current:
                changes.update(state=payload["state"], state_reason=payload.get("reason"), state_at=at)
            if not retained and kind != "state" and row["state"] != "online":
                changes.update(state="online", state_reason="heard", state_at=at)
            self._update_node(node, changes)
            if upstream is not None and not retained:
                self._enqueue(upstream({**row, **changes}, kind, payload, at), node, kind, payload, at)
        return "stored"

    def record_invalid(self, topic: str, reason: str, payload: bytes, node: str | None = None,
                       received_at: datetime | None = None) -> None:
        """Keep a refused message: when, where, why and the first 200 characters."""
        excerpt = bytes(payload[:_EXCERPT_CHARS * 4]).decode("utf-8", "replace")[:_EXCERPT_CHARS]
        with self._write():
            self.db["invalid"].insert({"received_at": iso(received_at or utc_now()), "topic": topic,
                                       "node": node, "reason": reason, "size": len(payload),
                                       "excerpt": excerpt})
            if node is not None:
                self.db.conn.execute("UPDATE nodes SET invalid = invalid + 1 WHERE id = ?", [node])
                if node in self._rows:
                    self._rows[node]["invalid"] += 1

    def prune(self, retention_days: float, now: datetime | None = None) -> int:
        """Delete what is older than the retention: telemetry, health history and the
        de-duplication record (`seen`: a message re-sent after that long is stored again),
        and deliveries the platform took more than a day ago (or the retention, if shorter).
        Nodes, events, replies, alerts, gaps, refused deliveries and the audit log are kept.

        Rows are appended in the order they arrive, so the old ones are found by rowid
        (a binary search, not a scan) and deleted `PRUNE_CHUNK` at a time, each chunk
        its own transaction: a pass costs what it deletes, not the size of the tables,
        and never holds the write lock for long. Returns the rows deleted."""
        now = now or utc_now()
        cut = iso(now - timedelta(days=retention_days))
        delivered_cut = iso(now - timedelta(days=min(retention_days, 1.0)))
        n = 0
        for table in ("telemetry", "health", "seen"):
            end = self._rowid_from(table, cut)
            n += self._delete_chunks(f"SELECT rowid FROM {table} WHERE rowid < ? AND received_at < ? "
                                     f"ORDER BY rowid LIMIT ?", table, [end, cut])
        n += self._delete_chunks("SELECT rowid FROM upstream WHERE delivered_at < ? LIMIT ?",  # indexed
                                 "upstream", [delivered_cut])
        return n

    def _rowid_from(self, table: str, cut: str) -> int:
        """A rowid before which `table`'s rows were received before `cut` and from which they
        were not: rows are appended as they arrive, so received_at grows with the rowid
        (a row another worker stamped a little out of order is taken by a later pass)."""
        # one aggregate per query: SQLite reads min() or max() of the rowid from the b-tree's
        # edge only when it is alone (both at once is a scan)
        first = self.db.conn.execute(f"SELECT min(rowid) FROM {table}").fetchone()[0]
        if first is None:
            return 0
        last = self.db.conn.execute(f"SELECT max(rowid) FROM {table}").fetchone()[0]
        lo, hi = first, last + 1   # rows below lo are old; rows from hi on are new
        while lo < hi:
            mid = (lo + hi) // 2
            row = self.db.conn.execute(f"SELECT rowid, received_at FROM {table} WHERE rowid >= ? AND rowid < ? "
                                       f"ORDER BY rowid LIMIT 1", [mid, hi]).fetchone()
            if row is not None and row[1] < cut:
                lo = row[0] + 1
            else:
                hi = mid
        return lo

    def _delete_chunks(self, select: str, table: str, args: list) -> int:
        n = 0
        while True:
            with self._write():
                deleted = self.db.conn.execute(f"DELETE FROM {table} WHERE rowid IN ({select})",
                                               [*args, PRUNE_CHUNK]).rowcount
            n += deleted
            if deleted < PRUNE_CHUNK:
                return n

    def mark_stale(self, offline_after_s: float, now: datetime | None = None) -> list[str]:
        """Turn online nodes not heard within `offline_after_s` offline (reason "timeout").

        A node's clock for this is the later of `last_seen` and the time its
        state was last set, so a retained "online" replayed at fleet start
        gets a full timeout before it is doubted. Returns the ids changed.
        """
        now = now or utc_now()
        cutoff = iso(now - timedelta(seconds=offline_after_s))
        with self._write():
            ids = [r["id"] for r in self.db.query(
                "SELECT id FROM nodes WHERE state = 'online' "
                "AND max(coalesce(last_seen, ''), coalesce(state_at, '')) < ? ORDER BY id", [cutoff])]
            for node in ids:
                self._update_node(node, {"state": "offline", "state_reason": "timeout", "state_at": iso(now)})
        return ids

    # -- the upstream outbox (fleet/relay.py delivers it) --

    def _enqueue(self, entities: list[dict], node: str, kind: str, payload: dict, at: str) -> None:
        self._insert_many("upstream", [
            {"node": node, "boot": payload.get("boot"), "seq": payload.get("seq"), "kind": kind,
             "entity_id": e["id"], "entity_type": e["type"],
             "body": json.dumps(e, separators=(",", ":"), ensure_ascii=False), "created_at": at}
            for e in entities])

    def claim_upstream(self, worker: str, limit: int, lease_s: float, now: datetime | None = None) -> list[dict]:
        """The oldest `limit` pending deliveries, leased to `worker` for `lease_s` seconds.

        A row leased to another worker is skipped until its lease runs out (that
        worker died), then taken over; rows this worker already holds come back
        first, so a failed batch is retried before anything newer.
        """
        with self._write():
            return self._claim(worker, limit, lease_s, now or utc_now())

    def _claim(self, worker: str, limit: int, lease_s: float, now: datetime) -> list[dict]:
        rows = list(self.db.query(
            "SELECT id, node, boot, seq, kind, entity_id, entity_type, body, attempts FROM upstream "
            "WHERE delivered_at IS NULL AND failed_at IS NULL "
            "AND (lease_owner IS NULL OR lease_owner = ? OR lease_until < ?) ORDER BY id LIMIT ?",
            [worker, iso(now), limit]))
        if rows:
            self.db.execute(
                f"UPDATE upstream SET lease_owner = ?, lease_until = ?, attempts = attempts + 1 "
                f"WHERE id IN ({','.join('?' * len(rows))})",
                [worker, iso(now + timedelta(seconds=lease_s)), *[r["id"] for r in rows]])
        return rows

    def finish_upstream(self, worker: str, delivered: list[int], failed: dict[int, str] | None = None,
                        error: str | None = None, now: datetime | None = None, claim: int = 0,
                        lease_s: float = 30.0) -> list[dict]:
        """Record a delivery attempt: `delivered` ids are done; `failed` ids ({id: reason}) were
        refused by the platform for good and leave the queue (kept, counted, visible); on
        `error` (platform unreachable) the rest keep their lease and are retried first.

        With `claim`, the next `claim` rows are leased (as `claim_upstream`) in the same
        transaction, one commit for both, and returned."""
        now = now or utc_now()
        at = iso(now)
        with self._write():
            for chunk in _chunks(delivered, 500):
                self.db.execute(f"UPDATE upstream SET delivered_at = ?, lease_owner = NULL, lease_until = NULL, "
                                f"last_error = NULL WHERE id IN ({','.join('?' * len(chunk))})", [at, *chunk])
            for rid, reason in (failed or {}).items():
                self.db.execute("UPDATE upstream SET failed_at = ?, last_error = ?, lease_owner = NULL, "
                                "lease_until = NULL WHERE id = ?", [at, reason[:500], rid])
            if error:
                self.db.execute("UPDATE upstream SET last_error = ? WHERE lease_owner = ? AND delivered_at IS NULL",
                                [error[:500], worker])
            return self._claim(worker, claim, lease_s, now) if claim else []

    def release_upstream(self, worker: str) -> None:
        """Give back `worker`'s leases (a clean stop), so another worker takes them at once."""
        with self._write():
            self.db.execute("UPDATE upstream SET lease_owner = NULL, lease_until = NULL "
                            "WHERE lease_owner = ? AND delivered_at IS NULL", [worker])

    def upstream_backlog(self) -> int:
        """Deliveries waiting for the platform."""
        return self.db.execute("SELECT count(*) FROM upstream WHERE delivered_at IS NULL AND failed_at IS NULL"
                               ).fetchone()[0]

    def upstream_stats(self) -> dict:
        """{"backlog", "delivered", "failed", "oldest_pending"}: the outbox at a glance."""
        row = self.db.execute(
            "SELECT (SELECT count(*) FROM upstream WHERE delivered_at IS NULL AND failed_at IS NULL), "
            "(SELECT count(*) FROM upstream WHERE delivered_at IS NOT NULL), "
            "(SELECT count(*) FROM upstream WHERE failed_at IS NOT NULL), "
            "(SELECT min(created_at) FROM upstream WHERE delivered_at IS NULL AND failed_at IS NULL)").fetchone()
        return dict(zip(("backlog", "delivered", "failed", "oldest_pending"), row))

    # -- reads --

    def nodes(self) -> list[dict]:
        """Every node, by id, as a dict of the `nodes` columns."""
        return list(self.db.query("SELECT * FROM nodes ORDER BY id"))

    def node(self, node: str) -> dict | None:
        rows = list(self.db.query("SELECT * FROM nodes WHERE id = ?", [node]))
        return rows[0] if rows else None

    def gaps(self, node: str | None = None) -> list[dict]:
        """Open gaps (ranges of missing seq) per node and boot."""
        where, args = ("WHERE node = ?", [node]) if node else ("", [])
        return list(self.db.query(
            f"SELECT node, boot, from_seq, to_seq, detected_at FROM gaps {where} ORDER BY node, boot, from_seq",
            args))

    def stats(self) -> dict:
        """Counts for logs and metrics; `telemetry_stored` counts messages, not channel rows;
        `gaps` counts missing messages in open gaps."""
        one = lambda sql: self.db.execute(sql).fetchone()[0]  # noqa: E731
        return {
            "nodes": one("SELECT count(*) FROM nodes"),
            "nodes_online": one("SELECT count(*) FROM nodes WHERE state = 'online'"),
            "telemetry_stored": one("SELECT count(*) FROM seen WHERE kind = 'telemetry'"),
            "health_stored": one("SELECT count(*) FROM health"),
            "events_stored": one("SELECT count(*) FROM events"),
            "replies_stored": one("SELECT count(*) FROM replies"),
            "invalid": one("SELECT count(*) FROM invalid"),
            "duplicates": one("SELECT coalesce(sum(duplicates), 0) FROM nodes"),
            "gaps": one("SELECT coalesce(sum(gaps), 0) FROM nodes"),
        }

    # -- internals --

    # The message path below uses the sqlite3 connection directly: sqlite-utils'
    # conveniences look the table up on every call, which cost more than the writes.

    def _node_row(self, node: str, at: str) -> dict:
        if node in self._rows:
            return dict(self._rows[node])
        cur = self.db.conn.execute("SELECT * FROM nodes WHERE id = ?", [node])
        row = cur.fetchone()
        if row is None:
            self._insert("nodes", {"id": node, "state": "unknown", "first_seen": at, "gaps": 0, "duplicates": 0,
                                   "invalid": 0})
            log.info("new node %s", node)
            cur = self.db.conn.execute("SELECT * FROM nodes WHERE id = ?", [node])
            row = cur.fetchone()
        row = dict(zip((c[0] for c in cur.description), row))
        if self._in_batch:
            self._rows[node] = dict(row)
        return row

    def _insert(self, table: str, row: dict) -> None:
        self.db.conn.execute(f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                             list(row.values()))

    def _insert_many(self, table: str, rows: list[dict]) -> None:
        """Insert now, or at the end of the batch (rows nothing in the batch reads back)."""
        if rows:
            cols = tuple(rows[0])
            values = [[r[c] for c in cols] for r in rows]
            if self._in_batch:
                self._deferred.setdefault((table, cols), []).extend(values)
            else:
                self.db.conn.executemany(
                    f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", values)

    def _update_node(self, node: str, changes: dict) -> None:
        if not changes:
            return
        if self._in_batch and node in self._rows:
            self._rows[node].update(changes)
            self._dirty.setdefault(node, {}).update(changes)
        else:
            self.db.conn.execute(f"UPDATE nodes SET {', '.join(f'{k} = ?' for k in changes)} WHERE id = ?",
                                 [*changes.values(), node])

    def _highest_seq(self, node: str, boot: int) -> int | None:
        return self.db.conn.execute("SELECT max(seq) FROM seen WHERE node = ? AND boot = ?",
                                    [node, boot]).fetchone()[0]

    def _mark_seen(self, node: str, boot: int, seq: int, kind: str, at: str) -> bool:
        cur = self.db.conn.execute("INSERT OR IGNORE INTO seen (node, boot, seq, kind, received_at) "
                                   "VALUES (?, ?, ?, ?, ?)", [node, boot, seq, kind, at])
        return cur.rowcount == 1

    def _track_gaps(self, node: str, boot: int, seq: int, highest: int | None, at: str) -> int:
        """Record or fill a gap; return the change in the number of missing messages."""
        expected = 0 if highest is None else highest + 1
        if seq > expected:
            self._insert("gaps", {"node": node, "boot": boot, "from_seq": expected, "to_seq": seq - 1,
                                  "detected_at": at})
            log.warning("gap: %s boot %d is missing seq %d..%d", node, boot, expected, seq - 1)
            return seq - expected
        if seq == expected:
            return 0
        rows = list(self.db.query("SELECT id, from_seq, to_seq, detected_at FROM gaps WHERE node = ? AND boot = ? "
                                  "AND from_seq <= ? AND to_seq >= ?", [node, boot, seq, seq]))
        if not rows:
            return 0
        gap = rows[0]
        table = self.db["gaps"]
        if gap["from_seq"] == gap["to_seq"]:
            table.delete(gap["id"])
            log.info("gap closed: %s boot %d seq %d arrived late", node, boot, seq)
        elif seq == gap["from_seq"]:
            table.update(gap["id"], {"from_seq": seq + 1})
        elif seq == gap["to_seq"]:
            table.update(gap["id"], {"to_seq": seq - 1})
        else:
            table.update(gap["id"], {"to_seq": seq - 1})
            table.insert({"node": node, "boot": boot, "from_seq": seq + 1, "to_seq": gap["to_seq"],
                          "detected_at": gap["detected_at"]})
        return -1

    def _store_telemetry(self, node: str, p: dict, at: str) -> None:
        common = {"node": node, "boot": p["boot"], "seq": p["seq"], "ts": p["ts"], "received_at": at,
                  "clock_set": int(p["clock_set"])}
        self._insert_many("telemetry", [
            {**common, "channel": name, "n": agg["n"], "min": agg["min"], "max": agg["max"],
             "mean": agg["mean"], "last": agg["last"], "sum": agg.get("sum")}
            for name, agg in p["ch"].items()])

    def _store_health(self, node: str, p: dict, at: str) -> None:
        self._insert("health", {
            "node": node, "boot": p["boot"], "seq": p["seq"], "ts": p["ts"], "received_at": at,
            "heap_free": p["heap_free"], "lag_max_ms": p["loop"]["lag_max_ms"],
            "overruns": p["loop"]["overruns"], "outbox_depth": p["outbox"]["depth"],
            "outbox_dropped": p["outbox"]["dropped"], "rssi": p.get("rssi"), "vbat_mv": p.get("vbat_mv"),
            "payload": json.dumps(p, separators=(",", ":"))})

    def _store_event(self, node: str, p: dict, at: str) -> None:
        self._insert("events", {
            "node": node, "boot": p["boot"], "seq": p["seq"], "ts": p["ts"], "received_at": at,
            "event": p["event"], "severity": p["severity"],
            "data": json.dumps(p.get("data", {}), separators=(",", ":"))})

    def _store_reply(self, node: str, p: dict, at: str) -> None:
        self._insert("replies", {
            "node": node, "boot": p["boot"], "seq": p["seq"], "ts": p["ts"], "received_at": at,
            "cmd_id": p["id"], "ok": int(p["ok"]),
            "result": json.dumps(p["result"]) if "result" in p else None, "error": p.get("error")})


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _why(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc)
