"""fleet.ngsi: what each board's messages become on the city data platform
(docs/platform.md). Payloads are built as the firmware builds them (channel
names from the drivers, a second sensor's channel with its kind in front) and
checked against the MQTT contract's schemas before they are mapped."""
import ast
import copy
import json
import re
from pathlib import Path

import pytest

from fleet import schemas
from fleet.ngsi import CONTEXT, NGSIError, entities
from tests.fleet import payloads

REPO = Path(__file__).resolve().parents[2]
DOC = (REPO / "docs" / "platform.md").read_text(encoding="utf-8")
TS = "2024-05-01T12:00:00Z"
RECEIVED = "2024-05-01T12:00:01.250Z"


def agg(mean, n=60, last=None, lo=None, hi=None, total=None):
    a = {"n": n, "min": mean if lo is None else lo, "max": mean if hi is None else hi, "mean": mean,
         "last": mean if last is None else last}
    if total is not None:
        a["sum"] = total
    return a


def node_row(nid, board, channels):
    """The registry's row as fleet/registry.py stores it: channels as JSON text."""
    return {"id": nid, "board": board, "fw": "0.1.0", "chip": "esp32", "state": "online",
            "channels": None if channels is None else json.dumps({n: {"sensor": k} for n, k in channels.items()})}


def message(kind, nid, boot=3, seq=42, clock=True, **body):
    build = getattr(payloads, kind)
    p = build(node=nid, boot=boot, seq=seq, **body)
    if not clock:
        p.update(ts=None, clock_set=False)
    schemas.validate(kind, p)  # realistic: what the fleet would have stored
    return p


def telemetry(nid, ch, clock=True, window_s=60, **over):
    return message("telemetry", nid, clock=clock, ch=ch, window={"s": window_s, "end_up_ms": 3_600_000}, **over)


def event(nid, name, severity, data, seq=42, clock=True):
    return message("event", nid, seq=seq, clock=clock, event=name, severity=severity, data=data)


def by_id(result):
    ids = [e["id"] for e in result]
    assert len(ids) == len(set(ids)), ids
    return {e["id"]: e for e in result}


def values(entity):
    """{attribute: value, or (value, unitCode)} without the envelope; links as their object."""
    out = {}
    for name, a in entity.items():
        if name in ("id", "type", "@context"):
            continue
        if a["type"] == "Relationship":
            out[name] = a["object"]
        else:
            v = a["value"]
            if isinstance(v, dict) and v.get("@type") == "DateTime":
                v = v["@value"]
            out[name] = (v, a["unitCode"]) if "unitCode" in a else v
    return out


def properties(result):
    for e in result:
        for name, a in e.items():
            if isinstance(a, dict) and a.get("type") == "Property":
                yield e, name, a


def assert_observed(result, at, clock_set=True):
    for e, name, p in properties(result):
        assert p["observedAt"] == at, (e["id"], name)
        if clock_set:
            assert "clockSet" not in p, (e["id"], name)
        else:
            assert p["clockSet"] == {"type": "Property", "value": False}, (e["id"], name)


# -- the four boards -------------------------------------------------------------

ENV = {"temp_c": "bme280", "rh_pct": "bme280", "pressure_hpa": "bme280", "co2_ppm": "scd4x",
       "scd4x_temp_c": "scd4x", "scd4x_rh_pct": "scd4x", "pm1_ugm3": "pms5003", "pm25_ugm3": "pms5003",
       "pm10_ugm3": "pms5003"}
GATE = {"people_in": "beam_pair", "people_out": "beam_pair", "occupancy": "beam_pair", "presence": "ld2410",
        "moving_cm": "ld2410", "static_cm": "ld2410"}
EV = {"cp_state": "cp_pilot", "offered_a": "cp_pilot", "current_a": "ct_clamp", "voltage_v": "sdm_meter",
      "sdm_meter_current_a": "sdm_meter", "power_w": "sdm_meter", "energy_kwh": "sdm_meter"}
RIVER = {"level_m": "a02yyuw", "distance_mm": "a02yyuw", "level_4_20ma_level_m": "level_4_20ma",
         "rain_mm": "rain_gauge", "accel_gal": "adxl345"}

ENV_CH = {"temp_c": agg(21.71, lo=21.5, hi=21.93, last=21.8), "rh_pct": agg(41.2),
          "pressure_hpa": agg(1008.42), "co2_ppm": agg(612.5, n=12), "scd4x_temp_c": agg(23.4, n=12),
          "scd4x_rh_pct": agg(38.0, n=12), "pm1_ugm3": agg(4.2), "pm25_ugm3": agg(7.8),
          "pm10_ugm3": agg(11.3)}


def test_env_station_window_gives_weather_and_air_quality():
    result = entities(node_row("env-0001", "env-station", ENV), "telemetry", telemetry("env-0001", ENV_CH),
                      RECEIVED)
    got = by_id(result)
    assert list(got) == ["urn:ngsi-ld:WeatherObserved:iwaki:env-0001",
                         "urn:ngsi-ld:AirQualityObserved:iwaki:env-0001"]
    weather = got["urn:ngsi-ld:WeatherObserved:iwaki:env-0001"]
    assert weather["type"] == "WeatherObserved"
    # the bme280's temp_c and rh_pct; the scd4x's are not relayed on this board
    assert values(weather) == {
        "dateObserved": TS, "refDevice": "urn:ngsi-ld:Device:iwaki:env-0001",
        "temperature": (21.71, "CEL"), "relativeHumidity": (0.412, "C62"), "atmosphericPressure": (1008.42, "A97")}
    air = got["urn:ngsi-ld:AirQualityObserved:iwaki:env-0001"]
    assert values(air) == {
        "dateObserved": TS, "refDevice": "urn:ngsi-ld:Device:iwaki:env-0001",
        "refWeatherObserved": "urn:ngsi-ld:WeatherObserved:iwaki:env-0001",
        "co2": (612.5, "59"), "pm1": (4.2, "GQ"), "pm25": (7.8, "GQ"), "pm10": (11.3, "GQ")}
    for e in result:
        assert e["@context"] == CONTEXT
    assert_observed(result, TS)


def test_env_station_keeps_the_bme280_even_in_a_window_without_it():
    ch = {k: v for k, v in ENV_CH.items() if k not in ("temp_c", "rh_pct", "pressure_hpa")}
    got = by_id(entities(node_row("env-0001", "env-station", ENV), "telemetry", telemetry("env-0001", ch),
                         RECEIVED))
    # the SCD4x's self-heated readings never stand in for the station's thermometer
    assert "urn:ngsi-ld:WeatherObserved:iwaki:env-0001" not in got
    air = got["urn:ngsi-ld:AirQualityObserved:iwaki:env-0001"]
    assert "refWeatherObserved" not in air and values(air)["co2"] == (612.5, "59")


def test_an_scd4x_alone_is_the_boards_thermometer():
    board = {"co2_ppm": "scd4x", "temp_c": "scd4x", "rh_pct": "scd4x"}
    ch = {"co2_ppm": agg(640.0, n=12), "temp_c": agg(24.5, n=12), "rh_pct": agg(35.5, n=12)}
    got = by_id(entities(node_row("co2-0001", "co2-only", board), "telemetry", telemetry("co2-0001", ch), RECEIVED))
    assert values(got["urn:ngsi-ld:WeatherObserved:iwaki:co2-0001"])["temperature"] == (24.5, "CEL")
    assert values(got["urn:ngsi-ld:WeatherObserved:iwaki:co2-0001"])["relativeHumidity"] == (0.355, "C62")


def test_before_the_birth_a_prefixed_name_still_says_which_sensor():
    # the registry has no channels yet: plain temp_c is the first sensor's, scd4x_temp_c the scd4x's
    got = by_id(entities(node_row("env-0001", "env-station", None), "telemetry", telemetry("env-0001", ENV_CH),
                         RECEIVED))
    assert values(got["urn:ngsi-ld:WeatherObserved:iwaki:env-0001"])["temperature"] == (21.71, "CEL")
    assert values(got["urn:ngsi-ld:AirQualityObserved:iwaki:env-0001"])["co2"] == (612.5, "59")


GATE_CH = {"people_in": agg(0.2, lo=0, hi=3, last=0, total=12), "people_out": agg(0.15, lo=0, hi=2, last=1, total=9),
           "occupancy": agg(15.5, lo=14, hi=18, last=17), "presence": agg(0.85, lo=0, hi=1, last=1),
           "moving_cm": agg(120.0), "static_cm": agg(80.0),
           "ble_devices": {"n": 1, "min": 23, "max": 23, "mean": 23, "last": 23}}


def test_people_gate_window_gives_crowd_flow():
    result = entities(node_row("gate-0001", "people-gate", GATE), "telemetry", telemetry("gate-0001", GATE_CH),
                      RECEIVED)
    assert [e["id"] for e in result] == ["urn:ngsi-ld:CrowdFlowObserved:iwaki:gate-0001"]
    crowd = result[0]
    assert crowd["type"] == "CrowdFlowObserved"
    assert values(crowd) == {
        "dateObserved": TS, "dateObservedFrom": "2024-05-01T11:59:00Z", "dateObservedTo": TS,
        "peopleCount": (21, "IE"), "peopleCountIn": (12, "IE"), "peopleCountOut": (9, "IE"),
        "peopleInside": (17, "IE"), "occupancy": (0.85, "C62"), "bleDeviceCount": (23, "C62")}
    assert isinstance(crowd["peopleCount"]["value"], int)
    assert_observed(result, TS)


def test_people_gate_below_k_sends_no_device_count():
    ch = {k: v for k, v in GATE_CH.items() if k != "ble_devices"}
    p = telemetry("gate-0001", ch, flags={"ble_devices": "below_k"})
    crowd = entities(node_row("gate-0001", "people-gate", GATE), "telemetry", p, RECEIVED)[0]
    assert "bleDeviceCount" not in crowd
    assert values(crowd)["peopleCount"] == (21, "IE")


def test_a_window_with_only_the_ble_flag_maps_to_nothing():
    p = telemetry("gate-0001", {"moving_cm": agg(10.0)}, flags={"ble_devices": "below_k"})
    assert entities(node_row("gate-0001", "people-gate", GATE), "telemetry", p, RECEIVED) == []


EV_CH = {"cp_state": agg(3.0, lo=3, hi=3, last=3), "offered_a": agg(16.0, last=16.0),
         "current_a": agg(15.62, n=60), "voltage_v": agg(202.4, n=12), "sdm_meter_current_a": agg(15.71, n=12),
         "power_w": agg(3170.0, n=12), "energy_kwh": agg(1234.561, n=12, last=1234.567)}


def test_ev_charger_window_gives_station_and_meter():
    result = entities(node_row("ev-0001", "ev-charger", EV), "telemetry", telemetry("ev-0001", EV_CH), RECEIVED)
    got = by_id(result)
    assert list(got) == ["urn:ngsi-ld:EVChargingStation:iwaki:ev-0001", "urn:ngsi-ld:ACMeasurement:iwaki:ev-0001"]
    assert values(got["urn:ngsi-ld:EVChargingStation:iwaki:ev-0001"]) == {
        "observationDateTime": TS, "amperage": (16.0, "AMP"), "voltage": (202.4, "VLT"),
        "powerConsumption": (3170.0, "WTT"), "status": "working", "pilotState": "C", "capacity": 1,
        "availableCapacity": 0}
    # the meter's current, not the CT clamp's; energy is the meter's last reading
    assert values(got["urn:ngsi-ld:ACMeasurement:iwaki:ev-0001"]) == {
        "dateObserved": TS, "refDevice": "urn:ngsi-ld:Device:iwaki:ev-0001",
        "current": ({"L1": 15.71}, "AMP"), "phaseVoltage": ({"L1": 202.4}, "VLT"),
        "totalActivePower": (3170.0, "WTT"), "totalActiveEnergyImport": (1234.567, "KWH")}
    assert_observed(result, TS)


def test_ev_charger_without_meter_answer_uses_the_ct_clamp():
    ch = {k: EV_CH[k] for k in ("cp_state", "offered_a", "current_a")}
    ch["cp_state"] = agg(1.0, lo=1, hi=1, last=1)
    got = by_id(entities(node_row("ev-0001", "ev-charger", EV), "telemetry", telemetry("ev-0001", ch), RECEIVED))
    assert values(got["urn:ngsi-ld:ACMeasurement:iwaki:ev-0001"])["current"] == ({"L1": 15.62}, "AMP")
    station = values(got["urn:ngsi-ld:EVChargingStation:iwaki:ev-0001"])
    assert station["pilotState"] == "A" and station["availableCapacity"] == 1 and "voltage" not in station


@pytest.mark.parametrize("state,status", [(2, "working"), (4, "working"), (5, "withIncidence"), (6, "outOfService")])
def test_pilot_states(state, status):
    ch = {"cp_state": agg(float(state), last=state)}
    station = entities(node_row("ev-0001", "ev-charger", EV), "telemetry", telemetry("ev-0001", ch), RECEIVED)[0]
    assert values(station)["status"] == status
    assert values(station)["pilotState"] == "ABCDEF"[state - 1]


def test_session_end_gives_a_session_and_updates_the_station():
    data = {"energy_kwh": 8.432, "peak_w": 3312.5, "duration_s": 9720, "to": "B", "meter_kwh": 1242.999,
            "sensor": "cp-pilot"}
    result = entities(node_row("ev-0001", "ev-charger", EV), "event",
                      event("ev-0001", "ev.session_end", "info", data, seq=77), RECEIVED)
    got = by_id(result)
    assert values(got["urn:ngsi-ld:EVChargingStation:iwaki:ev-0001"]) == {
        "observationDateTime": TS, "status": "working", "pilotState": "B", "capacity": 1, "availableCapacity": 0,
        "endDateTime": TS}
    session = got["urn:ngsi-ld:EVChargingSession:iwaki:ev-0001:3:77"]
    assert session["type"] == "EVChargingSession"
    assert values(session) == {
        "endDateTime": TS, "startDateTime": "2024-05-01T09:18:00Z", "chargingDuration": (9720, "SEC"),
        "energyDelivered": (8.432, "KWH"), "peakPower": (3312.5, "WTT"), "totalActiveEnergyImport": (1242.999, "KWH"),
        "partialSession": False, "refEVChargingStation": "urn:ngsi-ld:EVChargingStation:iwaki:ev-0001",
        "refDevice": "urn:ngsi-ld:Device:iwaki:ev-0001"}
    assert_observed(result, TS)


def test_session_without_meter_leaves_energy_out():
    data = {"energy_kwh": None, "peak_w": None, "duration_s": 600, "to": "A", "meter_kwh": None, "partial": True,
            "sensor": "cp-pilot"}
    got = by_id(entities(node_row("ev-0002", "ev-charger", None), "event",
                         event("ev-0002", "ev.session_end", "info", data, seq=5), RECEIVED))
    assert values(got["urn:ngsi-ld:EVChargingSession:iwaki:ev-0002:3:5"]) == {
        "endDateTime": TS, "startDateTime": "2024-05-01T11:50:00Z", "chargingDuration": (600, "SEC"),
        "partialSession": True, "refEVChargingStation": "urn:ngsi-ld:EVChargingStation:iwaki:ev-0002",
        "refDevice": "urn:ngsi-ld:Device:iwaki:ev-0002"}


def test_session_start_state_and_fault_update_the_station_only():
    start = entities(node_row("ev-0001", "ev-charger", EV), "event", event("ev-0001", "ev.session_start", "info", {
        "state": "C", "offered_a": 16.0, "meter_kwh": 1234.567, "sensor": "cp-pilot"}), RECEIVED)
    assert [e["id"] for e in start] == ["urn:ngsi-ld:EVChargingStation:iwaki:ev-0001"]
    assert values(start[0]) == {"observationDateTime": TS, "status": "working", "pilotState": "C", "capacity": 1,
                                "availableCapacity": 0, "startDateTime": TS, "amperage": (16.0, "AMP")}
    fault = entities(node_row("ev-0001", "ev-charger", EV), "event", event("ev-0001", "ev.fault", "warning", {
        "state": "E", "from": "C", "reason": "pilot shorted or no mains", "sensor": "cp-pilot"}), RECEIVED)
    assert values(fault[0])["status"] == "withIncidence"
    change = entities(node_row("ev-0001", "ev-charger", EV), "event", event("ev-0001", "ev.state", "info", {
        "from": None, "to": "A", "sensor": "cp-pilot"}), RECEIVED)
    assert values(change[0])["availableCapacity"] == 1


RIVER_CH = {"level_m": agg(2.412, lo=2.405, hi=2.42, last=2.418), "distance_mm": agg(3588.0, lo=3580, hi=3595),
            "level_4_20ma_level_m": agg(2.405), "rain_mm": agg(0.025, total=1.5),
            "rain_10min_mm": {"n": 1, "min": 4.5, "max": 4.5, "mean": 4.5, "last": 4.5},
            "rain_1h_mm": {"n": 1, "min": 18.0, "max": 18.0, "mean": 18.0, "last": 18.0},
            "accel_gal": agg(0.8, n=240, lo=0.3, hi=1.25),
            "intensity": {"n": 1, "min": 0.4, "max": 0.4, "mean": 0.4, "last": 0.4},
            "pga_gal": {"n": 1, "min": 1.2, "max": 1.2, "mean": 1.2, "last": 1.2}}


def test_river_station_window_gives_flood_weather_and_seismic_measurements():
    result = entities(node_row("riv-0001", "river-station", RIVER), "telemetry", telemetry("riv-0001", RIVER_CH),
                      RECEIVED)
    got = by_id(result)
    assert list(got) == ["urn:ngsi-ld:WeatherObserved:iwaki:riv-0001", "urn:ngsi-ld:FloodMonitoring:iwaki:riv-0001",
                         "urn:ngsi-ld:DeviceMeasurement:iwaki:riv-0001:seismicIntensity",
                         "urn:ngsi-ld:DeviceMeasurement:iwaki:riv-0001:peakGroundAcceleration"]
    assert values(got["urn:ngsi-ld:WeatherObserved:iwaki:riv-0001"]) == {
        "dateObserved": TS, "refDevice": "urn:ngsi-ld:Device:iwaki:riv-0001", "precipitation": (18.0, "MMT")}
    assert values(got["urn:ngsi-ld:FloodMonitoring:iwaki:riv-0001"]) == {
        "observationDateTime": TS, "currentLevel": (2.412, "MTR"), "measuredDistance": (3.588, "MTR")}
    assert values(got["urn:ngsi-ld:DeviceMeasurement:iwaki:riv-0001:seismicIntensity"]) == {
        "dateObserved": TS, "refDevice": "urn:ngsi-ld:Device:iwaki:riv-0001",
        "controlledProperty": "seismicIntensity",
        "measurementType": "JMA instrumental seismic intensity over the node's seismic window",
        "numValue": (0.4, "C62"), "unit": "C62"}
    pga = values(got["urn:ngsi-ld:DeviceMeasurement:iwaki:riv-0001:peakGroundAcceleration"])
    assert pga["numValue"] == (1.2, "A76") and pga["unit"] == "A76"
    assert_observed(result, TS)


def test_river_station_falls_back_to_the_4_20ma_level():
    ch = {"level_4_20ma_level_m": agg(2.405)}
    got = by_id(entities(node_row("riv-0001", "river-station", RIVER), "telemetry", telemetry("riv-0001", ch),
                         RECEIVED))
    assert values(got["urn:ngsi-ld:FloodMonitoring:iwaki:riv-0001"]) == {
        "observationDateTime": TS, "currentLevel": (2.405, "MTR")}


def test_river_stage_change_gives_an_alert_and_the_flood_status():
    data = {"stage": "caution", "from": "standby", "level_m": 2.93, "sensor": "a02yyuw"}
    result = entities(node_row("riv-0001", "river-station", RIVER), "event",
                      event("riv-0001", "river.stage", "warning", data, seq=117), RECEIVED)
    got = by_id(result)
    alert = got["urn:ngsi-ld:Alert:iwaki:riv-0001:3:117"]
    assert alert["type"] == "Alert"
    assert values(alert) == {
        "category": "naturalDisaster", "subCategory": "floodRisk", "severity": "high",
        "description": "River stage rose from standby to caution, level 2.93 m above the gauge datum",
        "dateIssued": TS, "validFrom": TS, "alertSource": "urn:ngsi-ld:Device:iwaki:riv-0001", "data": data}
    assert values(got["urn:ngsi-ld:FloodMonitoring:iwaki:riv-0001"]) == {
        "observationDateTime": TS, "floodLevelStatus": "caution"}
    assert_observed(result, TS)


def test_earthquake_gives_a_critical_alert():
    data = {"intensity": 5.12, "scale": "5+", "pga_gal": 312.4, "sensor": "adxl345"}
    result = entities(node_row("riv-0001", "river-station", RIVER), "event",
                      event("riv-0001", "earthquake", "critical", data, seq=9), RECEIVED)
    assert [e["id"] for e in result] == ["urn:ngsi-ld:Alert:iwaki:riv-0001:3:9"]
    assert values(result[0]) == {
        "category": "naturalDisaster", "subCategory": "earthquake", "severity": "critical",
        "description": "Earthquake, JMA seismic intensity 5+, measured intensity 5.12, "
                       "peak ground acceleration 312.4 gal",
        "dateIssued": TS, "validFrom": TS, "alertSource": "urn:ngsi-ld:Device:iwaki:riv-0001", "data": data}


def test_heavy_rain_and_its_end_are_weather_alerts():
    data = {"rain_1h_mm": 52.5, "rain_10min_mm": 12.0, "alert_mm_h": 50, "sensor": "rain-gauge"}
    on = entities(node_row("riv-0001", "river-station", RIVER), "event",
                  event("riv-0001", "rain.heavy", "warning", data, seq=10), RECEIVED)[0]
    assert values(on)["description"] == "Heavy rain, 52.5 mm in the last hour, threshold 50 mm/h"
    v = values(on)
    assert (v["category"], v["subCategory"], v["severity"]) == ("weather", "rainfall", "high")
    off = entities(node_row("riv-0001", "river-station", RIVER), "event",
                   event("riv-0001", "rain.heavy", "info", {**data, "rain_1h_mm": 44.0}, seq=11), RECEIVED)[0]
    assert off["id"] == "urn:ngsi-ld:Alert:iwaki:riv-0001:3:11"
    assert values(off)["severity"] == "informational"
    assert values(off)["description"].startswith("Heavy rain ended, 44.0 mm")


# -- the device ------------------------------------------------------------------

def test_birth_describes_the_device():
    p = message("birth", "env-0001", chip="esp32s3", fw="0.2.1",
                channels={n: {"sensor": k} for n, k in ENV.items()}, report={"window_s": 60, "health_s": 60})
    result = entities(node_row("env-0001", "env-station", None), "birth", p, RECEIVED)
    assert [e["id"] for e in result] == ["urn:ngsi-ld:Device:iwaki:env-0001"]
    assert result[0]["type"] == "Device"
    assert values(result[0]) == {
        "deviceCategory": ["sensor"],
        "controlledProperty": ["airPollution", "atmosphericPressure", "humidity", "temperature"],
        "firmwareVersion": "0.2.1", "hardwareVersion": "esp32s3",
        "configuration": [{"parameter": "board", "value": "env-station"},
                          {"parameter": "config_hash", "value": "0123456789ab"},
                          {"parameter": "report.window_s", "value": "60"},
                          {"parameter": "report.health_s", "value": "60"}]}
    assert_observed(result, TS)


@pytest.mark.parametrize("value,reason,state", [("online", "connected", "online"), ("offline", "shutdown", "offline")])
def test_state_sets_the_device_state(value, reason, state):
    result = entities(node_row("gate-0001", "people-gate", GATE), "state",
                      message("state", "gate-0001", value=value, reason=reason), RECEIVED)
    assert values(result[0]) == {"deviceState": state}
    assert_observed(result, TS)


def test_last_will_is_observed_when_the_fleet_got_it():
    # the will's ts is the connect time, hours before the node vanished
    p = message("state", "gate-0001", value="offline", reason="lost")
    result = entities(node_row("gate-0001", "people-gate", GATE), "state", p, RECEIVED)
    assert values(result[0]) == {"deviceState": "lost"}
    assert_observed(result, RECEIVED, clock_set=True)


def test_health_reports_signal_and_firmware():
    result = entities(node_row("riv-0001", "river-station", RIVER), "health",
                      message("health", "riv-0001", rssi=-71, vbat_mv=3912), RECEIVED)
    assert values(result[0]) == {"dateLastValueReported": RECEIVED, "firmwareVersion": "0.1.0",
                                 "rssi": (-71, "DBM")}
    assert_observed(result, TS)
    no_rssi = entities(node_row("riv-0001", "river-station", RIVER), "health",
                       message("health", "riv-0001", rssi=None), RECEIVED)
    assert "rssi" not in no_rssi[0]


# -- clock not set, determinism, what maps to nothing ---------------------------------

def test_clock_not_set_uses_the_receipt_time_and_says_so():
    p = telemetry("gate-0001", GATE_CH, clock=False)
    result = entities(node_row("gate-0001", "people-gate", GATE), "telemetry", p, RECEIVED)
    assert values(result[0])["dateObserved"] == RECEIVED
    assert values(result[0])["dateObservedFrom"] == "2024-05-01T11:59:01.250Z"
    assert_observed(result, RECEIVED, clock_set=False)
    alert = entities(node_row("riv-0001", "river-station", RIVER), "event",
                     event("riv-0001", "earthquake", "warning", {"intensity": 3.8, "scale": "4", "pga_gal": 41.0},
                           clock=False), RECEIVED)
    assert values(alert[0])["dateIssued"] == RECEIVED
    assert_observed(alert, RECEIVED, clock_set=False)
    birth = entities(node_row("env-0001", "env-station", None), "birth", message("birth", "env-0001", clock=False),
                     RECEIVED)
    assert_observed(birth, RECEIVED, clock_set=False)


def all_messages():
    """(node row, kind, payload) for every realistic message in this file."""
    rows = {"env": node_row("env-0001", "env-station", ENV), "gate": node_row("gate-0001", "people-gate", GATE),
            "ev": node_row("ev-0001", "ev-charger", EV), "riv": node_row("riv-0001", "river-station", RIVER)}
    out = []
    for key, ch in (("env", ENV_CH), ("gate", GATE_CH), ("ev", EV_CH), ("riv", RIVER_CH)):
        nid = rows[key]["id"]
        for clock in (True, False):
            out.append((rows[key], "telemetry", telemetry(nid, ch, clock=clock)))
            out.append((rows[key], "birth", message("birth", nid, clock=clock,
                                                    channels=json.loads(rows[key]["channels"]))))
            out.append((rows[key], "state", message("state", nid, clock=clock)))
            out.append((rows[key], "health", message("health", nid, clock=clock)))
            out.append((rows[key], "reply", message("reply", nid, clock=clock)))
    ev, riv = rows["ev"], rows["riv"]
    for row, name, sev, data in (
            (riv, "earthquake", "critical", {"intensity": 5.12, "scale": "5+", "pga_gal": 312.4, "sensor": "adxl345"}),
            (riv, "river.stage", "info", {"stage": "normal", "from": "standby", "level_m": 2.0, "sensor": "a02yyuw"}),
            (riv, "rain.heavy", "warning", {"rain_1h_mm": 52.5, "rain_10min_mm": 12.0, "alert_mm_h": 50}),
            (ev, "ev.state", "info", {"from": "B", "to": "C", "sensor": "cp-pilot"}),
            (ev, "ev.fault", "warning", {"state": "F", "from": "A", "reason": "EVSE not available"}),
            (ev, "ev.session_start", "info", {"state": "C", "offered_a": 16.0, "meter_kwh": 10.0}),
            (ev, "ev.session_end", "info", {"energy_kwh": 8.4, "peak_w": 3312.5, "duration_s": 9720, "to": "B",
                                            "meter_kwh": 18.4}),
            (riv, "sensor.failed", "warning", {"sensor": "adxl345", "reason": "no answer"}),
            (riv, "node.event_mode", "info", {"active": True})):
        for clock in (True, False):
            out.append((row, "event", event(row["id"], name, sev, data, clock=clock)))
    return out


def test_same_message_gives_equal_entities_and_leaves_its_input_alone():
    for row, kind, p in all_messages():
        before = copy.deepcopy((row, p))
        first = entities(row, kind, p, RECEIVED)
        second = entities(copy.deepcopy(row), kind, copy.deepcopy(p), RECEIVED)
        assert first == second
        assert json.dumps(first, sort_keys=False) == json.dumps(second, sort_keys=False)
        assert (row, p) == before, f"{kind} payload was changed"


def test_entities_are_json_and_every_property_has_a_value():
    for row, kind, p in all_messages():
        result = entities(row, kind, p, RECEIVED)
        json.loads(json.dumps(result, allow_nan=False))
        for e in result:
            assert re.fullmatch(r"urn:ngsi-ld:%s:iwaki:%s(:[A-Za-z0-9]+)*" % (e["type"], re.escape(row["id"])),
                                e["id"]), e["id"]
            assert e["@context"] == CONTEXT
            for name, a in e.items():
                if name in ("id", "type", "@context"):
                    continue
                assert a["type"] in ("Property", "Relationship"), (e["id"], name)
                if a["type"] == "Relationship":
                    assert a["object"].startswith("urn:ngsi-ld:"), (e["id"], name)
                else:
                    assert a.get("value") not in (None, "", [], {}), (e["id"], name)
                    assert a["observedAt"] in (TS, RECEIVED), (e["id"], name)


def test_replies_and_operational_events_map_to_nothing():
    row = node_row("riv-0001", "river-station", RIVER)
    assert entities(row, "reply", message("reply", "riv-0001"), RECEIVED) == []
    assert entities(row, "event", event("riv-0001", "sensor.failed", "warning",
                                        {"sensor": "adxl345", "reason": "no answer"}), RECEIVED) == []
    assert entities(row, "event", event("riv-0001", "node.event_mode", "info", {"active": True}), RECEIVED) == []
    assert entities(row, "event", event("riv-0001", "pump.started", "info", {}), RECEIVED) == []


def test_unknown_channels_and_odd_event_data_are_skipped_not_fatal():
    row = node_row("env-0009", "env-station", {"temp_c": "bme280", "lux": "bh1750", "scd4x_temp_c_2": "scd4x"})
    ch = {"temp_c": agg(20.0), "lux": agg(350.0), "scd4x_temp_c_2": agg(25.0), "mystery_x": agg(1.0)}
    result = entities(row, "telemetry", telemetry("env-0009", ch), RECEIVED)
    assert [(e["type"], sorted(values(e))) for e in result] == [
        ("WeatherObserved", ["dateObserved", "refDevice", "temperature"])]
    assert entities(node_row("env-0009", "x", None), "telemetry", telemetry("env-0009", {"lux": agg(3.0)}),
                    RECEIVED) == []
    # a registry row with unreadable channels is treated as "no birth yet"
    broken = {**row, "channels": "{not json"}
    assert values(entities(broken, "telemetry", telemetry("env-0009", ch), RECEIVED)[0])["temperature"] == (20.0, "CEL")
    odd = entities(node_row("riv-0001", "river-station", RIVER), "event",
                   event("riv-0001", "earthquake", "warning", {"intensity": "strong", "scale": 5, "pga_gal": None}),
                   RECEIVED)
    assert values(odd[0])["description"] == "Earthquake"
    stage = entities(node_row("riv-0001", "river-station", RIVER), "event",
                     event("riv-0001", "river.stage", "warning", {"stage": 3}), RECEIVED)
    assert [e["type"] for e in stage] == ["Alert"]
    bare = entities(node_row("riv-0001", "river-station", RIVER), "event",
                    message("event", "riv-0001", event="rain.heavy", severity="warning", data={}), RECEIVED)
    assert values(bare[0])["description"] == "Heavy rain" and "data" not in bare[0]
    no_data = message("event", "ev-0001", event="ev.session_end", severity="info")
    del no_data["data"]  # optional in the contract
    got = entities(node_row("ev-0001", "ev-charger", EV), "event", no_data, RECEIVED)
    assert [e["type"] for e in got] == ["EVChargingStation", "EVChargingSession"]
    assert values(got[1]) == {"endDateTime": TS, "partialSession": False,
                              "refEVChargingStation": "urn:ngsi-ld:EVChargingStation:iwaki:ev-0001",
                              "refDevice": "urn:ngsi-ld:Device:iwaki:ev-0001"}
    counter_without_sum = entities(node_row("gate-0001", "people-gate", GATE), "telemetry",
                                   telemetry("gate-0001", {"people_in": agg(0.2)}), RECEIVED)
    assert counter_without_sum == []


def test_a_call_that_is_not_a_message_is_refused_clearly():
    p = message("telemetry", "env-0001")
    with pytest.raises(NGSIError, match="unknown message kind 'cmd'"):
        entities(node_row("env-0001", "env-station", ENV), "cmd", p, RECEIVED)
    with pytest.raises(NGSIError, match="no envelope"):
        entities(node_row("env-0001", "env-station", ENV), "telemetry", {"ch": {}}, RECEIVED)
    with pytest.raises(NGSIError, match="'id'"):
        entities({"board": "env-station"}, "telemetry", p, RECEIVED)


# -- the docs stay in step --------------------------------------------------------

def driver_channels():
    """(sensor kind, channel) for every driver's CHANNELS in firmware/node/sensors, read from source
    (the drivers import MicroPython modules), plus the window-summary channels boards/README.md lists."""
    found = []
    for path in sorted((REPO / "firmware" / "node" / "sensors").glob("*.py")):
        for cls in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(cls, ast.ClassDef):
                continue
            consts = {t.id: node.value for node in cls.body if isinstance(node, ast.Assign)
                      for t in node.targets if isinstance(t, ast.Name)}
            if "KIND" in consts and "CHANNELS" in consts:
                kind = ast.literal_eval(consts["KIND"])
                found += [(kind, ch) for ch in ast.literal_eval(consts["CHANNELS"])]
    readme = (REPO / "boards" / "README.md").read_text(encoding="utf-8")
    for line in readme.splitlines():
        m = re.match(r"\| `([a-z0-9_]+)` \|.*each window: (.*)", line)
        if m:
            names = m.group(2).split("flag")[0]
            found += [(m.group(1), ch) for ch in re.findall(r"`([a-z0-9_]+)`", names)]
    return found


def not_relayed_section():
    return DOC.split("## Not relayed", 1)[1].split("\n## ", 1)[0]


def test_every_driver_channel_is_mapped_or_listed_as_not_relayed():
    channels = driver_channels()
    kinds = {k for k, _ in channels}
    assert {"bme280", "scd4x", "pms5003", "beam_pair", "ld2410", "cp_pilot", "ct_clamp", "sdm_meter", "a02yyuw",
            "level_4_20ma", "rain_gauge", "adxl345", "ble_counter"} <= kinds
    assert ("adxl345", "intensity") in channels and ("ble_counter", "ble_devices") in channels
    section = not_relayed_section()
    unaccounted = []
    for kind, ch in channels:
        board = {ch: kind}
        p = telemetry("any-0001", {ch: agg(1.0, total=60.0)})
        mapped = entities(node_row("any-0001", "any", board), "telemetry", p, RECEIVED)
        if not mapped and f"`{ch}`" not in section:
            unaccounted.append(f"{kind}.{ch}")
    assert not unaccounted, f"neither relayed nor listed under 'Not relayed' in docs/platform.md: {unaccounted}"


def test_listed_as_not_relayed_really_is_not_relayed():
    for ch in ("moving_cm", "static_cm", "accel_gal", "rain_mm", "rain_10min_mm"):
        assert f"`{ch}`" in not_relayed_section()
        p = telemetry("any-0001", {ch: agg(1.0, total=60.0)})
        assert entities(node_row("any-0001", "any", None), "telemetry", p, RECEIVED) == [], ch


def test_every_attribute_the_mapping_emits_is_documented():
    names = set()
    types = set()
    for row, kind, p in all_messages():
        for e in entities(row, kind, p, RECEIVED):
            types.add(e["type"])
            for name, a in e.items():
                if name in ("id", "type", "@context"):
                    continue
                names.add(name)
                names.update(k for k, v in a.items() if isinstance(v, dict) and v.get("type") == "Property")
    missing = sorted(n for n in names if f"`{n}`" not in DOC)
    assert not missing, f"attributes missing from docs/platform.md: {missing}"
    assert len(names) > 50
    for t in types:
        assert re.search(r"^### %s \(`urn:ngsi-ld:%s:iwaki:" % (t, t), DOC, re.M), f"no section for {t}"
    assert types == {"WeatherObserved", "AirQualityObserved", "CrowdFlowObserved", "EVChargingStation",
                     "ACMeasurement", "EVChargingSession", "FloodMonitoring", "DeviceMeasurement", "Alert", "Device"}
