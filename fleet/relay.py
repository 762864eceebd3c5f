"""Relay: deliver the upstream outbox to the city data platform, at least once, in order.

    relay = Relay(settings)     # settings.upstream_mqtt and/or settings.upstream_http
    relay.start()
    ...
    relay.stop()

The ingest writer puts the NGSI-LD entities of every stored message
(`fleet.ngsi.entities`) into the `upstream` table in the same transaction
as the message. This module takes them out again:

- A worker claims the oldest pending rows (a lease in the registry, so
  several relay processes on the same registry never deliver the same row
  at the same time, and a killed worker's rows are taken over when its
  lease runs out), delivers them to every configured target, and marks
  them delivered. Order is the outbox's order within each worker.
- Platform down: the batch keeps its lease and is retried first, with a
  growing pause (0.5 s to 15 s); newer rows wait behind it on disk.
  Nothing is dropped, and the backlog shows in `backlog()`, the API and
  `/metrics`.
- At least once: a batch that reached the platform just before a crash
  is sent again. Entity ids are stable (`urn:ngsi-ld:<Type>:iwaki:<node>`),
  so re-delivery is an idempotent upsert.
- An entity the NGSI-LD broker refuses for good (a 4xx for that entity in
  a batch) leaves the queue as `failed`, with the reason; it is counted,
  never silently dropped.

Targets: `MqttTarget` publishes each entity with QoS 1 to
`<prefix>/<type>/<entity id>` on the platform's broker and waits for the
PUBACKs; `HttpTarget` sends NGSI-LD batch upserts
(`POST /ngsi-ld/v1/entityOperations/upsert?options=update`).
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import random
import signal
import socket
import threading
import time
from urllib.parse import unquote, urlsplit

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fleet.mqtt_client import Client
from fleet.registry import Registry
from fleet.settings import Settings, get_settings

log = logging.getLogger("fleet.relay")

COUNTERS = ("delivered", "failed", "attempts", "errors", "restarts")
_SPAWN = multiprocessing.get_context("spawn")


class UpstreamError(Exception):
    """The platform could not take a batch now (unreachable, refusing, timed out): retry later."""


def redact(url: str) -> str:
    """`url` without its password, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


class MqttTarget:
    """The platform's MQTT broker: one QoS 1 message per entity, retained off."""

    name = "mqtt"

    def __init__(self, url: str, client_id: str, timeout: float = 10.0):
        parts = urlsplit(url)
        self.where = redact(url)
        self.host, self.port = parts.hostname, parts.port or 1883
        self.prefix = parts.path.strip("/") or "iwaki/ngsi-ld"
        self.timeout = timeout
        self._connected = threading.Event()
        self.client = Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True,
                                  protocol=mqtt.MQTTv311)
        if parts.username:
            self.client.username_pw_set(unquote(parts.username), unquote(parts.password or ""))
        self.client.max_inflight_messages_set(100)  # paho scans its in-flight list on every PUBACK
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(0.5, 10)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self._started = False

    def topic(self, entity_type: str, entity_id: str) -> str:
        return f"{self.prefix}/{entity_type}/{entity_id}"

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("platform broker %s refused us: %s", self.where, reason_code)
            return
        log.info("connected to the platform broker %s", self.where)
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self._connected.is_set() and self._started:
            log.warning("lost the platform broker %s (%s)", self.where, reason_code)
        self._connected.clear()

    def _ensure(self) -> None:
        if not self._started:
            self._started = True
            try:
                self.client.connect_async(self.host, self.port, keepalive=30)
            except (OSError, ValueError) as exc:
                raise UpstreamError(f"cannot reach the platform broker {self.where}: {exc}") from None
            self.client.loop_start()
        if not self._connected.wait(min(self.timeout, 2.0)):
            raise UpstreamError(f"platform broker {self.where} is not reachable")

    def deliver(self, rows: list[dict]) -> dict[int, str]:
        self._ensure()
        infos = []
        for row in rows:
            info = self.client.publish(self.topic(row["entity_type"], row["entity_id"]), row["body"], qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise UpstreamError(f"platform broker {self.where}: publish failed ({mqtt.error_string(info.rc)})")
            infos.append(info)
        deadline = time.monotonic() + self.timeout
        for info in infos:
            while not info.is_published():
                if time.monotonic() >= deadline or not self._connected.is_set():
                    raise UpstreamError(f"platform broker {self.where} did not acknowledge the batch")
                time.sleep(0.002)
        return {}

    def close(self) -> None:
        if self._started:
            self._started = False
            self.client.disconnect()
            self.client.loop_stop()


class HttpTarget:
    """An NGSI-LD context broker: batch upserts, the entities' own @context in the body."""

    name = "http"
    PATH = "/ngsi-ld/v1/entityOperations/upsert"

    def __init__(self, url: str, token: str | None = None, timeout: float = 10.0):
        self.where = redact(url)
        self.url = url.rstrip("/") + self.PATH
        headers = {"Content-Type": "application/ld+json", "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.client = httpx.Client(headers=headers, timeout=timeout)

    def deliver(self, rows: list[dict]) -> dict[int, str]:
        body = "[" + ",".join(row["body"] for row in rows) + "]"
        try:
            r = self.client.post(self.url, params={"options": "update"}, content=body.encode())
        except httpx.HTTPError as exc:
            raise UpstreamError(f"NGSI-LD broker {self.where} unreachable: {exc}") from None
        if r.status_code in (200, 201, 204):
            return {}
        if r.status_code == 207:  # some entities refused: those leave the queue as failed
            return self._refused(rows, r)
        if r.status_code in (400, 413, 422) and len(rows) > 1:
            # a bad entity spoils the batch: send them one by one to find it
            refused: dict[int, str] = {}
            for row in rows:
                refused.update(self.deliver([row]))
            return refused
        if r.status_code in (400, 422):
            return {rows[0]["id"]: f"refused by the NGSI-LD broker: HTTP {r.status_code} {r.text[:200]}"}
        raise UpstreamError(f"NGSI-LD broker {self.where} answered HTTP {r.status_code}: {r.text[:200]}")

    @staticmethod
    def _refused(rows: list[dict], response: httpx.Response) -> dict[int, str]:
        try:
            errors = response.json().get("errors", [])
        except (ValueError, AttributeError):
            raise UpstreamError(f"NGSI-LD broker answered 207 without a readable body: {response.text[:200]}")
        by_entity = {}
        for e in errors:
            reason = e.get("error", {})
            by_entity[e.get("entityId")] = reason.get("title") or reason.get("detail") or json.dumps(reason)
        return {row["id"]: f"refused by the NGSI-LD broker: {by_entity[row['entity_id']]}"
                for row in rows if row["entity_id"] in by_entity}

    def close(self) -> None:
        self.client.close()


def targets(settings: Settings, worker: str) -> list:
    out = []
    if settings.upstream_mqtt:
        out.append(MqttTarget(settings.upstream_mqtt, client_id=f"{worker}-up"[:64]))
    if settings.upstream_http:
        out.append(HttpTarget(settings.upstream_http, settings.upstream_token))
    return out


class Relay:
    """Deliver the upstream outbox (see the module docstring).

    With `process=True` the delivery loop runs in a child process of its own
    (what `fleet serve` does): storing and delivering then use two cores
    instead of sharing one interpreter. The child stops with `stop()`, and
    by itself when its parent dies; either way it gives its leases back. A
    child that dies on its own is started again (counted as `restarts`); it
    is the same worker, so it takes its leased rows back at once.
    `counts()`, `backlog()` and `wake()` work the same in both modes.

    Nothing the parent waits on is shared with the child, so a child killed
    at any moment cannot block the parent: wake-ups and the stop request are
    bytes on a pipe (written without blocking; the child sees the pipe close
    when the parent dies), and the counters are shared memory that only one
    side writes each.
    """

    def __init__(self, settings: Settings | None = None, *, db_path: str | None = None, worker: str | None = None,
                 batch: int = 500, lease_s: float = 30.0, retry: tuple[float, float] = (0.5, 15.0),
                 process: bool = False):
        self.settings = (settings or get_settings()).override(db=db_path)
        if not self.settings.relays:
            raise ValueError("no platform target: set IWAKI_UPSTREAM_MQTT and/or IWAKI_UPSTREAM_HTTP")
        self.worker = worker or f"{self.settings.client_id}@{socket.gethostname()}:{os.getpid()}"
        self.batch = batch
        self.lease_s = lease_s
        self.retry = retry
        self.process = process
        self.last_error: str | None = None
        # the counters, then the backlog: the loop writes them, the parent's watcher only `restarts`
        self._values = _SPAWN.RawArray("q", len(COUNTERS) + 1)
        self._signals, self._signal_out = _SPAWN.Pipe(duplex=False)   # the loop reads, start() side writes
        os.set_blocking(self._signal_out.fileno(), False)
        self._stopping = threading.Event()   # on each side: this side knows the loop is to stop
        self._runner: threading.Thread | multiprocessing.process.BaseProcess | None = None
        self._watcher: threading.Thread | None = None
        self._spawning = threading.Lock()
        self._parent: int | None = None

    def __getstate__(self) -> dict:
        # what the child process gets: not the pipe's writing end (so it sees EOF when the
        # parent dies), no threads and no locks of this process
        skip = ("_signal_out", "_runner", "_watcher", "_spawning", "_stopping")
        return {k: v for k, v in self.__dict__.items() if k not in skip}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _stopping=threading.Event(), _spawning=threading.Lock(),
                             _runner=None, _watcher=None, _signal_out=None)

    def start(self) -> "Relay":
        if self._runner is not None:
            raise RuntimeError("the relay is already running")
        self._stopping.clear()
        while self._signals.poll():          # what a previous run left unread
            os.read(self._signals.fileno(), 4096)
        Registry(self.settings.db).close()  # fail here, not in the thread, when the registry is unusable
        if self.process:
            self._runner = self._spawn()
            self._watcher = threading.Thread(target=self._watch, name="fleet-relay-watch", daemon=True)
            self._watcher.start()
        else:
            self._runner = threading.Thread(target=self._loop, name="fleet-relay", daemon=True)
            self._runner.start()
        return self

    def _spawn(self) -> multiprocessing.process.BaseProcess:
        child = _SPAWN.Process(target=self._child, args=(os.getpid(), logging.getLogger().level),
                               name="fleet-relay", daemon=True)
        child.start()
        return child

    def _watch(self) -> None:
        """Process mode: start the relay process again when it dies on its own (a crash, the
        OOM killer), after a pause that grows while it keeps dying (0.5 s to 15 s)."""
        pause = self.retry[0]
        while True:
            runner, born = self._runner, time.monotonic()
            if runner is None:
                return
            runner.join()
            if self._stopping.is_set():
                return
            if time.monotonic() - born > 60:
                pause = self.retry[0]
            log.error("the relay process exited by itself (exit code %s); starting it again in %.1f s",
                      runner.exitcode, pause)
            self._count("restarts")
            if self._stopping.wait(pause):
                return
            pause = min(pause * 2, self.retry[1])
            with self._spawning:
                if self._stopping.is_set():
                    return
                self._runner = self._spawn()

    def stop(self, timeout: float = 15.0) -> None:
        if self._runner is None:
            return
        with self._spawning:  # the watcher starts no new process from now on
            self._stopping.set()
            runner = self._runner
        self._signal(b"s")
        runner.join(timeout)
        if self.process and runner.is_alive():
            log.error("the relay process did not stop within %g s; killing it (its leases expire in %g s)",
                      timeout, self.lease_s)
            runner.kill()
            runner.join(5)
        if self._watcher is not None:
            self._watcher.join(5)
            self._watcher = None
        self._runner = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def running(self) -> bool:
        return self._runner is not None and self._runner.is_alive()

    def wake(self) -> None:
        """New rows are in the outbox (the ingest writer calls this after a commit)."""
        self._signal(b"w")

    def _signal(self, what: bytes) -> None:
        try:
            os.write(self._signal_out.fileno(), what)
        except BlockingIOError:
            pass  # the pipe is full of wake-ups the loop has not read yet: it is busy anyway
        except OSError as exc:  # the loop is gone (a restart comes)
            log.debug("relay signal %r not sent: %s", what, exc)

    def _wait(self, timeout: float, wake: bool = True) -> None:
        """The loop's pause: `timeout` seconds, ended early by a stop request (the pipe
        closing, when the parent died, is one too) and, with `wake`, by a wake-up."""
        deadline = time.monotonic() + timeout
        while not self._stopping.is_set():
            left = deadline - time.monotonic()
            try:
                if not self._signals.poll(max(0.0, left)):
                    return
                data = os.read(self._signals.fileno(), 4096)
            except OSError:
                data = b""
            if not data or b"s" in data:
                self._stopping.set()
            elif wake or left <= 0:
                return

    def counts(self) -> dict:
        values = list(self._values)
        return {**dict(zip(COUNTERS, values)), "backlog": values[-1]}

    def backlog(self) -> int:
        return self._values[-1]

    def _count(self, name: str, n: int = 1) -> None:
        self._values[COUNTERS.index(name)] += n

    def _set_backlog(self, n: int) -> None:
        self._values[-1] = n

    def _child(self, parent: int, level: int) -> None:
        """The child process's main: the parent stops it (Ctrl-C reaches the whole process group)."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, lambda *_: self._stopping.set())
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._parent = parent
        self._loop()

    def _orphaned(self) -> bool:
        return self._parent is not None and os.getppid() != self._parent

    def _loop(self) -> None:
        registry = Registry(self.settings.db)
        outs = targets(self.settings, self.worker)
        pause = self.retry[0]
        next_count = 0.0
        rows = None  # leased and not yet delivered; None: claim first
        try:
            while True:
                self._wait(0)       # take in a stop request or the parent's end, without waiting
                if self._stopping.is_set():
                    break
                if self._orphaned():
                    log.warning("the fleet process that started this relay is gone; stopping")
                    break
                try:
                    if rows is None:
                        rows = registry.claim_upstream(self.worker, self.batch, self.lease_s)
                    if time.monotonic() >= next_count or not rows:
                        self._set_backlog(registry.upstream_backlog())
                        next_count = time.monotonic() + 1.0
                except Exception:
                    log.exception("cannot read the upstream outbox")
                    self._count("errors")
                    rows = None
                    self._wait(pause, wake=False)
                    continue
                if not rows:
                    self._wait(0.5)
                    rows = None
                    continue
                self._count("attempts")
                try:
                    refused: dict[int, str] = {}
                    for target in outs:
                        refused.update(target.deliver(rows))
                except UpstreamError as exc:
                    if self.last_error != str(exc):
                        log.warning("%s; %d entities wait in the outbox, retrying", exc, self.backlog())
                    self.last_error = str(exc)
                    self._count("errors")
                    _try(registry.finish_upstream, self.worker, [], error=str(exc))
                    rows = None  # still ours: the next claim returns them first
                    self._wait(pause * random.uniform(0.8, 1.2), wake=False)
                    pause = min(pause * 2, self.retry[1])
                    continue
                delivered = [r["id"] for r in rows if r["id"] not in refused]
                try:
                    # recorded, and the next batch leased, in one transaction
                    rows = registry.finish_upstream(self.worker, delivered, refused, claim=self.batch,
                                                    lease_s=self.lease_s)
                except Exception:
                    # not recorded: the rows stay leased to us and are sent again (idempotent)
                    log.exception("could not record %d deliveries; they will be sent again", len(delivered))
                    self._count("errors")
                    rows = None
                    self._wait(pause, wake=False)
                    continue
                if self.last_error is not None:
                    log.info("platform reachable again: delivering the outbox")
                    self.last_error = None
                for rid, reason in refused.items():
                    log.error("upstream entity %d refused for good: %s", rid, reason)
                self._count("delivered", len(delivered))
                self._count("failed", len(refused))
                pause = self.retry[0]
        finally:
            for target in outs:
                target.close()
            _try(registry.release_upstream, self.worker)
            registry.close()


def _try(fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except Exception:
        log.exception("upstream bookkeeping failed (%s); the lease will expire and the rows be retried",
                      fn.__name__)
