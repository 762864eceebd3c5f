# Runs in the MicroPython VM: the board-profile and identity checker as the
# node runs it. tests/tools/test_boards.py reads GOOD and GOOD_HASH from this
# file (ast) and checks CPython gives the same hash.
import json

from node.config import (CHANNELS, KINDS, ConfigError, check_identity, check_profile,
                         load_identity, load_profile, profile_hash)

GOOD = {
    "name": "test-bench",
    "description": "いわき bench board \"A\"",
    "chip": "esp32",
    "i2c": {"main": {"sda": 21, "scl": 22, "freq_hz": 400000}},
    "uart": {"pm": {"id": 2, "tx": 17, "rx": 16, "baud": 9600}},
    "sensors": [
        {"kind": "bme280", "bus": "i2c.main", "address": 0x77, "period_ms": 2000},
        {"kind": "scd4x", "bus": "i2c.main"},
        {"kind": "pms5003", "bus": "uart.pm", "name": "dust"},
    ],
    "report": {"window_s": 30, "deadband": {"temp_c": 0.2, "co2_ppm": 25, "pm25_ugm3": 1.5}},
}
# profile_hash(check_profile(GOOD)) as computed by CPython
GOOD_HASH = "08cf8c303646"

IDENTITY = {"node": "env-0001", "broker": {"host": "10.0.0.5"}, "user": "env-0001", "password": ""}


def good():
    return json.loads(json.dumps(GOOD))


def refused(d, field, reason, check=check_profile):
    try:
        check(d)
    except ConfigError as e:
        assert e.field == field, str(e)
        assert reason in e.reason, str(e)
        assert str(e) == field + ": " + e.reason
        return e
    raise AssertionError("accepted, expected %s: %s" % (field, reason))


def test_good_profile_is_accepted_with_defaults():
    d = check_profile(good())
    assert d["schema"] == 1 and d["chip"] == "esp32"
    assert d["i2c"]["main"] == {"id": 0, "sda": 21, "scl": 22, "freq_hz": 400000}
    s = d["sensors"]
    assert [x["name"] for x in s] == ["bme280", "scd4x", "dust"]
    assert s[1]["address"] == 0x62 and s[1]["period_ms"] == 5000
    assert s[2]["period_ms"] == 1000 and "address" not in s[2]
    assert d["report"]["health_s"] == 60 and d["report"]["max_silence_s"] == 300
    assert d["mqtt"] == {"keepalive_s": 60}
    assert d["outbox"] == {"limit_bytes": 262144}
    assert d["wdt"] == {"timeout_ms": 30000}
    assert check_profile(d) == d  # a checked profile checks again unchanged


def test_channels_table_covers_every_kind():
    assert sorted(CHANNELS) == sorted(KINDS)
    assert CHANNELS["scd4x"] == ("co2_ppm", "temp_c", "rh_pct")


def test_pin_rules():
    d = good()
    d["i2c"]["main"]["sda"] = 0
    refused(d, "i2c.main.sda", "GPIO 0 is a strapping pin on esp32")
    d = good()
    d["i2c"]["main"]["scl"] = 7
    refused(d, "i2c.main.scl", "GPIO 7 is an SPI flash/PSRAM pin on esp32")
    d = good()
    d["i2c"]["main"]["scl"] = 35
    refused(d, "i2c.main.scl", "input-only on esp32 and cannot drive SCL")
    d = good()
    d["uart"]["pm"]["rx"] = 35  # an input is fine for RX
    check_profile(d)
    d["uart"]["pm"]["tx"] = 21
    refused(d, "uart.pm.tx", "GPIO 21 is already used by i2c.main.sda")


def test_sensor_rules():
    d = good()
    d["sensors"][1]["address"] = 0x90
    e = refused(d, "sensors[1].address", "")
    assert str(e) == "sensors[1].address: 0x90 is not a 7-bit I2C address"
    d = good()
    d["sensors"][1]["kind"] = "bme680"
    refused(d, "sensors[1].kind", "unknown sensor kind 'bme680'")
    d = good()
    d["sensors"][1] = {"kind": "bme280", "name": "bme-b", "bus": "i2c.main", "address": 0x77}
    refused(d, "sensors[1].address", "0x77 on i2c.main is already used by sensors[0]")
    d = good()
    d["sensors"][0]["bus"] = "i2c.aux"
    refused(d, "sensors[0].bus", "no bus 'i2c.aux'")
    d = good()
    d["sensors"][0]["period_ms"] = 5
    refused(d, "sensors[0].period_ms", "out of range 10..3600000")


def test_report_and_keys():
    d = good()
    d["report"]["deadband"]["pm25"] = 1
    refused(d, "report.deadband.pm25", "not a channel of the configured sensors")
    d = good()
    d["report"]["window_s"] = 4
    refused(d, "report.window_s", "shorter than the longest sensor period")
    d = good()
    d["sensor"] = []
    refused(d, "sensor", "unknown key")
    d = good()
    del d["chip"]
    refused(d, "chip", "missing")
    d = good()
    d["sensors"][0]["period_ms"] = "2000"
    refused(d, "sensors[0].period_ms", "must be an integer, not string")
    d = good()
    d["i2c"]["main"]["freq_hz"] = True
    refused(d, "i2c.main.freq_hz", "must be an integer, not boolean")


def test_identity():
    d = check_identity(json.loads(json.dumps(IDENTITY)))
    assert d["root"] == "iwaki" and d["tls"] is False and d["broker"]["port"] == 1883
    d = json.loads(json.dumps(IDENTITY))
    d["tls"] = True
    assert check_identity(d)["broker"]["port"] == 8883
    for node in ("Env-1", "-env", "e", "a" * 33, "env_1"):
        d = json.loads(json.dumps(IDENTITY))
        d["node"] = node
        refused(d, "node", "is not a node id", check_identity)
    d = json.loads(json.dumps(IDENTITY))
    d["broker"]["port"] = 70000
    refused(d, "broker.port", "out of range 1..65535", check_identity)
    d = json.loads(json.dumps(IDENTITY))
    d["root"] = "iwaki/#"
    refused(d, "root", "not an MQTT topic root", check_identity)


def test_load_profile_missing_and_broken():
    try:
        load_profile("/flash/no-such-board.json")
    except ConfigError as e:
        assert str(e) == "/flash/no-such-board.json: file not found", str(e)
    else:
        raise AssertionError("a missing file was accepted")
    with open("/flash/broken.json", "w") as f:
        f.write('{"name": "x1", "chip": ')
    try:
        load_profile("/flash/broken.json")
    except ConfigError as e:
        assert str(e) == "/flash/broken.json: not valid JSON", str(e)
    else:
        raise AssertionError("broken JSON was accepted")
    with open("/flash/id.json", "w") as f:
        f.write("[1, 2]")
    refused("/flash/id.json", "identity", "must be a table", load_identity)


def test_load_profile_reads_compact_json():
    with open("/flash/board.json", "w") as f:
        f.write(json.dumps(check_profile(good())))
    d = load_profile("/flash/board.json")
    assert d == check_profile(good())
    assert profile_hash(d) == GOOD_HASH


def test_profile_hash_matches_cpython():
    d = check_profile(good())
    assert profile_hash(d) == GOOD_HASH, profile_hash(d)
    assert len(GOOD_HASH) == 12
    d["report"]["deadband"]["temp_c"] = 0.3
    assert profile_hash(d) != GOOD_HASH
