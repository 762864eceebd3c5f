"""Ingest: receive the nodes' MQTT messages, check them, store them in the registry.

    ingest = Ingest(get_settings())
    ingest.start()          # raises IngestError / RegistryError with a clear reason
    ...
    ingest.stop()

Delivery: the MQTT session is persistent (clean session off, a stable client
id), so QoS 1 messages the broker queued while the fleet was away arrive when
it returns. Acknowledgements are manual: a message is PUBACKed only after the
registry committed it (or recorded it as invalid), so a crash in between
means the broker sends it again and the registry drops it as a duplicate;
nothing is acknowledged and lost.

Threads: paho's network thread only puts messages on a queue; one writer
thread owns the `Registry` (SQLite connections are per thread), stores every
message, acknowledges it and turns silent nodes offline (`mark_stale`).
paho reconnects on its own after a broker restart; the subscriptions are
renewed at every connect.

Throughput: the writer takes what is queued (up to `BATCH` messages) and
stores it in one transaction, one commit and one fsync, then acknowledges
every message of the batch. When a message cannot be stored, the batch is
undone and its messages are stored one transaction each, so only the one
that fails is left unacknowledged.

Relay: when a platform target is configured (`settings.relays`), each
stored message's NGSI-LD entities (`fleet.ngsi.entities`) enter the
upstream outbox in the same transaction, and `after_commit` (the relay's
`wake`) is called after each commit. `fleet serve` runs the relay in a
child process, so storing and delivering do not share one interpreter.
With `settings.share_group`, the sequenced kinds (telemetry, health, events, replies) are subscribed as
`$share/<group>/...`, so the broker spreads them over every worker of the
group; births and states (retained, and rare) go to every worker.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from datetime import datetime, timezone

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fleet.mqtt_client import Client
from fleet.registry import Registry
from fleet.schemas import NODE_KINDS, SEQ_KINDS, PayloadError, parse, subscriptions
from fleet.settings import Settings, get_settings

log = logging.getLogger("fleet.ingest")

_STOP = object()
COUNTERS = ("received", "stored", "duplicates", "invalid", "errors", "connects", "disconnects")
#: Most messages stored in one transaction.
BATCH = 500


class IngestError(Exception):
    """The ingest service cannot start: broker unreachable or refusing us."""


class Ingest:
    """Subscribe to every node's topics and store what arrives (see the module docstring)."""

    def __init__(self, settings: Settings | None = None, *, db_path: str | None = None, host: str | None = None,
                 port: int | None = None, root: str | None = None, user: str | None = None,
                 password: str | None = None, client_id: str | None = None, keepalive: int = 30,
                 reconnect_delay: tuple[float, float] = (0.5, 15.0), stale_check_s: float | None = None):
        """`settings` (default `get_settings()`), with any of the keyword values given over it."""
        self.settings = (settings or get_settings()).override(
            db=db_path, mqtt_host=host, mqtt_port=port, root=root, mqtt_user=user, mqtt_password=password,
            client_id=client_id)
        self.keepalive = keepalive
        self.reconnect_delay = reconnect_delay
        self.stale_check_s = stale_check_s or min(10.0, max(0.1, self.settings.offline_after_s / 4))
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._client: mqtt.Client | None = None
        self._writer: threading.Thread | None = None
        self._writer_ready = threading.Event()
        self._writer_error: BaseException | None = None
        self._connack = threading.Event()
        self._suback = threading.Event()
        self._connack_reason: str | None = None
        self._connected = False
        self._stopping = False
        self._last_rx = 0.0
        self._next_prune = 0.0
        self.after_commit = None
        self._upstream = None
        if self.settings.relays:
            from fleet.ngsi import entities
            self._upstream = entities

    def topics(self) -> list[str]:
        """The topic filters this worker subscribes to (shared ones under a share group)."""
        group = self.settings.share_group
        out = []
        for topic, kind in zip(subscriptions(self.settings.root), NODE_KINDS):
            out.append(f"$share/{group}/{topic}" if group and kind in SEQ_KINDS else topic)
        return out

    @property
    def where(self) -> str:
        return f"{self.settings.mqtt_host}:{self.settings.mqtt_port}"

    @property
    def connected(self) -> bool:
        return self._connected

    def command(self, node: str, name: str, args: dict | None = None, cmd_id: str | None = None,
                timeout: float = 5.0) -> str:
        """Publish a command to one node (QoS 1, not retained) and wait for the broker's PUBACK;
        return its id. The node's answer arrives as a reply with that id (table `replies`).
        Raises IngestError when the broker is not reachable."""
        import json
        import uuid
        client = self._client
        if client is None or not self._connected:
            raise IngestError(f"cannot send {name!r} to {node}: not connected to the broker at {self.where}")
        cmd_id = cmd_id or uuid.uuid4().hex[:16]
        body = json.dumps({"v": 1, "id": cmd_id, "args": args or {}}, separators=(",", ":"))
        info = client.publish(f"{self.settings.root}/{node}/cmd/{name}", body, qos=1)
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as exc:
            raise IngestError(f"cannot send {name!r} to {node}: {exc}") from None
        if not info.is_published():
            raise IngestError(f"cannot send {name!r} to {node}: the broker did not acknowledge it "
                              f"within {timeout:g} s")
        return cmd_id

    def counts(self) -> dict:
        """A snapshot of the counters (messages received, stored, duplicates, invalid, errors...)."""
        with self._lock:
            return dict(self.counters)

    # -- lifecycle --

    def start(self, timeout: float = 10.0) -> "Ingest":
        """Open the registry, connect and subscribe; return once the broker has acknowledged the
        subscriptions (nothing published after that is missed). Raise if any step is impossible."""
        if self._writer is not None:
            raise IngestError("ingest is already running")
        self._stopping = False
        self._writer = threading.Thread(target=self._write_loop, name="fleet-ingest-writer", daemon=True)
        self._writer.start()
        self._writer_ready.wait()
        if self._writer_error is not None:
            error = self._writer_error
            self._writer.join()
            self._writer = None
            self._writer_ready.clear()
            self._writer_error = None
            raise error
        try:
            self._connect(timeout)
        except BaseException:
            self._stop_writer()
            raise
        return self

    def stop(self, drain_s: float = 2.0) -> None:
        """Store (and acknowledge) what is queued, disconnect, stop the writer.

        The broker keeps the session and the subscriptions, and queues QoS 1
        messages until the next start.
        """
        if self._writer is None:
            return
        if self._client is not None and self._connected:
            self.wait_idle(timeout=drain_s, quiet=0.0)
        self._stopping = True
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None
        self._connected = False
        self._stop_writer()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def wait_idle(self, timeout: float = 5.0, quiet: float = 0.2) -> bool:
        """Wait until every received message is handled and nothing arrived for `quiet` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            with self._queue.all_tasks_done:
                busy = self._queue.unfinished_tasks
            if not busy and time.monotonic() - self._last_rx >= quiet:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def run(self, stop: threading.Event, report_every: float = 60.0) -> None:
        """Start, then log the counters every `report_every` seconds until `stop` is set; then stop."""
        self.start()
        try:
            while not stop.wait(report_every):
                self.log_counts()
        finally:
            self.stop()
            self.log_counts()

    def log_counts(self) -> None:
        c = self.counts()
        log.info("received %d, stored %d, duplicates %d, invalid %d, errors %d; broker %s %s",
                 c["received"], c["stored"], c["duplicates"], c["invalid"], c["errors"], self.where,
                 "connected" if self._connected else "DISCONNECTED")

    # -- MQTT (paho's network thread) --

    def _connect(self, timeout: float) -> None:
        s = self.settings
        client = Client(CallbackAPIVersion.VERSION2, client_id=s.client_id, clean_session=False,
                             protocol=mqtt.MQTTv311, manual_ack=True)
        if s.mqtt_user:
            client.username_pw_set(s.mqtt_user, s.mqtt_password)
        client.reconnect_delay_set(*self.reconnect_delay)
        client.connect_timeout = min(timeout, 5.0)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._connack.clear()
        self._suback.clear()
        try:
            client.connect(s.mqtt_host, s.mqtt_port, keepalive=self.keepalive)
        except (OSError, ValueError) as exc:
            raise IngestError(f"cannot reach the MQTT broker at {self.where}: {getattr(exc, 'strerror', None) or exc}"
                              " (is the broker running? set --host/--port or IWAKI_MQTT_HOST/IWAKI_MQTT_PORT)"
                              ) from None
        self._client = client
        client.loop_start()
        if not self._connack.wait(timeout) or self._connack_reason is not None:
            reason = self._connack_reason or f"no answer within {timeout:g} s"
            self._abandon(client)
            hint = ("check --user/--password or IWAKI_MQTT_USER/IWAKI_MQTT_PASSWORD"
                    if "authori" in reason.lower() or "password" in reason.lower()
                    else "is it an MQTT broker?")
            raise IngestError(f"the MQTT broker at {self.where} refused the connection: {reason} ({hint})")
        # A new session has no subscriptions until the broker acknowledges them: a message
        # published before that reaches nobody, so start() returns only once they are in place.
        if not self._suback.wait(timeout):
            self._abandon(client)
            raise IngestError(f"the MQTT broker at {self.where} did not acknowledge the subscriptions "
                              f"within {timeout:g} s")

    def _abandon(self, client) -> None:
        """Give up a connection start() could not complete."""
        self._stopping = True
        client.disconnect()
        client.loop_stop()
        self._client = None

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._connack_reason = str(reason_code)
            self._connack.set()
            log.error("broker %s refused the connection: %s", self.where, reason_code)
            return
        self._connack_reason = None
        self._connected = True
        self._count("connects")
        client.subscribe([(topic, 1) for topic in self.topics()])
        log.info("connected to %s as %s (session %s)", self.where, self.settings.client_id,
                 "resumed" if flags.session_present else "new")
        self._connack.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was_connected, self._connected = self._connected, False
        if self._stopping:
            return
        if was_connected:
            self._count("disconnects")
        log.warning("lost the broker at %s (%s); reconnecting", self.where, reason_code)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        for topic, code in zip(self.topics(), reason_codes):
            if code.is_failure:
                log.error("broker %s refused the subscription to %s: %s (check its ACL)", self.where, topic, code)
        self._suback.set()

    def _on_message(self, client, userdata, message) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = "<topic that is not UTF-8>"
        self._last_rx = time.monotonic()
        self._count("received")
        self._queue.put((topic, message.payload, message.retain, message.mid, message.qos,
                         datetime.now(timezone.utc)))

    # -- the writer thread --

    def _write_loop(self) -> None:
        try:
            registry = Registry(self.settings.db)
        except Exception as exc:  # handed to start(), raised there
            self._writer_error = exc
            self._writer_ready.set()
            return
        self._writer_ready.set()
        next_stale = time.monotonic()
        try:
            while True:
                try:
                    item = self._queue.get(timeout=max(0.0, next_stale - time.monotonic()))
                except queue.Empty:
                    item = None
                if item is _STOP:
                    self._queue.task_done()
                    break
                if item is not None:
                    items = [item]
                    while len(items) < BATCH:
                        try:
                            more = self._queue.get_nowait()
                        except queue.Empty:
                            break
                        if more is _STOP:
                            self._queue.put(_STOP)  # after this batch
                            self._queue.task_done()
                            break
                        items.append(more)
                    try:
                        self._store_batch(registry, items)
                    finally:
                        for _ in items:
                            self._queue.task_done()
                if time.monotonic() >= next_stale:
                    next_stale = time.monotonic() + self.stale_check_s
                    self._check_health(registry)
        finally:
            registry.close()

    def _store_batch(self, registry: Registry, items: list[tuple]) -> None:
        """Store `items` in one transaction; acknowledge those stored once it is committed.
        Parsing and validation happen before the transaction, so the write lock is held
        only for the writes."""
        s = self.settings
        parsed = []
        for topic, payload, retained, mid, qos, received_at in items:
            try:
                parsed.append((topic, payload, retained, mid, qos, received_at,
                               parse(topic, payload, s.root, s.max_payload)))
            except PayloadError as exc:
                log.warning("invalid payload on %s: %s", topic, exc.reason)
                parsed.append((topic, payload, retained, mid, qos, received_at, exc))
        outcomes = dict.fromkeys(("stored", "duplicates", "invalid", "errors"), 0)
        acks = []
        try:
            with registry.batch():
                for item in parsed:
                    outcome = self._store(registry, *item)
                    outcomes[outcome] += 1
                    acks.append(item[3:5])
        except Exception:
            # one message that cannot be stored (a bug), or a commit that failed (disk
            # full...): the batch is undone; store its messages one transaction each,
            # so only those that fail stay unacknowledged (the broker sends them again
            # after the next reconnect)
            log.warning("a batch of %d messages could not be stored together; storing them one by one",
                        len(items), exc_info=True)
            outcomes = dict.fromkeys(outcomes, 0)
            acks = []
            failing = 0  # in a row: from the third on, the registry itself fails (disk full...)
            for item in parsed:
                if failing >= 3:
                    outcomes["errors"] += 1  # not tried: the broker sends it again
                    continue
                try:
                    outcome = self._store(registry, *item)
                    failing = 0
                except Exception:
                    failing += 1
                    if failing == 1:
                        log.exception("could not store the message on %s", item[0])
                    else:
                        log.error("could not store the message on %s either", item[0])
                    outcome = "errors"
                outcomes[outcome] += 1
                if outcome != "errors":
                    acks.append(item[3:5])
        with self._lock:
            for name, n in outcomes.items():
                self.counters[name] += n
        for mid, qos in acks:
            self._ack(mid, qos)
        if outcomes["stored"] and self.after_commit is not None:
            self.after_commit()

    def _store(self, registry: Registry, topic: str, payload: bytes, retained: bool, mid: int, qos: int,
               received_at: datetime, parsed) -> str:
        """Store one parsed message, or record it as invalid; return the counter it goes to.
        Raises when the registry cannot (inside a batch, that undoes the batch)."""
        if isinstance(parsed, PayloadError):
            registry.record_invalid(topic, parsed.reason, payload, node=parsed.node, received_at=received_at)
            return "invalid"
        node, kind, data = parsed
        result = registry.ingest(node, kind, data, received_at, retained=retained, upstream=self._upstream)
        return "stored" if result == "stored" else "duplicates"

    def _ack(self, mid: int, qos: int) -> None:
        client = self._client
        if client is not None and qos > 0:
            client.ack(mid, qos)

    def _check_health(self, registry: Registry) -> None:
        # every stale_check_s: silent nodes go offline, alerts open and close
        from fleet.health import evaluate
        try:
            for node in registry.mark_stale(self.settings.offline_after_s):
                log.info("node %s is offline: not heard for %g s", node, self.settings.offline_after_s)
            opened, closed = evaluate(registry)
            if opened or closed:
                log.info("alerts: %d opened, %d closed", opened, closed)
            if time.monotonic() >= self._next_prune:
                self._next_prune = time.monotonic() + 3600
                pruned = registry.prune(self.settings.retention_days)
                if pruned:
                    log.info("retention: deleted %d rows older than %g days", pruned, self.settings.retention_days)
        except Exception:
            log.exception("could not check for silent nodes and alerts")
            self._count("errors")

    def _stop_writer(self) -> None:
        if self._writer is not None:
            self._queue.put(_STOP)
            self._writer.join()
            self._writer = None
        self._writer_ready.clear()
        self._writer_error = None

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n
