"""Valid example payloads of every kind in docs/mqtt.md, for the fleet's tests.

Each builder returns a fresh dict; keyword arguments replace top-level fields.
`encode()` gives the bytes a node would publish and `topic()` its topic.
"""
from __future__ import annotations

import json

ROOT = "iwaki"
NODE = "env-0001"
TS = "2024-05-01T12:00:00Z"


def envelope(node: str = NODE, boot: int = 1, seq: int = 0, ts: str | None = TS) -> dict:
    return {"v": 1, "node": node, "boot": boot, "seq": seq, "ts": ts, "clock_set": ts is not None,
            "up_ms": 5000}


def birth(node: str = NODE, boot: int = 1, seq: int = 0, **over) -> dict:
    return {**envelope(node, boot, seq), "fw": "0.1.0", "board": "env-station", "chip": "esp32",
            "config_hash": "0123456789ab", "reset_cause": "power_on", "boot_count": boot,
            "channels": {"temp_c": {"sensor": "bme280"}, "rh_pct": {"sensor": "bme280"}},
            "report": {"window_s": 60, "health_s": 300}, **over}


def state(node: str = NODE, boot: int = 1, seq: int = 0, value: str = "online", reason: str = "connected",
          **over) -> dict:
    return {**envelope(node, boot, seq), "state": value, "reason": reason, **over}


def telemetry(node: str = NODE, boot: int = 1, seq: int = 0, **over) -> dict:
    return {**envelope(node, boot, seq), "window": {"s": 60, "end_up_ms": 61000}, "reason": "change",
            "ch": {"temp_c": {"n": 60, "min": 21.5, "max": 21.93, "mean": 21.71, "last": 21.8},
                   "rh_pct": {"n": 60, "min": 40.0, "max": 42.5, "mean": 41.2, "last": 41.0}}, **over}


def health(node: str = NODE, boot: int = 1, seq: int = 0, **over) -> dict:
    return {**envelope(node, boot, seq), "fw": "0.1.0", "config_hash": "0123456789ab", "boot_count": boot,
            "reset_cause": "power_on", "heap_free": 81234, "heap_alloc": 40000, "rssi": -61, "vbat_mv": None,
            "loop": {"lag_max_ms": 7, "lag_mean_ms": 1.5, "overruns": 0, "ticks": 3000},
            "outbox": {"depth": 2, "bytes": 512, "dropped": 0}, "mqtt": {"reconnects": 1},
            "sensors": {"bme280": {"status": "ok", "errors": 0}}, **over}


def event(node: str = NODE, boot: int = 1, seq: int = 0, **over) -> dict:
    return {**envelope(node, boot, seq), "event": "sensor.failed", "severity": "warning",
            "data": {"sensor": "scd4x", "reason": "no answer"}, **over}


def reply(node: str = NODE, boot: int = 1, seq: int = 0, **over) -> dict:
    return {**envelope(node, boot, seq), "id": "cmd-1", "ok": True, "result": {"up_ms": 1234}, **over}


#: kind -> builder, for every kind a node publishes.
VALID = {"birth": birth, "state": state, "telemetry": telemetry, "health": health, "event": event,
         "reply": reply}


def encode(payload: dict) -> bytes:
    return json.dumps(payload).encode()


def topic(kind: str, node: str = NODE, root: str = ROOT) -> str:
    return f"{root}/{node}/{kind}"
