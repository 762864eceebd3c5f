"""The MQTT contract's payload schemas (fleet/schemas/*.json) and message parsing.

`validate(kind, payload)` checks a decoded payload against its JSON Schema;
`parse(topic, payload_bytes, root)` takes a message as it comes off the
broker and returns `(node, kind, payload)` or raises `PayloadError` with a
short reason an operator can act on, e.g.
`telemetry: ch.temp_c.n: 0 is less than the minimum of 1`.
See docs/mqtt.md for the contract itself.
"""
from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from pathlib import Path

import fastjsonschema
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from referencing import Registry, Resource

SCHEMA_DIR = Path(__file__).with_name("schemas")

#: Kinds a node publishes, in the order of docs/mqtt.md.
NODE_KINDS = ("birth", "state", "telemetry", "health", "event", "reply")
#: Kinds that take a sequence number from the node's outbox (de-duplicated, gap-checked).
SEQ_KINDS = ("telemetry", "health", "event", "reply")
#: Largest payload the fleet accepts (docs/mqtt.md: 16 KiB).
MAX_PAYLOAD = 16384

NODE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{1,31}$")
_TS = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})Z")
_REASON_MAX = 200


class PayloadError(ValueError):
    """A message the fleet refuses; `reason` says why, `node` is the topic's node when known."""

    def __init__(self, reason: str, node: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.node = node


def subscriptions(root: str) -> list[str]:
    """The topic filters the fleet subscribes to (docs/mqtt.md, "Topics")."""
    return [f"{root}/+/{kind}" for kind in NODE_KINDS]


@functools.cache
def _validators() -> dict[str, Draft202012Validator]:
    schemas = {}
    for path in sorted(SCHEMA_DIR.glob("*.json")):
        schemas[path.stem] = json.loads(path.read_text(encoding="utf-8"))
    registry = Registry().with_resources(
        (schema["$id"], Resource.from_contents(schema)) for schema in schemas.values())
    validators = {}
    for name, schema in schemas.items():
        Draft202012Validator.check_schema(schema)
        validators[name] = Draft202012Validator(schema, registry=registry)
    return validators


def kinds() -> list[str]:
    """Every schema in fleet/schemas by name (the node kinds, `command` and `common`)."""
    return sorted(_validators())


@functools.cache
def _fast_validators() -> dict:
    """The same schemas compiled to Python by fastjsonschema: 20x faster on the message path.
    A payload it refuses is checked again by jsonschema, whose message says more."""
    by_id = {}
    for path in sorted(SCHEMA_DIR.glob("*.json")):
        schema = json.loads(path.read_text(encoding="utf-8"))
        by_id[schema["$id"]] = schema
    handlers = {"https": by_id.__getitem__}
    return {schema["$id"].rsplit("/", 1)[1][:-5]: fastjsonschema.compile(schema, handlers=handlers,
                                                                          use_formats=False)
            for schema in by_id.values()}


def validate(kind: str, payload: dict) -> None:
    """Check `payload` against the schema of `kind`; raise `PayloadError` on the first problem."""
    validator = _validators().get(kind)
    if validator is None or kind == "common":
        raise PayloadError(f"no schema for kind {kind!r}")
    try:
        _fast_validators()[kind](payload)
    except fastjsonschema.JsonSchemaException as fast:
        error = best_match(validator.iter_errors(payload))
        if error is None:  # the two disagree: refuse, with the fast validator's reason
            raise PayloadError(_shorten(f"{kind}: {fast.message}")) from None
        raise PayloadError(_shorten(f"{kind}: {_where(error.absolute_path)}{_message(error)}")) from None
    ts = payload.get("ts") if isinstance(payload, dict) else None
    if isinstance(ts, str):
        try:
            match = _TS.fullmatch(ts)
            if match is None:
                raise ValueError(ts)
            datetime(*map(int, match.groups()))  # a real date and time (no 30 February)
        except ValueError:
            raise PayloadError(f"{kind}: ts: {ts!r} is not a real UTC time") from None


def parse(topic: str, payload: bytes, root: str, max_payload: int = MAX_PAYLOAD) -> tuple[str, str, dict]:
    """Check one received message and return `(node, kind, payload_dict)`.

    Checks, in order: the topic is `<root>/<node>/<kind>` with a node kind;
    the size; UTF-8; a JSON object; the kind's schema; the payload's `node`
    equals the topic's node.
    """
    node, kind = _split_topic(topic, root)
    if len(payload) > max_payload:
        raise PayloadError(f"payload of {len(payload)} bytes exceeds {max_payload}", node)
    try:
        text = bytes(payload).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError(f"payload is not UTF-8 ({exc.reason} at byte {exc.start})", node) from None
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise PayloadError(f"payload is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})",
                           node) from None
    except ValueError as exc:
        raise PayloadError(f"payload is not JSON ({exc})", node) from None
    except RecursionError:
        raise PayloadError("payload is not usable JSON (nested too deeply)", node) from None
    if not isinstance(data, dict):
        raise PayloadError(f"payload is a JSON {_json_type(data)}, not an object", node)
    try:
        validate(kind, data)
    except PayloadError as exc:
        exc.node = node
        raise
    if data["node"] != node:
        raise PayloadError(f"{kind}: node {data['node']!r} does not match the topic's node {node!r}", node)
    return node, kind, data


def _split_topic(topic: str, root: str) -> tuple[str, str]:
    prefix = root + "/"
    if not topic.startswith(prefix):
        raise PayloadError(f"topic {topic!r} is not under the root {root!r}")
    levels = topic[len(prefix):].split("/")
    if len(levels) != 2:
        raise PayloadError(f"topic {topic!r} is not {root}/<node>/<kind>")
    node, kind = levels
    if not NODE_ID_RE.match(node):
        raise PayloadError(f"topic {topic!r}: {node!r} is not a node id ({NODE_ID_RE.pattern})")
    if kind not in NODE_KINDS:
        raise PayloadError(f"topic {topic!r}: unknown kind {kind!r} (expected one of {', '.join(NODE_KINDS)})",
                           node)
    return node, kind


def _where(path) -> str:
    parts = [str(p) for p in path]
    return ".".join(parts) + ": " if parts else ""


def _message(error) -> str:
    """jsonschema's message, with a long instance cut short and a plain word for `ts`."""
    path = list(error.absolute_path)
    if error.validator == "pattern" and path == ["ts"]:
        return f"{_short(error.instance)} is not a UTC time like 2024-05-01T12:00:00Z"
    message = error.message
    full = repr(error.instance)
    if len(full) > 40:
        message = message.replace(full, _short(error.instance))
    return message


def _short(value) -> str:
    text = repr(value)
    if len(text) <= 40:
        return text
    closing = {list: "]", dict: "}"}.get(type(value), "")
    return text[:36] + "..." + closing


def _shorten(reason: str) -> str:
    return reason if len(reason) <= _REASON_MAX else reason[:_REASON_MAX - 3] + "..."


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _json_type(value) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"
