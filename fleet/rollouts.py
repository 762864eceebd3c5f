"""Rollouts: a release sent to the nodes in waves, each node's update watched, halted on failures.

    r = start(registry, "1.2.0", waves=["1", "10%", "100%"], soak_s=600, threshold=0.2, actor="sato")
    engine = Rollouts(settings, ingest).start(every_s=5)   # in `fleet serve`; engine.stop() at the end
    pause(registry, r["id"], "sato"); resume(registry, r["id"], "sato"); abort(registry, r["id"], "sato")

Targets: the nodes whose board is one of the release's boards and whose
firmware is not the release's version (or the nodes named). A node below the
release's min_version, or newer than the release (unless `force`), gets a
deployment in state `skipped` with the reason, since it would refuse.

Waves: each spec is a count ("1": the next node) or a percentage of all the
targets, counted with the earlier waves ("10%": until 10% of the targets are
in this or an earlier wave; "100%": everyone left). Targets are taken online
nodes first, then by node id. Empty waves are dropped; nodes left after the
last wave are not updated (end with "100%" to reach all).

The engine (`Rollouts.tick()`, every few seconds) works on one wave at a time:
it sends the `ota` command to the wave's online nodes (a node offline when its
wave starts gets it when it comes back, or is `skipped` after `offline_wait_s`);
moves each deployment along the node's replies (downloading, verifying,
staged, trial, committed, or failed / rolled_back); marks `timed_out` a node
that says nothing about its update for `step_timeout_s`; halts the rollout
when failed / finished updates exceed the threshold (judged once `min_sample`
updates finished, or when the wave is over); and starts the next wave when
every node of this one is finished and `soak_s` has passed. Every transition
is in `deployment_history`; start, pause, resume, abort and halts are in the
audit log.

Deployment states: pending -> sent -> downloading -> verifying -> staged ->
trial -> committed; or failed, rolled_back, timed_out, skipped.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import socket
import threading
from datetime import datetime, timedelta
from fractions import Fraction

from fleet import releases as R
from fleet.output import print_rows
from fleet.registry import Registry, iso, parse_iso, utc_now
from fleet.settings import Settings, get_settings

log = logging.getLogger("fleet.rollouts")

OTA_URL_ENV = "IWAKI_NODE_FLEET_URL"
DEFAULT_WAVES = ("1", "10%", "100%")
ACTIVE = ("running", "paused", "halted")
IN_FLIGHT = ("sent", "downloading", "verifying", "staged", "trial")
#: Commands sent to one node for one deployment, at most (a node that restarts mid-download is asked again).
MAX_ATTEMPTS = 3
FAILED = ("failed", "rolled_back", "timed_out")
FINAL = ("committed", *FAILED, "skipped")
#: how far along a deployment is; a node's reply moves it forward only
_RANK = {"pending": 0, "sent": 1, "downloading": 2, "verifying": 3, "staged": 4, "trial": 5,
         **dict.fromkeys(FINAL, 9)}
_NODE_STATES = ("downloading", "verifying", "staged", "trial", "committed", "rolled_back", "failed")
_WAVE = re.compile(r"^(\d+)$|^(\d+(?:\.\d+)?)%$")


class RolloutError(Exception):
    """A rollout that cannot start or change state. `code`: "invalid_request", "not_found" or "conflict";
    `field` names the bad input when there is one."""

    def __init__(self, message: str, code: str = "invalid_request", field: str | None = None):
        super().__init__(message)
        self.code = code
        self.field = field


# -- planning and starting ------------------------------------------------------

def plan(total: int, specs: list[str]) -> list[int]:
    """The size of each wave for `total` targets (see the module docstring)."""
    sizes, assigned = [], 0
    for spec in specs:
        m = _WAVE.match(str(spec).strip())
        if not m or (m.group(1) and int(m.group(1)) < 1) or (m.group(2) and not 0 < Fraction(m.group(2)) <= 100):
            raise RolloutError(f"wave {spec!r} is neither a node count (1, 5...) nor a percentage "
                               "of the targets (10%, 100%)", field="waves")
        want = int(m.group(1)) if m.group(1) else math.ceil(total * Fraction(m.group(2)) / 100) - assigned
        size = max(0, min(want, total - assigned))
        sizes.append(size)
        assigned += size
    return sizes


def start(registry: Registry, release: str, waves: list[str] | tuple[str, ...] = DEFAULT_WAVES,
          soak_s: float = 600.0, threshold: float = 0.2, actor: str = "cli", nodes: list[str] | None = None,
          force: bool = False) -> dict:
    """Start rolling out `release`; returns the rollout as `detail()` shows it.

    `nodes` limits the targets to these node ids. `force` lets nodes running a
    newer version take it (a downgrade). Only one rollout can be active
    (running, paused or halted) at a time.
    """
    rel = R.require(registry, release)
    if not waves:
        raise RolloutError("a rollout needs at least one wave", field="waves")
    if not 0 <= threshold <= 1:
        raise RolloutError(f"the failure threshold is a fraction between 0 and 1, not {threshold}", field="threshold")
    if soak_s < 0:
        raise RolloutError(f"the soak time cannot be negative ({soak_s})", field="soak_s")
    target_v = R.version_key(release)
    min_v = R.version_key(rel["min_version"]) if rel["min_version"] else None
    chosen = _candidates(registry, rel, nodes)
    targets, skipped = [], []
    for n in chosen:
        if n["fw"] == release:
            continue
        running = _version_or_none(n["fw"])
        if running is not None and min_v is not None and running < min_v:
            skipped.append((n, f"runs {n['fw']}, below the release's min_version {rel['min_version']}"))
        elif running is not None and running > target_v and not force:
            skipped.append((n, f"runs {n['fw']}, newer than {release} (start with force to downgrade)"))
        else:
            targets.append(n)
    if not targets:
        raise RolloutError(f"no node needs release {release}: {len(chosen)} node(s) of its boards "
                           f"({', '.join(rel['boards'])}), {len(skipped)} of them unable to take it", "conflict")
    targets.sort(key=lambda n: (n["state"] != "online", n["id"]))
    sizes = plan(len(targets), list(waves))
    plan_waves = [{"spec": str(spec), "size": size, "started_at": None, "finished_at": None}
                  for spec, size in zip(waves, sizes) if size]
    now = iso(utc_now())
    with registry.transaction():
        active = _active(registry)
        if active:
            raise RolloutError(f"rollout {active['id']} (release {active['release']}) is {active['state']}; "
                               "abort it or let it finish first", "conflict")
        rid = registry.db["rollouts"].insert({
            "release": release, "state": "running", "waves": json.dumps(plan_waves), "soak_s": float(soak_s),
            "failure_threshold": float(threshold), "force": int(force), "created_at": now, "created_by": actor,
            "updated_at": now, "reason": None}).last_pk
        queue = iter(targets)
        for wave, w in enumerate(plan_waves, start=1):
            for _ in range(w["size"]):
                _new_deployment(registry, rid, next(queue), wave, "pending", None, now)
        for n, why in skipped:
            _new_deployment(registry, rid, n, None, "skipped", why, now)
        sizes_text = ", ".join(f"{w['spec']} ({w['size']})" for w in plan_waves)
        _audit(registry, actor, "rollout.start", rid, f"release {release}; waves {sizes_text}; soak {soak_s:g} s; "
               f"threshold {threshold:g}" + ("; force" if force else ""))
    return detail(registry, rid)


def _candidates(registry: Registry, rel: dict, nodes: list[str] | None) -> list[dict]:
    if nodes is None:
        marks = ",".join("?" * len(rel["boards"]))
        return list(registry.db.query(f"SELECT * FROM nodes WHERE board IN ({marks}) ORDER BY id", rel["boards"]))
    found = []
    for node_id in dict.fromkeys(nodes):
        row = registry.node(node_id)
        if row is None:
            raise RolloutError(f"no node {node_id!r} in the registry", "not_found", "nodes")
        if row["board"] not in rel["boards"]:
            raise RolloutError(f"node {node_id} is a {row['board'] or 'board not yet known'}; release "
                               f"{rel['version']} is for {', '.join(rel['boards'])}", field="nodes")
        found.append(row)
    return found


def _new_deployment(registry: Registry, rollout: int, node: dict, wave: int | None, state: str,
                    reason: str | None, now: str) -> None:
    did = registry.db["deployments"].insert({
        "rollout": rollout, "node": node["id"], "wave": wave, "state": state, "attempt": 1, "cmd_id": None,
        "from_version": node["fw"], "updated_at": now, "reason": reason}).last_pk
    registry.db["deployment_history"].insert({"deployment": did, "at": now, "state": state,
                                              "detail": reason or (f"wave {wave}" if wave else None)})


# -- operator actions -----------------------------------------------------------

def pause(registry: Registry, rollout_id: int, actor: str = "cli", reason: str | None = None) -> dict:
    """Stop sending the command to more nodes; updates already under way go on and are watched."""
    return _set_state(registry, rollout_id, actor, "pause", ("running",), "paused", reason or f"paused by {actor}")


def resume(registry: Registry, rollout_id: int, actor: str = "cli", threshold: float | None = None) -> dict:
    """Run a paused or halted rollout again. A halted one resumes only when its failure rate is
    within the threshold: pass a higher `threshold` to accept the failures so far."""
    if threshold is not None and not 0 <= threshold <= 1:
        raise RolloutError(f"the failure threshold is a fraction between 0 and 1, not {threshold}", field="threshold")
    with registry.transaction():
        r = _require(registry, rollout_id)
        if r["state"] not in ("paused", "halted"):
            raise RolloutError(f"rollout {rollout_id} is {r['state']}; only a paused or halted one resumes",
                               "conflict")
        limit = r["failure_threshold"] if threshold is None else threshold
        failures, finished = _failure_counts(registry, rollout_id)
        if r["state"] == "halted" and finished and failures / finished > limit:
            raise RolloutError(f"rollout {rollout_id} has {failures} failed of {finished} finished updates "
                               f"({failures / finished:.0%}), above the threshold {limit:g}: resume with a "
                               "higher threshold to accept them, or abort", "conflict")
        now = iso(utc_now())
        registry.db["rollouts"].update(rollout_id, {"state": "running", "failure_threshold": float(limit),
                                                    "updated_at": now, "reason": None})
        _audit(registry, actor, "rollout.resume", rollout_id,
               f"from {r['state']}" + (f"; threshold {limit:g}" if threshold is not None else ""))
    return detail(registry, rollout_id)


def abort(registry: Registry, rollout_id: int, actor: str = "cli", reason: str | None = None) -> dict:
    """End the rollout: nodes not sent the command yet are `skipped`; updates under way finish
    on the nodes (there is no recall) and are still recorded."""
    why = reason or f"aborted by {actor}"
    with registry.transaction():
        _set_state_in(registry, rollout_id, actor, "abort", ACTIVE, "aborted", why)
        now = iso(utc_now())
        for d in registry.db.query("SELECT id FROM deployments WHERE rollout = ? AND state = 'pending'",
                                   [rollout_id]):
            _transition(registry, d["id"], "pending", "skipped", "rollout aborted", now)
    return detail(registry, rollout_id)


def _set_state(registry: Registry, rollout_id: int, actor: str, verb: str, allowed: tuple, state: str,
               reason: str) -> dict:
    with registry.transaction():
        _set_state_in(registry, rollout_id, actor, verb, allowed, state, reason)
    return detail(registry, rollout_id)


def _set_state_in(registry, rollout_id, actor, verb, allowed, state, reason) -> None:
    r = _require(registry, rollout_id)
    if r["state"] not in allowed:
        raise RolloutError(f"rollout {rollout_id} is {r['state']}; cannot {verb} it", "conflict")
    registry.db["rollouts"].update(rollout_id, {"state": state, "updated_at": iso(utc_now()), "reason": reason})
    _audit(registry, actor, f"rollout.{verb}", rollout_id, reason)


# -- reading --------------------------------------------------------------------

def rollouts(registry: Registry) -> list[dict]:
    """Every rollout, newest first, with its deployment counts by state."""
    return [_summary(registry, r) for r in registry.db.query("SELECT * FROM rollouts ORDER BY id DESC")]


def detail(registry: Registry, rollout_id: int) -> dict:
    """The rollout, its counts, and every deployment with its history (oldest first)."""
    r = _summary(registry, _require(registry, rollout_id))
    deps = list(registry.db.query("SELECT * FROM deployments WHERE rollout = ? ORDER BY coalesce(wave, 1e9), "
                                  "node", [rollout_id]))
    history: dict[int, list] = {d["id"]: [] for d in deps}
    for h in registry.db.query("SELECT h.* FROM deployment_history h JOIN deployments d ON d.id = h.deployment "
                               "WHERE d.rollout = ? ORDER BY h.id", [rollout_id]):
        history[h["deployment"]].append({"at": h["at"], "state": h["state"], "detail": h["detail"]})
    return r | {"deployments": [d | {"history": history[d["id"]]} for d in deps]}


def _summary(registry: Registry, r: dict) -> dict:
    counts = dict(registry.db.execute("SELECT state, count(*) FROM deployments WHERE rollout = ? GROUP BY state",
                                      [r["id"]]).fetchall())
    failures, finished = _failure_counts(registry, r["id"])
    current = next((i for i, w in enumerate(json.loads(r["waves"]), 1) if not w["finished_at"]), None)
    return {**r, "waves": json.loads(r["waves"]), "force": bool(r["force"]), "current_wave": current,
            "counts": counts, "failure_rate": round(failures / finished, 4) if finished else None}


def _require(registry: Registry, rollout_id: int) -> dict:
    rows = list(registry.db.query("SELECT * FROM rollouts WHERE id = ?", [rollout_id]))
    if not rows:
        raise RolloutError(f"no rollout {rollout_id} (`fleet rollout list` shows them)", "not_found")
    return rows[0]


def _active(registry: Registry) -> dict | None:
    rows = list(registry.db.query("SELECT * FROM rollouts WHERE state IN ('running', 'paused', 'halted') "
                                  "ORDER BY id LIMIT 1"))
    return rows[0] if rows else None


def _failure_counts(registry: Registry, rollout_id: int) -> tuple[int, int]:
    """(failed, finished): finished updates are committed or failed (skipped ones do not count)."""
    rows = dict(registry.db.execute(
        "SELECT state, count(*) FROM deployments WHERE rollout = ? GROUP BY state", [rollout_id]).fetchall())
    failures = sum(rows.get(s, 0) for s in FAILED)
    return failures, failures + rows.get("committed", 0)


# -- the engine -----------------------------------------------------------------

def ota_url(settings: Settings) -> str:
    """Where nodes download releases: `IWAKI_NODE_FLEET_URL` (settings.node_fleet_url), else
    http://<API host>:<API port>, with this host's name for a wildcard address. Nodes cannot use
    a loopback address: set IWAKI_NODE_FLEET_URL."""
    url = getattr(settings, "node_fleet_url", None)  # the provisioning settings; absent in older trees
    if url:
        return url.rstrip("/")
    host = settings.api_host
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    return f"http://{host}:{settings.api_port}"


class Rollouts:
    """The rollout engine: `tick()` does one round of work on every rollout (see the module docstring).

    `fleet serve` runs it in a thread: `Rollouts(settings, ingest).start(every_s=5)`, then `stop()`.
    `ingest` is the running `fleet.ingest.Ingest` whose `command()` publishes to the nodes.
    """

    def __init__(self, settings: Settings, ingest, *, base_url: str | None = None, step_timeout_s: float = 900.0,
                 offline_wait_s: float = 3600.0, min_sample: int = 5, trial_s: float = 180.0):
        self.settings = settings
        self.ingest = ingest
        self.base_url = (base_url or ota_url(settings)).rstrip("/")
        self.step_timeout = timedelta(seconds=step_timeout_s)
        self.offline_wait = timedelta(seconds=offline_wait_s)
        self.min_sample = min_sample
        self.trial_ms = trial_s * 1000
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self.base_url.split("://", 1)[-1].startswith(("127.", "localhost", "[::1]")):
            log.warning("nodes are told to download releases from %s, a loopback address; set %s to a URL "
                        "the nodes can reach", self.base_url, OTA_URL_ENV)

    def start(self, every_s: float = 5.0) -> "Rollouts":
        """Call `tick()` every `every_s` seconds in a daemon thread until `stop()`."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, args=(every_s,), name="fleet-rollouts", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None

    def _loop(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                for line in self.tick():
                    log.info("%s", line)
            except Exception:
                log.exception("rollout engine: this round failed; retrying in %g s", every_s)

    def tick(self, now: datetime | None = None) -> list[str]:
        """One round: watch every update under way, then drive every running rollout.
        Returns what changed, one line each (for the log)."""
        now = now or utc_now()
        changes: list[str] = []
        with Registry(self.settings.db) as reg:
            self._watch(reg, now, changes)
            for r in list(reg.db.query("SELECT * FROM rollouts WHERE state = 'running' ORDER BY id")):
                self._drive(reg, r, now, changes)
        return changes

    # -- watching the nodes --

    def _watch(self, reg: Registry, now: datetime, changes: list[str]) -> None:
        rows = list(reg.db.query(
            "SELECT d.*, r.release AS version, n.fw AS node_fw, n.boot AS node_boot FROM deployments d "
            "JOIN rollouts r ON r.id = d.rollout LEFT JOIN nodes n ON n.id = d.node "
            f"WHERE d.state IN ({','.join('?' * len(IN_FLIGHT))}) ORDER BY d.id", IN_FLIGHT))
        for d in rows:
            steps, state, active = [], d["state"], parse_iso(d["updated_at"])
            staged_boot = reply_boot = None
            for rep in reg.db.query("SELECT boot, seq, ok, result, error, received_at FROM replies "
                                    "WHERE node = ? AND cmd_id = ? ORDER BY boot, seq, id", [d["node"], d["cmd_id"]]):
                active = max(active, parse_iso(rep["received_at"]))
                reply_boot = rep["boot"]
                new, why = _reply_state(rep)
                if new == "staged":
                    staged_boot = rep["boot"]
                if new and _RANK[new] > _RANK[state]:
                    steps.append((new, why))
                    state = new
            fw, version = d["node_fw"], d["version"]
            if state in IN_FLIGHT and fw == version and _RANK[state] < _RANK["trial"]:
                steps.append(("trial", f"the node reports it runs {version}"))
                state = "trial"
            if state == "trial" and self._passed_trial(reg, d, staged_boot):
                steps.append(("committed", f"the node still runs {version} after its trial period"))
                state = "committed"
            elif (state in ("staged", "trial") and staged_boot is not None and d["node_boot"] is not None
                  and d["node_boot"] > staged_boot and fw and fw != version):
                steps.append(("rolled_back", f"the node restarted running {fw}, not {version}"))
                state = "rolled_back"
            if (state in ("downloading", "verifying") and not steps and reply_boot is not None
                    and d["node_boot"] is not None and d["node_boot"] > reply_boot and fw != version
                    and d["attempt"] < MAX_ATTEMPTS):
                # the node restarted (power lost) mid-download: it resumes only when asked again
                with reg.transaction():
                    if _transition(reg, d["id"], state, "pending", f"the node restarted during the "
                                   f"download (attempt {d['attempt']}); sending it again", iso(now)):
                        reg.db["deployments"].update(d["id"], {"attempt": d["attempt"] + 1})
                        changes.append(f"rollout {d['rollout']}: {d['node']} {state} -> pending (restarted)")
                continue
            if state in IN_FLIGHT and now - active > self.step_timeout:
                steps.append(("timed_out", f"no word about the update for {self.step_timeout.total_seconds():g} s "
                                           f"(last state {state})"))
            if steps:
                with reg.transaction():
                    current = d["state"]
                    for new, why in steps:
                        if not _transition(reg, d["id"], current, new, why, iso(now)):
                            break
                        changes.append(f"rollout {d['rollout']}: {d['node']} {current} -> {new}"
                                       + (f" ({why})" if why else ""))
                        current = new

    def _passed_trial(self, reg: Registry, d: dict, staged_boot: int | None) -> bool:
        """A health report, since the command, of the new version up longer than the trial lasts."""
        for h in reg.db.query("SELECT boot, payload FROM health WHERE node = ? AND received_at >= ? "
                              "ORDER BY received_at DESC, id DESC LIMIT 20", [d["node"], _sent_at(reg, d)]):
            p = json.loads(h["payload"])
            if (p.get("fw") == d["version"] and (staged_boot is None or h["boot"] > staged_boot)
                    and p.get("up_ms", 0) >= self.trial_ms):
                return True
        return False

    # -- driving a rollout --

    def _drive(self, reg: Registry, r: dict, now: datetime, changes: list[str]) -> None:
        waves = json.loads(r["waves"])
        index = next((i for i, w in enumerate(waves) if not w["finished_at"]), None)
        if index is None:
            self._finish(reg, r, "done", "every wave finished", now, changes)
            return
        wave = waves[index]
        number = index + 1
        if not wave["started_at"]:
            if index and now < parse_iso(waves[index - 1]["finished_at"]) + timedelta(seconds=r["soak_s"]):
                return  # soaking
            wave["started_at"] = iso(now)
            self._save_waves(reg, r["id"], waves, now)
            changes.append(f"rollout {r['id']}: wave {number} ({wave['spec']}, {wave['size']} nodes) started")
        started = parse_iso(wave["started_at"])
        release = R.require(reg, r["release"])
        for d in list(reg.db.query("SELECT d.*, n.state AS node_state, n.fw AS node_fw FROM deployments d "
                                   "LEFT JOIN nodes n ON n.id = d.node WHERE d.rollout = ? AND d.wave = ? "
                                   "AND d.state = 'pending' ORDER BY d.node", [r["id"], number])):
            if d["node_fw"] == r["release"]:
                self._move(reg, d, "skipped", f"already runs {r['release']}", now, changes)
            elif d["node_state"] == "online":
                self._send(reg, r, release, d, now, changes)
            elif now - started > self.offline_wait:
                self._move(reg, d, "skipped", f"offline for {self.offline_wait.total_seconds():g} s after "
                                              "its wave started", now, changes)
        counts = dict(reg.db.execute("SELECT state, count(*) FROM deployments WHERE rollout = ? AND wave = ? "
                                     "GROUP BY state", [r["id"], number]).fetchall())
        wave_over = all(s in FINAL for s in counts)
        failures, finished = _failure_counts(reg, r["id"])
        if failures and (finished >= self.min_sample or wave_over) and failures / finished > r["failure_threshold"]:
            self._finish(reg, r, "halted", f"{failures} of {finished} finished updates failed "
                                           f"({failures / finished:.0%}, threshold {r['failure_threshold']:g})",
                         now, changes)
            return
        if wave_over:
            wave["finished_at"] = iso(now)
            self._save_waves(reg, r["id"], waves, now)
            changes.append(f"rollout {r['id']}: wave {number} finished ({_counts_text(counts)})")
            if number == len(waves):
                self._finish(reg, r, "done", "every wave finished", now, changes)

    def _send(self, reg: Registry, r: dict, release: dict, d: dict, now: datetime, changes: list[str]) -> None:
        """Claim the deployment (pending -> sent, so a second engine cannot send it too), then
        publish the command; if the broker cannot take it, it goes back to pending for the next round."""
        from fleet.ingest import IngestError
        cmd_id = f"{d['id']}-{d['attempt']}"
        args = {"url": f"{self.base_url}/ota/releases/{r['release']}/", "version": r["release"],
                "kind": release["kind"], "force": bool(r["force"])}
        with reg.transaction():
            if not _transition(reg, d["id"], "pending", "sent", f"command {cmd_id}", iso(now)):
                return
            reg.db["deployments"].update(d["id"], {"cmd_id": cmd_id})
        try:
            self.ingest.command(d["node"], "ota", args, cmd_id=cmd_id)
        except IngestError as exc:
            log.warning("rollout %s: could not send the update to %s yet: %s", r["id"], d["node"], exc)
            with reg.transaction():
                _transition(reg, d["id"], "sent", "pending", f"not sent ({exc}); retried", iso(utc_now()))
            return
        changes.append(f"rollout {r['id']}: {d['node']} pending -> sent ({cmd_id})")

    def _move(self, reg: Registry, d: dict, state: str, why: str, now: datetime, changes: list[str]) -> None:
        with reg.transaction():
            if _transition(reg, d["id"], d["state"], state, why, iso(now)):
                changes.append(f"rollout {d['rollout']}: {d['node']} {d['state']} -> {state} ({why})")

    def _finish(self, reg: Registry, r: dict, state: str, why: str, now: datetime, changes: list[str]) -> None:
        with reg.transaction():
            cur = reg.db.execute("UPDATE rollouts SET state = ?, reason = ?, updated_at = ? "
                                 "WHERE id = ? AND state = 'running'", [state, why, iso(now), r["id"]])
            if cur.rowcount:
                _audit(reg, "fleet", f"rollout.{'halt' if state == 'halted' else state}", r["id"], why)
                changes.append(f"rollout {r['id']}: {state} ({why})")

    def _save_waves(self, reg: Registry, rollout_id: int, waves: list[dict], now: datetime) -> None:
        with reg.transaction():
            reg.db["rollouts"].update(rollout_id, {"waves": json.dumps(waves), "updated_at": iso(now)})


def _reply_state(rep: dict) -> tuple[str | None, str | None]:
    """(deployment state, detail) that a node's reply reports, or (None, None)."""
    try:
        result = json.loads(rep["result"]) if rep["result"] else None
    except ValueError:
        result = None
    ota = result.get("ota") if isinstance(result, dict) else None
    if isinstance(ota, dict) and ota.get("state") in _NODE_STATES:
        state = ota["state"]
        if state in ("failed", "rolled_back"):
            return state, str(ota.get("reason") or rep["error"] or state)
        if state == "downloading" and "total" in ota:
            return state, f"{ota.get('done', 0)}/{ota['total']} bytes"
        return state, None
    if not rep["ok"]:  # a node that cannot update at all (no ota command, bad arguments)
        return "failed", rep["error"] or "the node refused the command"
    return None, None


def _transition(reg: Registry, deployment: int, current: str, new: str, detail: str | None, at: str) -> bool:
    """Move a deployment from `current` to `new` (if still `current`) and record it; True when moved."""
    cur = reg.db.execute("UPDATE deployments SET state = ?, updated_at = ?, reason = ? WHERE id = ? AND state = ?",
                         [new, at, detail if new in FAILED or new == "skipped" else None, deployment, current])
    if not cur.rowcount:
        return False
    reg.db["deployment_history"].insert({"deployment": deployment, "at": at, "state": new, "detail": detail})
    return True


def _sent_at(reg: Registry, d: dict) -> str:
    row = reg.db.execute("SELECT min(at) FROM deployment_history WHERE deployment = ? AND state = 'sent'",
                         [d["id"]]).fetchone()
    return row[0] or d["updated_at"]


def _version_or_none(text: str | None) -> tuple[int, ...] | None:
    try:
        return R.version_key(text)
    except R.ReleaseError:
        return None


def _counts_text(counts: dict) -> str:
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))


def _audit(reg: Registry, actor: str, action: str, rollout_id: int, detail: str | None) -> None:
    reg.db["audit"].insert({"at": iso(utc_now()), "actor": actor, "action": action,
                            "target": f"rollout {rollout_id}", "detail": detail or ""})


# -- command line: `python -m fleet rollout` --------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("start", "list", "show", "pause", "resume", "abort"),
                   help="start --release V; list; show ID; pause ID; resume ID; abort ID")
    p.add_argument("rollout", nargs="?", type=int, metavar="ID", help="the rollout, for show, pause, resume, abort")
    p.add_argument("--release", metavar="V", help="start: the release to roll out")
    p.add_argument("--wave", action="append", metavar="N|P%",
                   help="start: a wave, repeated in order: a node count or a percentage of the targets "
                        "(default 1, 10%%, 100%%)")
    p.add_argument("--soak", type=float, default=600.0, metavar="S",
                   help="start: seconds to wait after a wave before the next (default 600)")
    p.add_argument("--threshold", type=float, metavar="F",
                   help="start: halt when this fraction of finished updates failed (default 0.2); "
                        "resume: a new threshold")
    p.add_argument("--node", action="append", metavar="ID", help="start: only these nodes (repeated)")
    p.add_argument("--force", action="store_true", help="start: let nodes running a newer version take it")
    p.add_argument("--reason", help="pause, abort: why, for the record")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--db", help="registry file (IWAKI_DB, default var/fleet.db)")
    p.add_argument("--actor", default=os.environ.get("USER", "cli"),
                   help="who does this, for the audit log (default $USER)")


def run(args: argparse.Namespace) -> int:
    """`fleet rollout ...`: each action is the function of the same name; `fleet serve` does the work."""
    from fleet.cli import UsageError
    settings = get_settings().override(db=args.db)
    if args.action == "start" and not args.release:
        raise UsageError("rollout start needs --release V")
    if args.action not in ("start", "list") and args.rollout is None:
        raise UsageError(f"rollout {args.action} needs a rollout id")
    with Registry(settings.db, create=False) as registry:
        if args.action == "start":
            out = start(registry, args.release, args.wave or DEFAULT_WAVES, args.soak,
                        0.2 if args.threshold is None else args.threshold, args.actor, args.node, args.force)
        elif args.action == "list":
            print_rows(rollouts(registry), args.json, "rollouts",
                       lambda r: f"{r['id']:>4}  {r['release']:<10} {r['state']:<8} wave {r['current_wave'] or '-'}/"
                                 f"{len(r['waves'])}  {_counts_text(r['counts'])}  {r['created_at']}  "
                                 f"{r['reason'] or ''}")
            return 0
        elif args.action == "show":
            out = detail(registry, args.rollout)
        elif args.action == "pause":
            out = pause(registry, args.rollout, args.actor, args.reason)
        elif args.action == "resume":
            out = resume(registry, args.rollout, args.actor, args.threshold)
        else:
            out = abort(registry, args.rollout, args.actor, args.reason)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"rollout {out['id']}: release {out['release']}, {out['state']}"
          + (f" ({out['reason']})" if out["reason"] else "")
          + f"; wave {out['current_wave'] or '-'} of {len(out['waves'])}; {_counts_text(out['counts'])}")
    if args.action == "show":
        for d in out["deployments"]:
            print(f"  wave {d['wave'] or '-':<3} {d['node']:<16} {d['state']:<12} from {d['from_version'] or '-':<10}"
                  f" {d['updated_at']}  {d['reason'] or ''}")
    return 0
