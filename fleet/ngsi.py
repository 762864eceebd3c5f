"""What the fleet relays to Iwaki's data platform: NGSI-LD entities shaped as
FIWARE Smart Data Models (docs/platform.md is the field-by-field reference).

    from fleet.ngsi import entities, CONTEXT
    entities(node, kind, payload, received_at) -> list[dict]

`node` is the registry's row of the node (at least "id"; "channels" is the
JSON its last birth announced, or None), `kind` one of birth, state,
telemetry, health, event, reply, `payload` the validated message (docs/mqtt.md)
and `received_at` the fleet's ISO time of receipt. The result is the list of
entities to upsert for that one message, in the normalized representation,
[] when the message maps to nothing (a reply). Each entity carries only the
attributes this message observed: the platform merges them into what it has
(NGSI-LD batch upsert with `options=update`), so static site data it
registered itself (location, thresholds, socket types) is kept.

The function is pure: no I/O and no clock. The same message always gives
equal entities with the same ids, so a message delivered twice upserts the
same thing twice. It never raises on a message that passed the schemas: a
channel or event it does not know is skipped (docs/platform.md lists what is
not relayed). Only a call that is not a stored message at all (an unknown
kind, a payload without its envelope) raises NGSIError.
"""
from __future__ import annotations

import functools
import json
from datetime import datetime, timedelta

#: The @context of every entity: the Smart Data Models context, then the
#: NGSI-LD core context (last, so its terms cannot be redefined).
CONTEXT = ["https://smartdatamodels.org/context.jsonld",
           "https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context-v1.8.jsonld"]

#: The namespace in every entity id: urn:ngsi-ld:<Type>:iwaki:<node>...
CITY = "iwaki"

#: Message kinds entities() takes (docs/mqtt.md).
KINDS = ("birth", "state", "telemetry", "health", "event", "reply")


class NGSIError(ValueError):
    """entities() was called with something that is not a stored message."""


# -- ids and attributes --------------------------------------------------------

def entity_id(entity_type: str, node: str, *parts) -> str:
    """`urn:ngsi-ld:<Type>:iwaki:<node>[:<part>...]`, the id scheme of docs/platform.md."""
    return ":".join(["urn:ngsi-ld", entity_type, CITY, node, *(str(p) for p in parts)])


def device_id(node: str) -> str:
    """The id of the node's own Device entity, the target of every refDevice."""
    return entity_id("Device", node)


class _When:
    """The time a message's attributes are observed at, and where it came from:
    the node's clock, or the fleet's receipt when the node's clock was not set."""

    def __init__(self, at: str, clock_set: bool):
        self.at = at
        self.clock_set = clock_set

    def shifted(self, seconds: float) -> str:
        """This time moved by `seconds`, in the same format (milliseconds kept when present)."""
        t = datetime.fromisoformat(self.at.replace("Z", "+00:00")) + timedelta(seconds=seconds)
        if "." in self.at:
            return t.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (t.microsecond // 1000)
        return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _when(payload: dict, received_at: str, node_time: bool = True) -> _When:
    """The node's ts when its clock is set (and `node_time`), else the fleet's receipt."""
    ts = payload.get("ts")
    if payload.get("clock_set") and isinstance(ts, str):
        return _When(ts if node_time else received_at, True)
    return _When(received_at, False)


def _prop(value, when: _When, unit: str | None = None) -> dict:
    p = {"type": "Property", "value": value, "observedAt": when.at}
    if unit:
        p["unitCode"] = unit
    if not when.clock_set:
        # the node had no real time: observedAt is the fleet's receipt
        p["clockSet"] = {"type": "Property", "value": False}
    return p


def _date(value: str, when: _When) -> dict:
    return _prop({"@type": "DateTime", "@value": value}, when)


def _rel(target: str) -> dict:
    return {"type": "Relationship", "object": target}


def _entity(entity_type: str, eid: str, attrs: dict) -> dict:
    return {"id": eid, "type": entity_type, **attrs, "@context": list(CONTEXT)}


def _num(d, key):
    """d[key] when it is a number (not a bool), else None: event data is free-form."""
    v = d.get(key) if isinstance(d, dict) else None
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _text(d, key):
    v = d.get(key) if isinstance(d, dict) else None
    return v if isinstance(v, str) else None


# -- telemetry -------------------------------------------------------------------

MEAN, SUM, LAST = "mean", "sum", "last"
_ALONE = "alone"  # a source used only when the board has none of the others


def _fraction(v):
    return round(v / 100, 6)


def _metres(v):
    return round(v / 1000, 6)


def _count(v):
    return int(round(v))


def _phase1(v):
    return {"L1": v}


#: entity type -> [(attribute, aggregate, unitCode, conversion, sources best first)].
#: A source is (sensor kind, channel name without the kind in front[, _ALONE]).
#: For each attribute the first source present in the message is used.
TELEMETRY = {
    "WeatherObserved": [
        ("temperature", MEAN, "CEL", None, (("bme280", "temp_c"), ("scd4x", "temp_c", _ALONE))),
        ("relativeHumidity", MEAN, "C62", _fraction, (("bme280", "rh_pct"), ("scd4x", "rh_pct", _ALONE))),
        ("atmosphericPressure", MEAN, "A97", None, (("bme280", "pressure_hpa"),)),
        ("precipitation", LAST, "MMT", None, (("rain_gauge", "rain_1h_mm"),)),
    ],
    "AirQualityObserved": [
        ("co2", MEAN, "59", None, (("scd4x", "co2_ppm"),)),
        ("pm1", MEAN, "GQ", None, (("pms5003", "pm1_ugm3"),)),
        ("pm25", MEAN, "GQ", None, (("pms5003", "pm25_ugm3"),)),
        ("pm10", MEAN, "GQ", None, (("pms5003", "pm10_ugm3"),)),
    ],
    "CrowdFlowObserved": [
        ("peopleCountIn", SUM, "IE", _count, (("beam_pair", "people_in"),)),
        ("peopleCountOut", SUM, "IE", _count, (("beam_pair", "people_out"),)),
        ("peopleInside", LAST, "IE", _count, (("beam_pair", "occupancy"),)),
        ("occupancy", MEAN, "C62", None, (("ld2410", "presence"),)),
        ("bleDeviceCount", LAST, "C62", _count, (("ble_counter", "ble_devices"),)),
    ],
    "EVChargingStation": [
        ("amperage", LAST, "AMP", None, (("cp_pilot", "offered_a"),)),
        ("voltage", MEAN, "VLT", None, (("sdm_meter", "voltage_v"),)),
        ("powerConsumption", MEAN, "WTT", None, (("sdm_meter", "power_w"),)),
    ],
    "ACMeasurement": [
        ("current", MEAN, "AMP", _phase1, (("sdm_meter", "current_a"), ("ct_clamp", "current_a"))),
        ("phaseVoltage", MEAN, "VLT", _phase1, (("sdm_meter", "voltage_v"),)),
        ("totalActivePower", MEAN, "WTT", None, (("sdm_meter", "power_w"),)),
        ("totalActiveEnergyImport", LAST, "KWH", None, (("sdm_meter", "energy_kwh"),)),
    ],
    "FloodMonitoring": [
        ("currentLevel", MEAN, "MTR", None, (("a02yyuw", "level_m"), ("level_4_20ma", "level_m"))),
        ("measuredDistance", MEAN, "MTR", _metres, (("a02yyuw", "distance_mm"),)),
    ],
}

#: Quantities no Smart Data Model has an attribute for, one DeviceMeasurement
#: entity each: id suffix -> (source, aggregate, unitCode, controlledProperty, measurementType).
MEASUREMENTS = {
    "seismicIntensity": (("adxl345", "intensity"), LAST, "C62", "seismicIntensity",
                         "JMA instrumental seismic intensity over the node's seismic window"),
    "peakGroundAcceleration": (("adxl345", "pga_gal"), LAST, "A76", "peakGroundAcceleration",
                               "peak ground acceleration since the previous window"),
}

#: IEC 61851 control pilot state (cp_state 1..6 = A..F) -> EVChargingStation status.
PILOT_STATUS = {"A": "working", "B": "working", "C": "working", "D": "working",
                "E": "withIncidence", "F": "outOfService"}
_PILOT = "ABCDEF"

#: Sensor kinds a channel name can carry in front when two sensors share a name (scd4x_temp_c).
SENSOR_KINDS = ("bme280", "scd4x", "pms5003", "beam_pair", "ld2410", "ble_counter", "cp_pilot",
                "ct_clamp", "sdm_meter", "a02yyuw", "level_4_20ma", "rain_gauge", "adxl345")


def _announced(node: dict) -> dict:
    """The node's birth channels {name: sensor kind}; {} before a birth (or unreadable)."""
    raw = node.get("channels")
    if isinstance(raw, str):
        return _announced_text(raw)
    return _channel_kinds(raw)


@functools.lru_cache(maxsize=4096)
def _announced_text(raw: str) -> dict:
    # the registry keeps the channels as JSON text, the same for every message of a node;
    # the dict is shared between calls: read it, never change it
    try:
        return _channel_kinds(json.loads(raw))
    except ValueError:
        return {}


def _channel_kinds(raw) -> dict:
    if not isinstance(raw, dict):
        return {}
    return {n: v["sensor"] for n, v in raw.items() if isinstance(v, dict) and isinstance(v.get("sensor"), str)}


def _source(name: str, announced: dict) -> tuple[str | None, str]:
    """(sensor kind or None when unknown, channel name without the kind in front)."""
    kind = announced.get(name)
    if kind is None:
        # not in the birth: a window summary (rain_1h_mm...) or no birth yet
        kind = next((k for k in SENSOR_KINDS if name.startswith(k + "_")), None)
        if kind is None:
            return None, name
    prefix = kind + "_"
    return kind, name[len(prefix):] if name.startswith(prefix) else name


def _pick(sources, found: dict, board: set):
    """The aggregate dict of the first source present, honouring _ALONE."""
    for src in sources:
        kind, base = src[0], src[1]
        if len(src) > 2 and any(b == base and k != kind and k is not None for k, b in board):
            continue  # the board has a better sensor for this quantity
        agg = found.get((kind, base)) or found.get((None, base))
        if agg is not None:
            return agg
    return None


def _value(agg: dict, aggregate: str, convert):
    v = agg.get(aggregate)
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return None
    return convert(v) if convert else v


#: channel name without the kind -> the TELEMETRY rows that may read it, as
#: (position in TELEMETRY, entity type, row): a message is mapped by the rows
#: of the channels it has, not by all of them.
_ROWS_BY_BASE: dict[str, list[tuple]] = {}
for _i, (_type, _row) in enumerate((t, r) for t, rows in TELEMETRY.items() for r in rows):
    for _src in _row[4]:
        _ROWS_BY_BASE.setdefault(_src[1], []).append((_i, _type, _row))


def _telemetry(node: str, announced: dict, payload: dict, when: _When) -> list[dict]:
    found = {}
    for name, agg in (payload.get("ch") or {}).items():
        if isinstance(agg, dict):
            found.setdefault(_source(name, announced), agg)
    board = {_source(n, announced) for n in announced} | set(found)
    attrs: dict[str, dict] = {entity_type: {} for entity_type in TELEMETRY}
    rows = {c[0]: c for _, base in found for c in _ROWS_BY_BASE.get(base, ())}
    for _, entity_type, (attr, aggregate, unit, convert, sources) in sorted(rows.values(), key=lambda c: c[0]):
        agg = _pick(sources, found, board)
        value = None if agg is None else _value(agg, aggregate, convert)
        if value is not None:
            attrs[entity_type][attr] = _prop(value, when, unit)
    cp = _pick((("cp_pilot", "cp_state"),), found, board)
    state = _value(cp, LAST, None) if cp else None
    if state in (1, 2, 3, 4, 5, 6):
        attrs["EVChargingStation"].update(_pilot(_PILOT[int(state) - 1], when))
    crowd = attrs["CrowdFlowObserved"]
    if "peopleCountIn" in crowd or "peopleCountOut" in crowd:
        total = sum(crowd[a]["value"] for a in ("peopleCountIn", "peopleCountOut") if a in crowd)
        crowd["peopleCount"] = _prop(total, when, "IE")

    out = []
    window = payload.get("window") or {}
    start = when.shifted(-window["s"]) if isinstance(window.get("s"), int) else None
    observed = {"dateObserved": _date(when.at, when)}
    ref = {"refDevice": _rel(device_id(node))}
    for entity_type, got in attrs.items():
        if not got:
            continue
        if entity_type in ("EVChargingStation", "FloodMonitoring"):
            head = {"observationDateTime": _date(when.at, when)}
        elif entity_type == "CrowdFlowObserved":
            head = dict(observed)
            if start:
                head["dateObservedFrom"] = _date(start, when)
                head["dateObservedTo"] = _date(when.at, when)
        else:
            head = {**observed, **ref}
        if entity_type == "AirQualityObserved" and attrs["WeatherObserved"]:
            head["refWeatherObserved"] = _rel(entity_id("WeatherObserved", node))
        out.append(_entity(entity_type, entity_id(entity_type, node), {**head, **got}))
    for suffix, (src, aggregate, unit, prop, mtype) in MEASUREMENTS.items():
        agg = _pick((src,), found, board)
        value = None if agg is None else _value(agg, aggregate, None)
        if value is not None:
            out.append(_entity("DeviceMeasurement", entity_id("DeviceMeasurement", node, suffix), {
                "dateObserved": _date(when.at, when), "refDevice": _rel(device_id(node)),
                "controlledProperty": _prop(prop, when), "measurementType": _prop(mtype, when),
                "numValue": _prop(value, when, unit), "unit": _prop(unit, when)}))
    return out


def _pilot(letter: str, when: _When) -> dict:
    """EVChargingStation attributes for a control pilot state A..F."""
    return {"status": _prop(PILOT_STATUS[letter], when),
            "pilotState": _prop(letter, when),
            "capacity": _prop(1, when),
            "availableCapacity": _prop(1 if letter == "A" else 0, when)}


# -- the device ------------------------------------------------------------------

#: channel name (without a kind in front) -> Device controlledProperty (SDM enum).
CONTROLLED = {
    "temp_c": "temperature", "rh_pct": "humidity", "pressure_hpa": "atmosphericPressure",
    "co2_ppm": "airPollution", "pm1_ugm3": "airPollution", "pm25_ugm3": "airPollution",
    "pm10_ugm3": "airPollution", "people_in": "occupancy", "people_out": "occupancy",
    "occupancy": "occupancy", "presence": "occupancy", "moving_cm": "motion", "static_cm": "motion",
    "cp_state": "power", "offered_a": "power", "current_a": "power", "voltage_v": "power",
    "power_w": "power", "energy_kwh": "energy", "level_m": "waterLevel", "distance_mm": "waterLevel",
    "rain_mm": "precipitation", "accel_gal": "motion",
}


def _birth(node: str, payload: dict, when: _When) -> list[dict]:
    channels = {n: v["sensor"] for n, v in (payload.get("channels") or {}).items()
                if isinstance(v, dict) and isinstance(v.get("sensor"), str)}
    controlled = sorted({CONTROLLED[base] for base in (_source(n, channels)[1] for n in channels)
                         if base in CONTROLLED})
    report = payload.get("report") or {}
    config = [("board", payload.get("board")), ("config_hash", payload.get("config_hash")),
              ("report.window_s", report.get("window_s")), ("report.health_s", report.get("health_s"))]
    attrs = {"deviceCategory": _prop(["sensor"], when)}
    if controlled:
        attrs["controlledProperty"] = _prop(controlled, when)
    attrs["firmwareVersion"] = _prop(payload["fw"], when)
    attrs["hardwareVersion"] = _prop(payload["chip"], when)
    attrs["configuration"] = _prop([{"parameter": p, "value": str(v)} for p, v in config if v is not None], when)
    return [_entity("Device", device_id(node), attrs)]


def _state(node: str, payload: dict, received_at: str) -> list[dict]:
    state = payload.get("state")
    lost = state == "offline" and payload.get("reason") == "lost"
    # the last will is made at connect: its ts is the connect time, not the loss
    when = _when(payload, received_at, node_time=not lost)
    value = "lost" if lost else state
    return [_entity("Device", device_id(node), {"deviceState": _prop(value, when)})]


def _health(node: str, payload: dict, received_at: str, when: _When) -> list[dict]:
    attrs = {"dateLastValueReported": _date(received_at, when), "firmwareVersion": _prop(payload["fw"], when)}
    rssi = _num(payload, "rssi")
    if rssi is not None:
        attrs["rssi"] = _prop(rssi, when, "DBM")
    return [_entity("Device", device_id(node), attrs)]


# -- events ----------------------------------------------------------------------

#: node severity -> Alert severity (SDM enum).
SEVERITY = {"info": "informational", "warning": "high", "critical": "critical"}

#: event -> (Alert category, subCategory).
ALERTS = {"earthquake": ("naturalDisaster", "earthquake"),
          "river.stage": ("naturalDisaster", "floodRisk"),
          "rain.heavy": ("weather", "rainfall")}


def _alert(node: str, payload: dict, when: _When) -> dict:
    name = payload["event"]
    data = payload.get("data") if isinstance(payload.get("data"), dict) else {}
    category, sub = ALERTS[name]
    attrs = {"category": _prop(category, when), "subCategory": _prop(sub, when),
             "severity": _prop(SEVERITY.get(payload.get("severity"), "informational"), when),
             "description": _prop(_describe(name, payload.get("severity"), data), when),
             "dateIssued": _date(when.at, when), "validFrom": _date(when.at, when),
             "alertSource": _rel(device_id(node))}
    if data:
        attrs["data"] = _prop(dict(data), when)
    return _entity("Alert", entity_id("Alert", node, payload["boot"], payload["seq"]), attrs)


def _describe(name: str, severity, data: dict) -> str:
    """One line a person reading the platform's alert list understands."""
    parts = []
    if name == "earthquake":
        parts.append("Earthquake")
        if _text(data, "scale"):
            parts.append("JMA seismic intensity %s" % data["scale"])
        if _num(data, "intensity") is not None:
            parts.append("measured intensity %s" % data["intensity"])
        if _num(data, "pga_gal") is not None:
            parts.append("peak ground acceleration %s gal" % data["pga_gal"])
    elif name == "river.stage":
        stage = _text(data, "stage") or "unknown"
        step = "fell" if severity == "info" else "rose"
        parts.append("River stage %s to %s" % (step, stage) if not _text(data, "from")
                     else "River stage %s from %s to %s" % (step, data["from"], stage))
        if _num(data, "level_m") is not None:
            parts.append("level %s m above the gauge datum" % data["level_m"])
    else:
        parts.append("Heavy rain ended" if severity == "info" else "Heavy rain")
        if _num(data, "rain_1h_mm") is not None:
            parts.append("%s mm in the last hour" % data["rain_1h_mm"])
        if _num(data, "alert_mm_h") is not None:
            parts.append("threshold %s mm/h" % data["alert_mm_h"])
    return ", ".join(parts)


def _event(node: str, payload: dict, when: _When) -> list[dict]:
    name = payload.get("event")
    data = payload.get("data") if isinstance(payload.get("data"), dict) else {}
    station = entity_id("EVChargingStation", node)
    if name in ALERTS:
        out = [_alert(node, payload, when)]
        stage = _text(data, "stage")
        if name == "river.stage" and stage:
            out.append(_entity("FloodMonitoring", entity_id("FloodMonitoring", node), {
                "observationDateTime": _date(when.at, when), "floodLevelStatus": _prop(stage, when)}))
        return out
    if name in ("ev.state", "ev.fault", "ev.session_start", "ev.session_end"):
        letter = _text(data, {"ev.state": "to", "ev.fault": "state", "ev.session_start": "state",
                              "ev.session_end": "to"}[name])
        attrs = {"observationDateTime": _date(when.at, when)}
        if letter in PILOT_STATUS:
            attrs.update(_pilot(letter, when))
        out = []
        if name == "ev.session_start":
            attrs["startDateTime"] = _date(when.at, when)
            if _num(data, "offered_a") is not None:
                attrs["amperage"] = _prop(data["offered_a"], when, "AMP")
        elif name == "ev.session_end":
            attrs["endDateTime"] = _date(when.at, when)
            out.append(_session(node, payload, data, when))
        return [_entity("EVChargingStation", station, attrs)] + out
    return []  # sensor.failed, node.event_mode, events of a later firmware: not relayed


def _session(node: str, payload: dict, data: dict, when: _When) -> dict:
    """One finished charging session, from ev.session_end."""
    attrs = {"endDateTime": _date(when.at, when)}
    duration = _num(data, "duration_s")
    if duration is not None:
        attrs["startDateTime"] = _date(when.shifted(-duration), when)
        attrs["chargingDuration"] = _prop(duration, when, "SEC")
    for key, attr, unit in (("energy_kwh", "energyDelivered", "KWH"), ("peak_w", "peakPower", "WTT"),
                            ("meter_kwh", "totalActiveEnergyImport", "KWH")):
        if _num(data, key) is not None:
            attrs[attr] = _prop(data[key], when, unit)
    attrs["partialSession"] = _prop(data.get("partial") is True, when)
    attrs["refEVChargingStation"] = _rel(entity_id("EVChargingStation", node))
    attrs["refDevice"] = _rel(device_id(node))
    return _entity("EVChargingSession", entity_id("EVChargingSession", node, payload["boot"], payload["seq"]),
                   attrs)


# -- the entry point ---------------------------------------------------------------

def entities(node: dict, kind: str, payload: dict, received_at: str) -> list[dict]:
    """The NGSI-LD entities to upsert for one stored message (see the module docstring);
    [] for a message that maps to nothing. Raises NGSIError only for a call
    that is not a stored message (an unknown kind, no envelope)."""
    if kind not in KINDS:
        raise NGSIError(f"unknown message kind {kind!r} (known: {', '.join(KINDS)})")
    if not isinstance(node, dict) or not isinstance(node.get("id"), str):
        raise NGSIError("node must be the registry's row of the node, with its 'id'")
    if not isinstance(payload, dict) or "clock_set" not in payload:
        raise NGSIError(f"{kind} payload has no envelope (v, node, boot, seq, ts, clock_set)")
    if not isinstance(received_at, str):
        raise NGSIError("received_at must be the fleet's ISO time of receipt, e.g. 2024-05-01T12:00:00.123Z")
    nid = node["id"]
    when = _when(payload, received_at)
    if kind == "telemetry":
        return _telemetry(nid, _announced(node), payload, when)
    if kind == "birth":
        return _birth(nid, payload, when)
    if kind == "state":
        return _state(nid, payload, received_at)
    if kind == "health":
        return _health(nid, payload, received_at, when)
    if kind == "event":
        return _event(nid, payload, when)
    return []  # replies answer the fleet's own commands
