"""Prometheus metrics of the fleet, read from the registry at scrape time.

    metrics = FleetMetrics(settings.db, ingest=ingest, relay=relay)
    body = metrics.exposition()          # the text format, for GET /metrics
    metrics.count_request("/api/v1/nodes", 200)

Each `FleetMetrics` has its own `CollectorRegistry` (never the process-wide
default), so any number of API apps can live in one process.

| metric | type | meaning |
| --- | --- | --- |
| `iwaki_nodes{state}` | gauge | nodes by state: online, offline, unknown |
| `iwaki_alerts_open{severity}` | gauge | open health alerts by severity: critical, warning, info |
| `iwaki_telemetry_stored_total` | counter | telemetry messages stored |
| `iwaki_invalid_total` | counter | messages refused (bad topic, JSON or schema) |
| `iwaki_duplicates_total` | counter | messages dropped as already stored |
| `iwaki_sequence_gaps` | gauge | messages missing in open sequence gaps |
| `iwaki_upstream_backlog` | gauge | entities in the outbox waiting for the city platform |
| `iwaki_upstream_delivered_total` | counter | delivered entities still kept (pruned after a day) |
| `iwaki_upstream_failed_total` | counter | entities the city platform refused for good (kept, not retried) |
| `iwaki_ingest_connected` | gauge | 1 while this process is connected to the broker |
| `iwaki_ingest_received_total` | counter | MQTT messages received by this process |
| `iwaki_ingest_messages_total{outcome}` | counter | of those: stored, duplicates, invalid, errors |
| `iwaki_ingest_connects_total`, `..._disconnects_total` | counter | broker connections made and lost |
| `iwaki_relay_<name>_total` | counter | the relay's counters (`relay.counts()`) |
| `iwaki_relay_backlog` | gauge | the relay's view of its backlog (`relay.backlog()`) |
| `iwaki_api_requests_total{route,status}` | counter | API requests by route template and status code |

The ingest and relay metrics appear only when the app was given those
objects (`fleet serve` runs them in the same process); the registry metrics
are the same whichever process is scraped.
"""
from __future__ import annotations

import re
import threading
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from fleet.registry import Registry

CONTENT_TYPE = CONTENT_TYPE_LATEST
STATES = ("online", "offline", "unknown")
SEVERITIES = ("critical", "warning", "info")
_INGEST_OWN = {"received": "iwaki_ingest_received", "connects": "iwaki_ingest_connects",
               "disconnects": "iwaki_ingest_disconnects"}
_NOT_NAME = re.compile(r"[^a-zA-Z0-9_]+")


class FleetMetrics:
    """The fleet's collector and the registry it is registered in (see the module docstring).

    `db` is the registry path, opened read-mostly at each scrape; it raises
    `RegistryError` from `exposition()` when the registry cannot be opened.
    """

    def __init__(self, db: str, *, ingest=None, relay=None):
        self.db = db
        self.ingest = ingest
        self.relay = relay
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self._requests: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def count_request(self, route: str, status: int) -> None:
        """Count one API request under its route template (`/api/v1/nodes/{node_id}`)."""
        key = (route, str(status))
        with self._lock:
            self._requests[key] = self._requests.get(key, 0) + 1

    def exposition(self) -> bytes:
        """Every metric in the Prometheus text format (content type `CONTENT_TYPE`)."""
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        with Registry(self.db, create=False) as reg:
            yield from self._registry_metrics(reg)
        if self.ingest is not None:
            yield from self._ingest_metrics()
        if self.relay is not None:
            yield from self._relay_metrics()
        requests = CounterMetricFamily("iwaki_api_requests", "API requests by route template and status code",
                                       labels=["route", "status"])
        with self._lock:
            for (route, status), n in sorted(self._requests.items()):
                requests.add_metric([route, status], n)
        yield requests

    def _registry_metrics(self, reg: Registry) -> Iterator[Metric]:
        one = lambda sql: reg.db.execute(sql).fetchone()[0]  # noqa: E731
        by_state = dict(reg.db.execute("SELECT state, count(*) FROM nodes GROUP BY state").fetchall())
        nodes = GaugeMetricFamily("iwaki_nodes", "Nodes by state", labels=["state"])
        for state in sorted(set(STATES) | set(by_state)):
            nodes.add_metric([state], by_state.get(state, 0))
        yield nodes
        by_severity = dict(reg.db.execute(
            "SELECT severity, count(*) FROM alerts WHERE closed_at IS NULL GROUP BY severity").fetchall())
        alerts = GaugeMetricFamily("iwaki_alerts_open", "Open health alerts by severity", labels=["severity"])
        for severity in sorted(set(SEVERITIES) | set(by_severity)):
            alerts.add_metric([severity], by_severity.get(severity, 0))
        yield alerts
        stats = reg.stats()
        yield CounterMetricFamily("iwaki_telemetry_stored", "Telemetry messages stored",
                                  value=stats["telemetry_stored"])
        yield CounterMetricFamily("iwaki_invalid", "Messages refused (topic, JSON or schema)",
                                  value=stats["invalid"])
        yield CounterMetricFamily("iwaki_duplicates", "Messages dropped as already stored",
                                  value=stats["duplicates"])
        yield GaugeMetricFamily("iwaki_sequence_gaps", "Messages missing in open sequence gaps",
                                value=stats["gaps"])
        yield GaugeMetricFamily("iwaki_upstream_backlog", "Entities waiting for the city platform", value=one(
            "SELECT count(*) FROM upstream WHERE delivered_at IS NULL AND failed_at IS NULL"))
        yield CounterMetricFamily("iwaki_upstream_delivered", "Entities delivered to the city platform",
                                  value=one("SELECT count(*) FROM upstream WHERE delivered_at IS NOT NULL"))
        yield CounterMetricFamily("iwaki_upstream_failed", "Entities the city platform refused for good",
                                  value=one("SELECT count(*) FROM upstream WHERE failed_at IS NOT NULL"))

    def _ingest_metrics(self) -> Iterator[Metric]:
        counts = self.ingest.counts()
        yield GaugeMetricFamily("iwaki_ingest_connected", "1 while connected to the MQTT broker",
                                value=1 if self.ingest.connected else 0)
        outcomes = CounterMetricFamily("iwaki_ingest_messages", "MQTT messages by outcome", labels=["outcome"])
        for name, value in sorted(counts.items()):
            if name in _INGEST_OWN:
                yield CounterMetricFamily(_INGEST_OWN[name], f"Ingest counter {name}", value=value)
            else:
                outcomes.add_metric([name], value)
        yield outcomes

    def _relay_metrics(self) -> Iterator[Metric]:
        for name, value in sorted(self.relay.counts().items()):
            if name == "backlog" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # the backlog is the gauge below; only numbers are counters
            yield CounterMetricFamily(f"iwaki_relay_{_NOT_NAME.sub('_', name)}", f"Relay counter {name}",
                                      value=value)
        yield GaugeMetricFamily("iwaki_relay_backlog", "Entities the relay has still to deliver",
                                value=self.relay.backlog())
