"""The fleet manager's settings: one dataclass, read from the environment once.

Every part of the fleet takes its configuration from `get_settings()`; a
command-line flag overrides the environment through `Settings.override()`.
Tests build a `Settings(...)` directly, or set the environment and call
`get_settings.cache_clear()`.

| variable | field | default |
| --- | --- | --- |
| `IWAKI_DB` | `db` | `var/fleet.db` |
| `IWAKI_MQTT_HOST` | `mqtt_host` | `127.0.0.1` |
| `IWAKI_MQTT_PORT` | `mqtt_port` | `1883` |
| `IWAKI_MQTT_USER` | `mqtt_user` | none (anonymous) |
| `IWAKI_MQTT_PASSWORD` | `mqtt_password` | none |
| `IWAKI_MQTT_CLIENT_ID` | `client_id` | `iwaki-fleet` (keep it stable: the broker keeps the session under it) |
| `IWAKI_ROOT` | `root` | `iwaki` |
| `IWAKI_OFFLINE_AFTER_S` | `offline_after_s` | `180` (heartbeat timeout) |
| `IWAKI_MAX_PAYLOAD` | `max_payload` | `16384` bytes |
| `IWAKI_RETENTION_DAYS` | `retention_days` | `90`: telemetry and health older than this are deleted |
| `IWAKI_UPSTREAM_MQTT` | `upstream_mqtt` | none: the platform's MQTT broker, `mqtt://[user:password@]host[:port][/topic/prefix]` |
| `IWAKI_UPSTREAM_HTTP` | `upstream_http` | none: the platform's NGSI-LD broker, `http(s)://host[:port][/base]` |
| `IWAKI_UPSTREAM_TOKEN` | `upstream_token` | none: bearer token for the NGSI-LD broker |
| `IWAKI_SHARE_GROUP` | `share_group` | none: relay workers with the same group share the nodes' messages (`$share/<group>/...`) |
| `IWAKI_API_HOST` | `api_host` | `127.0.0.1` |
| `IWAKI_API_PORT` | `api_port` | `8080` (0: no API) |
| `IWAKI_NODE_BROKER_HOST` | `node_broker_host` | none: `mqtt_host`; the broker address provisioned nodes are given |
| `IWAKI_NODE_BROKER_PORT` | `node_broker_port` | none: `mqtt_port` |
| `IWAKI_NODE_CA` | `node_ca` | none: a CA certificate (PEM file) provisioned nodes are given, with `tls` |
| `IWAKI_NODE_FLEET_URL` | `node_fleet_url` | none: the URL the technician reached the fleet at; where nodes fetch OTA updates (`http://`) |
| `IWAKI_BROKER_CONF_DIR` | `broker_conf_dir` | none: rewrite the broker's `passwd` and `acl` here when a board is provisioned |
| `IWAKI_BROKER_PID_FILE` | `broker_pid_file` | none: send SIGHUP to the mosquitto whose pid is in this file after rewriting them |

With neither upstream set, nothing is queued for the platform.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit


class SettingsError(ValueError):
    """A setting has a value the fleet cannot use."""


@dataclass(frozen=True)
class Settings:
    db: str = "var/fleet.db"
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    mqtt_user: str | None = None
    mqtt_password: str | None = None
    client_id: str = "iwaki-fleet"
    root: str = "iwaki"
    offline_after_s: float = 180.0
    max_payload: int = 16384
    retention_days: float = 90.0
    upstream_mqtt: str | None = None
    upstream_http: str | None = None
    upstream_token: str | None = None
    share_group: str | None = None
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    node_broker_host: str | None = None
    node_broker_port: int | None = None
    node_ca: str | None = None
    node_fleet_url: str | None = None
    broker_conf_dir: str | None = None
    broker_pid_file: str | None = None

    def __post_init__(self):
        if not 0 < self.mqtt_port < 65536:
            raise SettingsError(f"MQTT port {self.mqtt_port} is not between 1 and 65535")
        if not self.mqtt_host:
            raise SettingsError("the MQTT host is empty")
        if not self.db:
            raise SettingsError("the database path is empty")
        if not _ROOT_RE.match(self.root):
            raise SettingsError(f"topic root {self.root!r} must be topic levels of "
                                "[A-Za-z0-9_-] separated by '/' (no wildcards, no leading or trailing '/')")
        if not self.client_id or len(self.client_id) > 64:
            raise SettingsError("the MQTT client id must be 1 to 64 characters")
        if self.offline_after_s <= 0:
            raise SettingsError(f"offline_after_s must be positive, not {self.offline_after_s}")
        if self.max_payload <= 0:
            raise SettingsError(f"max_payload must be positive, not {self.max_payload}")
        if self.retention_days <= 0:
            raise SettingsError(f"retention_days must be positive, not {self.retention_days}")
        if self.upstream_mqtt:
            _check_url("IWAKI_UPSTREAM_MQTT", self.upstream_mqtt, ("mqtt",))
        if self.upstream_http:
            _check_url("IWAKI_UPSTREAM_HTTP", self.upstream_http, ("http", "https"))
        if self.share_group is not None and not _GROUP_RE.match(self.share_group):
            raise SettingsError(f"share group {self.share_group!r} must be 1 to 64 of [A-Za-z0-9_-]")
        if not 0 <= self.api_port < 65536:
            raise SettingsError(f"API port {self.api_port} is not between 0 (no API) and 65535")
        if self.node_broker_port is not None and not 0 < self.node_broker_port < 65536:
            raise SettingsError(f"IWAKI_NODE_BROKER_PORT {self.node_broker_port} is not between 1 and 65535")
        if self.node_fleet_url:
            _check_url("IWAKI_NODE_FLEET_URL", self.node_fleet_url, ("http",))

    @property
    def relays(self) -> bool:
        """True when a platform target is configured (messages are queued for it)."""
        return bool(self.upstream_mqtt or self.upstream_http)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """Settings from `IWAKI_*` variables; unset or empty ones keep the default."""
        environ = os.environ if environ is None else environ
        values = {}
        for name, (var, convert) in _ENV.items():
            raw = environ.get(var, "").strip()
            if not raw:
                continue
            try:
                values[name] = convert(raw)
            except ValueError:
                raise SettingsError(f"{var}={raw!r} is not a valid {convert.__name__}") from None
        return cls(**values)

    def override(self, **changes) -> "Settings":
        """A copy with the given fields replaced; `None` means "not given" and keeps the value."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


_ROOT_RE = re.compile(r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")
_GROUP_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _check_url(var: str, url: str, schemes: tuple[str, ...]) -> None:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise SettingsError(f"{var}={url!r}: the port is not a number between 0 and 65535") from None
    if parts.scheme not in schemes or not parts.hostname:
        raise SettingsError(f"{var}={url!r} must look like {schemes[0]}://host[:port]/...")
    if port == 0:
        raise SettingsError(f"{var}={url!r}: port 0 is not a port")

_ENV = {
    "db": ("IWAKI_DB", str),
    "mqtt_host": ("IWAKI_MQTT_HOST", str),
    "mqtt_port": ("IWAKI_MQTT_PORT", int),
    "mqtt_user": ("IWAKI_MQTT_USER", str),
    "mqtt_password": ("IWAKI_MQTT_PASSWORD", str),
    "client_id": ("IWAKI_MQTT_CLIENT_ID", str),
    "root": ("IWAKI_ROOT", str),
    "offline_after_s": ("IWAKI_OFFLINE_AFTER_S", float),
    "max_payload": ("IWAKI_MAX_PAYLOAD", int),
    "retention_days": ("IWAKI_RETENTION_DAYS", float),
    "upstream_mqtt": ("IWAKI_UPSTREAM_MQTT", str),
    "upstream_http": ("IWAKI_UPSTREAM_HTTP", str),
    "upstream_token": ("IWAKI_UPSTREAM_TOKEN", str),
    "share_group": ("IWAKI_SHARE_GROUP", str),
    "api_host": ("IWAKI_API_HOST", str),
    "api_port": ("IWAKI_API_PORT", int),
    "node_broker_host": ("IWAKI_NODE_BROKER_HOST", str),
    "node_broker_port": ("IWAKI_NODE_BROKER_PORT", int),
    "node_ca": ("IWAKI_NODE_CA", str),
    "node_fleet_url": ("IWAKI_NODE_FLEET_URL", str),
    "broker_conf_dir": ("IWAKI_BROKER_CONF_DIR", str),
    "broker_pid_file": ("IWAKI_BROKER_PID_FILE", str),
}


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings from the environment (cached; `get_settings.cache_clear()` re-reads)."""
    return Settings.from_env()
