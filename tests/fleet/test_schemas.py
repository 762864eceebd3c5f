"""fleet/schemas.py: the contract's JSON Schemas and the checks on every received message."""
import json

import pytest

from fleet.schemas import NODE_KINDS, PayloadError, kinds, parse, subscriptions, validate
from tests.fleet import payloads as P


def refused(topic, body, root=P.ROOT, **kw) -> PayloadError:
    with pytest.raises(PayloadError) as info:
        parse(topic, body if isinstance(body, bytes) else P.encode(body), root, **kw)
    return info.value


def test_every_schema_file_is_loaded():
    assert set(kinds()) == {"common", "command", *NODE_KINDS}


@pytest.mark.parametrize("kind", NODE_KINDS)
def test_valid_payload_of_every_kind_is_accepted(kind):
    payload = P.VALID[kind]()
    validate(kind, payload)
    assert parse(P.topic(kind), P.encode(payload), P.ROOT) == (P.NODE, kind, payload)


@pytest.mark.parametrize("kind", NODE_KINDS)
def test_payload_without_clock_is_accepted(kind):
    payload = P.VALID[kind](**P.envelope(ts=None))
    assert payload["ts"] is None and payload["clock_set"] is False
    assert parse(P.topic(kind), P.encode(payload), P.ROOT)[2] == payload


def test_counter_channel_with_sum_and_a_reply_with_error_are_accepted():
    validate("telemetry", P.telemetry(ch={"people_in": {"n": 3, "min": 0, "max": 2, "mean": 1, "last": 2,
                                                         "sum": 4}}))
    reply = P.reply(ok=False, error="unknown command")
    del reply["result"]
    validate("reply", reply)


def test_a_root_with_several_levels_works():
    assert parse("city/iwaki/env-0001/state", P.encode(P.state()), "city/iwaki")[:2] == ("env-0001", "state")


def test_command_schema_is_usable():
    validate("command", {"v": 1, "id": "c1", "args": {}})
    with pytest.raises(PayloadError, match="command: 'id' is a required property"):
        validate("command", {"v": 1})


def test_subscriptions_cover_every_node_kind_with_a_wildcard_node():
    assert subscriptions("iwaki") == [f"iwaki/+/{k}" for k in NODE_KINDS]


def test_missing_field_is_named():
    body = P.telemetry()
    del body["ch"]
    assert refused(P.topic("telemetry"), body).reason == "telemetry: 'ch' is a required property"
    body = P.birth()
    del body["seq"]
    assert refused(P.topic("birth"), body).reason == "birth: 'seq' is a required property"


def test_wrong_type_names_the_field():
    assert refused(P.topic("telemetry"), P.telemetry(seq="5")).reason == \
        "telemetry: seq: '5' is not of type 'integer'"
    assert refused(P.topic("health"), P.health(heap_free=-1)).reason == \
        "health: heap_free: -1 is less than the minimum of 0"


def test_nested_problem_names_the_json_path():
    body = P.telemetry()
    body["ch"]["temp_c"]["n"] = 0
    e = refused(P.topic("telemetry"), body)
    assert e.reason == "telemetry: ch.temp_c.n: 0 is less than the minimum of 1"
    assert e.node == P.NODE


def test_long_values_are_cut_short_in_the_reason():
    e = refused(P.topic("state"), P.state(seq=list(range(500))))
    assert e.reason.startswith("state: seq: [0, 1, 2")
    assert e.reason.endswith("...] is not of type 'integer'")
    assert len(e.reason) < 120


def test_unknown_channel_field_and_empty_channels_are_refused():
    body = P.telemetry()
    body["ch"]["temp_c"]["avg"] = 1
    assert "ch.temp_c: Additional properties are not allowed ('avg' was unexpected)" in \
        refused(P.topic("telemetry"), body).reason
    assert refused(P.topic("telemetry"), P.telemetry(ch={})).reason == "telemetry: ch: {} should be non-empty"


def test_wrong_contract_version_is_refused():
    assert refused(P.topic("state"), P.state(v=2)).reason == "state: v: 1 was expected"


@pytest.mark.parametrize("ts", ["2024-05-01 12:00:00", "2024-05-01T12:00:00+09:00", "2024-05-01T12:00:00.5Z",
                                "yesterday"])
def test_badly_formatted_ts_is_refused(ts):
    assert refused(P.topic("telemetry"), P.telemetry(ts=ts)).reason == \
        f"telemetry: ts: {ts!r} is not a UTC time like 2024-05-01T12:00:00Z"


def test_ts_that_is_no_real_time_is_refused():
    assert refused(P.topic("event"), P.event(ts="2024-02-30T25:00:00Z")).reason == \
        "event: ts: '2024-02-30T25:00:00Z' is not a real UTC time"


def test_node_id_must_match_the_topic():
    e = refused(P.topic("telemetry", node="env-0002"), P.telemetry(node="env-0001"))
    assert e.reason == "telemetry: node 'env-0001' does not match the topic's node 'env-0002'"
    assert e.node == "env-0002"


def test_oversized_payload_is_refused_before_parsing():
    body = b"{" + b" " * 19998 + b"}"
    assert refused(P.topic("telemetry"), body).reason == "payload of 20000 bytes exceeds 16384"
    assert refused(P.topic("telemetry"), P.telemetry(), max_payload=100).reason.endswith("exceeds 100")


def test_not_json_not_utf8_and_json_extensions_are_refused():
    assert refused(P.topic("state"), b'{"v": 1,').reason.startswith("payload is not JSON (")
    assert refused(P.topic("state"), b"\xff\xfe{}").reason == "payload is not UTF-8 (invalid start byte at byte 0)"
    assert refused(P.topic("state"), b'{"v": NaN}').reason == "payload is not JSON (NaN is not a JSON number)"
    assert refused(P.topic("state"), b"").reason.startswith("payload is not JSON")


def test_deeply_nested_json_is_refused_not_crashing():
    body = b"[" * 8000 + b"]" * 8000
    assert refused(P.topic("state"), body).reason == "payload is not usable JSON (nested too deeply)"


@pytest.mark.parametrize("body, kind", [(b"[1, 2]", "array"), (b'"online"', "string"), (b"42", "number"),
                                        (b"null", "null"), (b"true", "boolean")])
def test_payload_that_is_not_an_object_is_refused(body, kind):
    assert refused(P.topic("state"), body).reason == f"payload is a JSON {kind}, not an object"


@pytest.mark.parametrize("topic, reason", [
    ("iwaki/env-0001/cmd", "unknown kind 'cmd'"),
    ("iwaki/env-0001/telemetrie", "unknown kind 'telemetrie'"),
    ("iwaki/env-0001/cmd/ping", "is not iwaki/<node>/<kind>"),
    ("iwaki/env-0001", "is not iwaki/<node>/<kind>"),
    ("other/env-0001/state", "is not under the root 'iwaki'"),
    ("iwaki/Env_1/state", "'Env_1' is not a node id"),
])
def test_topic_that_is_not_a_node_topic_is_refused(topic, reason):
    e = refused(topic, P.state())
    assert reason in e.reason and topic in e.reason


def test_validate_refuses_an_unknown_kind():
    with pytest.raises(PayloadError, match="no schema for kind 'nope'"):
        validate("nope", {})
    with pytest.raises(PayloadError, match="no schema"):
        validate("common", {})


def test_reasons_are_json_safe_strings():
    e = refused(P.topic("state"), b"\x00\x01")
    assert json.loads(json.dumps(e.reason)) == e.reason


def test_the_fast_validator_agrees_with_jsonschema_on_every_mutation_of_every_kind():
    """The message path validates with fastjsonschema first; it must accept and refuse exactly
    what jsonschema does. Every field of every valid payload is dropped, nulled, and given a
    value of each other JSON type."""
    import copy
    import fastjsonschema
    from fleet.schemas import _fast_validators, _validators

    def paths(value, prefix=()):
        if isinstance(value, dict):
            for key, sub in value.items():
                yield prefix + (key,)
                yield from paths(sub, prefix + (key,))

    def mutated(payload, path, new):
        out = copy.deepcopy(payload)
        target = out
        for key in path[:-1]:
            target = target[key]
        if new is _DROP:
            del target[path[-1]]
        else:
            target[path[-1]] = new
        return out

    checked = disagreements = 0
    for kind, build in P.VALID.items():
        base = build()
        for path in paths(base):
            for new in (_DROP, None, True, -1, 1.5, "x", [], {}, "9" * 300):
                payload = mutated(base, path, new)
                slow_ok = _validators()[kind].is_valid(payload)
                try:
                    _fast_validators()[kind](payload)
                    fast_ok = True
                except fastjsonschema.JsonSchemaException:
                    fast_ok = False
                checked += 1
                if slow_ok != fast_ok:
                    disagreements += 1
                    print(kind, path, repr(new)[:20], "jsonschema", slow_ok, "fast", fast_ok)
    assert checked > 500 and disagreements == 0


_DROP = object()
