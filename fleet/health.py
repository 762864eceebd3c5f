"""Node health alerts: they open and close by themselves; operators acknowledge.

`evaluate(registry)` looks at each node's state and latest health report
and keeps one open alert per (node, kind) while its condition holds:

| kind | severity | condition |
| --- | --- | --- |
| `offline` | warning | the node is offline (last will, clean stop or heartbeat timeout) |
| `reboot_loop` | critical | 3 or more boots within 10 minutes |
| `low_heap` | warning | free heap under 16 KiB |
| `loop_overruns` | warning | the sampling loop overran in the last health period |
| `outbox_backlog` | warning | more than 100 messages wait in the node's outbox |
| `clock_not_set` | info | the node's clock has no UTC time |
| `sensor_fault` | warning | a sensor reports `warning` or `failed` |
| `sequence_gap` | warning | messages lost (a gap) in the last hour |
| `upstream_backlog` | warning | (node `fleet`) a delivery to the city platform has waited more than 5 minutes |

An acknowledged alert stays open until its condition clears; it is then
closed, and a new occurrence opens a new alert.
"""
from __future__ import annotations

import json
from datetime import datetime, timedelta

from fleet.registry import Registry, iso, utc_now

LOW_HEAP = 16 * 1024
BACKLOG = 100
REBOOTS = 3
REBOOT_WINDOW = timedelta(minutes=10)
GAP_WINDOW = timedelta(hours=1)
SEVERITY = {"offline": "warning", "reboot_loop": "critical", "low_heap": "warning",
            "loop_overruns": "warning", "outbox_backlog": "warning", "clock_not_set": "info",
            "sensor_fault": "warning", "sequence_gap": "warning", "upstream_backlog": "warning"}
#: The fleet's own alerts are filed under this node name.
FLEET = "fleet"
UPSTREAM_WAIT = timedelta(minutes=5)


class AlertError(Exception):
    """No such alert, or it cannot be acknowledged."""


def conditions(reg: Registry, node: dict, now: datetime) -> dict[str, str]:
    """The alert kinds that hold for one node now: {kind: message}."""
    out = {}
    nid = node["id"]
    if node["state"] == "offline":
        out["offline"] = f"offline ({node.get('state_reason') or 'unknown'}) since {node.get('state_at')}"
    row = reg.db.execute("SELECT payload FROM health WHERE node = ? ORDER BY received_at DESC, id DESC LIMIT 1",
                         [nid]).fetchone()
    if row:
        h = json.loads(row[0])
        if h["heap_free"] < LOW_HEAP:
            out["low_heap"] = f"{h['heap_free']} bytes of heap free"
        if h["loop"]["overruns"] > 0:
            out["loop_overruns"] = f"{h['loop']['overruns']} overruns, lag up to {h['loop']['lag_max_ms']} ms"
        if h["outbox"]["depth"] > BACKLOG:
            out["outbox_backlog"] = f"{h['outbox']['depth']} messages waiting"
        if not h["clock_set"]:
            out["clock_not_set"] = "the node's clock is not set"
        bad = sorted(f"{k} {v['status']}" for k, v in h["sensors"].items() if v["status"] != "ok")
        if bad:
            out["sensor_fault"] = ", ".join(bad)
    since = iso(now - REBOOT_WINDOW)
    boots = reg.db.execute("SELECT COUNT(DISTINCT boot) FROM seen WHERE node = ? AND received_at > ?",
                           [nid, since]).fetchone()[0]
    if boots >= REBOOTS:
        out["reboot_loop"] = f"{boots} boots in {int(REBOOT_WINDOW.total_seconds() // 60)} minutes"
    gaps = reg.db.execute("SELECT COUNT(*), COALESCE(SUM(to_seq - from_seq + 1), 0) FROM gaps "
                          "WHERE node = ? AND detected_at > ?", [nid, iso(now - GAP_WINDOW)]).fetchone()
    if gaps[0]:
        out["sequence_gap"] = f"{gaps[1]} messages missing in {gaps[0]} gaps in the last hour"
    return out


def evaluate(reg: Registry, now: datetime | None = None) -> tuple[int, int]:
    """Open alerts whose condition holds, close those whose condition ended.
    Returns (opened, closed)."""
    now = now or utc_now()
    at = iso(now)
    opened = closed = 0
    with reg.transaction():  # relay workers evaluate too: one at a time, so no alert opens twice
        open_rows = {(r["node"], r["kind"]): r for r in reg.db["alerts"].rows_where("closed_at IS NULL")}
        for node in reg.nodes():
            held = conditions(reg, node, now)
            for kind, message in held.items():
                r = open_rows.pop((node["id"], kind), None)
                if r is None:
                    reg.db["alerts"].insert({"node": node["id"], "kind": kind, "severity": SEVERITY[kind],
                                             "message": message, "opened_at": at, "closed_at": None,
                                             "acked_at": None, "acked_by": None})
                    opened += 1
                elif r["message"] != message:
                    reg.db["alerts"].update(r["id"], {"message": message})
        waiting = reg.upstream_stats()
        if waiting["oldest_pending"] and waiting["oldest_pending"] < iso(now - UPSTREAM_WAIT):
            message = (f"{waiting['backlog']} deliveries wait for the city platform, "
                       f"the oldest since {waiting['oldest_pending']}")
            r = open_rows.pop((FLEET, "upstream_backlog"), None)
            if r is None:
                reg.db["alerts"].insert({"node": FLEET, "kind": "upstream_backlog", "severity": "warning",
                                         "message": message, "opened_at": at, "closed_at": None,
                                         "acked_at": None, "acked_by": None})
                opened += 1
            elif r["message"] != message:
                reg.db["alerts"].update(r["id"], {"message": message})
        for r in open_rows.values():
            reg.db["alerts"].update(r["id"], {"closed_at": at})
            closed += 1
    return opened, closed


def alerts(reg: Registry, include_closed: bool = False) -> list[dict]:
    where = None if include_closed else "closed_at IS NULL"
    return list(reg.db["alerts"].rows_where(where, order_by="opened_at DESC, id DESC"))


def acknowledge(reg: Registry, alert_id: int, who: str) -> dict:
    """An operator has seen the alert: it stays open until it clears."""
    row = next(reg.db["alerts"].rows_where("id = ?", [alert_id]), None)
    if row is None:
        raise AlertError(f"no alert {alert_id}")
    if row["closed_at"]:
        raise AlertError(f"alert {alert_id} closed at {row['closed_at']}; nothing to acknowledge")
    with reg.transaction():
        reg.db["alerts"].update(alert_id, {"acked_at": iso(utc_now()), "acked_by": who})
        reg.db["audit"].insert({"at": iso(utc_now()), "actor": who, "action": "alert.ack",
                                "target": f"{row['node']}/{row['kind']}", "detail": str(alert_id)})
    return next(reg.db["alerts"].rows_where("id = ?", [alert_id]))
