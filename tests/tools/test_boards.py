"""tools.boards and the board-profile checker it shares with the node (node.config)."""
from __future__ import annotations

import ast
import copy
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tools import boards
from tools.boards import BoardError, compile_board, write_compact

from node import config  # on sys.path through tools.boards
from node.config import ConfigError, check_identity, check_profile, load_identity, load_profile, profile_hash

REPO = Path(__file__).resolve().parents[2]
README = REPO / "boards" / "README.md"
ENV = REPO / "boards" / "env-station.toml"
BASE = tomllib.loads(ENV.read_text(encoding="utf-8"))


def _fw_test_constants() -> dict:
    """GOOD and GOOD_HASH from the firmware test, so both runtimes hash the same dict."""
    tree = ast.parse((REPO / "tests" / "firmware" / "test_config.py").read_text(encoding="utf-8"))
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("GOOD", "GOOD_HASH", "IDENTITY"):
                out[node.targets[0].id] = ast.literal_eval(node.value)
    return out


# --- every board ---------------------------------------------------------

@pytest.mark.parametrize("path", boards.board_files(), ids=lambda p: p.name)
def test_every_board_compiles(path):
    d = compile_board(path)
    assert d["name"] == path.stem, "a board's name is its file name"
    assert re.fullmatch(r"[0-9a-f]{12}", profile_hash(d))


def test_env_station_is_what_the_brief_says():
    d = compile_board(ENV)
    assert d["chip"] == "esp32s3"
    assert d["i2c"]["main"] == {"id": 0, "sda": 8, "scl": 9, "freq_hz": 100_000}
    assert d["uart"]["pm"] == {"id": 1, "tx": 17, "rx": 18, "baud": 9600}
    assert [(s["kind"], s.get("address"), s["period_ms"]) for s in d["sensors"]] == [
        ("bme280", 0x76, 1000), ("scd4x", 0x62, 5000), ("pms5003", None, 1000)]
    assert d["report"]["window_s"] == 60 and d["report"]["health_s"] == 60
    assert d["report"]["max_silence_s"] == 300
    assert d["report"]["deadband"]["co2_ppm"] == 25 and d["report"]["deadband"]["temp_c"] == 0.2
    assert d["mqtt"]["keepalive_s"] == 60 and d["outbox"]["limit_bytes"] == 256 * 1024
    assert d["wdt"]["timeout_ms"] > 0


# --- refusals --------------------------------------------------------------

def _set(path, value):
    def mutate(d):
        *parents, last = path
        for k in parents:
            d = d[k]
        d[last] = value
    return mutate


def _del(path):
    def mutate(d):
        *parents, last = path
        for k in parents:
            d = d[k]
        del d[last]
    return mutate


def _esp32_scl(pin):
    def mutate(d):
        d["chip"] = "esp32"
        d["i2c"]["main"].update(sda=21, scl=pin)
        d["uart"]["pm"].update(tx=17, rx=16)
    return mutate


def _add_sensor(**s):
    return lambda d: d["sensors"].append(s)


def _drop_pms(d):
    d["sensors"].pop()
    d["uart"] = {}


BAD = [
    # (id, mutation, field, reason substring)
    ("strapping-pin", _set(["i2c", "main", "sda"], 0), "i2c.main.sda", "GPIO 0 is a strapping pin on esp32s3"),
    ("strapping-pin-46", _set(["uart", "pm", "rx"], 46), "uart.pm.rx", "strapping pin"),
    ("flash-pin", _set(["i2c", "main", "sda"], 26), "i2c.main.sda", "GPIO 26 is an SPI flash/PSRAM pin on esp32s3"),
    ("console-pin", _set(["uart", "pm", "tx"], 43), "uart.pm.tx", "REPL console pin"),
    ("no-such-gpio", _set(["uart", "pm", "tx"], 23), "uart.pm.tx", "GPIO 23 does not exist on esp32s3"),
    ("gpio-too-high", _set(["uart", "pm", "tx"], 49), "uart.pm.tx", "GPIO 49 does not exist"),
    ("input-only-scl", _esp32_scl(34), "i2c.main.scl", "GPIO 34 is input-only on esp32 and cannot drive SCL"),
    ("duplicate-pin", _set(["uart", "pm", "rx"], 9), "uart.pm.rx", "GPIO 9 is already used by i2c.main.scl"),
    ("uart0", _set(["uart", "pm", "id"], 0), "uart.pm.id", "UART0 is the REPL console"),
    ("uart-id", _set(["uart", "pm", "id"], 3), "uart.pm.id", "esp32s3 has UART1..2 only"),
    ("i2c-id-twice", lambda d: d["i2c"].update(aux={"sda": 10, "scl": 11}), "i2c.main.id",
     "I2C0 is already used by i2c.aux"),
    ("unknown-chip", _set(["chip"], "esp32s2"), "chip", "unknown chip 'esp32s2'"),
    ("unknown-kind", _set(["sensors", 0, "kind"], "bme680"), "sensors[0].kind", "unknown sensor kind 'bme680'"),
    ("unknown-top-key", _set(["reprot"], {}), "reprot", "unknown key"),
    ("unknown-sensor-key", _set(["sensors", 1, "perod_ms"], 5000), "sensors[1].perod_ms", "unknown key"),
    ("address-on-uart-sensor", _set(["sensors", 2, "address"], 0x40), "sensors[2].address", "unknown key"),
    ("not-7-bit", _set(["sensors", 1, "address"], 0x90), "sensors[1].address", "0x90 is not a 7-bit I2C address"),
    ("wrong-address", _set(["sensors", 0, "address"], 0x62), "sensors[0].address",
     "bme280 answers at 0x76 or 0x77, not 0x62"),
    ("duplicate-address", _add_sensor(kind="bme280", name="bme280-b", bus="i2c.main", address=0x76),
     "sensors[3].address", "0x76 on i2c.main is already used by sensors[0]"),
    ("duplicate-name", _add_sensor(kind="bme280", bus="i2c.main", address=0x77),
     "sensors[3].name", "'bme280' is already used by sensors[0]"),
    ("no-such-bus", _set(["sensors", 0, "bus"], "i2c.aux"), "sensors[0].bus", "no bus 'i2c.aux' is defined"),
    ("bus-without-type", _set(["sensors", 0, "bus"], "main"), "sensors[0].bus", "no bus 'main'"),
    ("wrong-bus-type", _set(["sensors", 0, "bus"], "uart.pm"), "sensors[0].bus", "bme280 needs a bus from [i2c], not uart.pm"),
    ("uart-shared", _add_sensor(kind="pms5003", name="pm-b", bus="uart.pm"), "sensors[3].bus",
     "uart.pm is already used by sensors[2]"),
    ("baud-mismatch", _set(["uart", "pm", "baud"], 115200), "sensors[2].bus", "pms5003 talks at 9600 baud"),
    ("period-too-short", _set(["sensors", 0, "period_ms"], 5), "sensors[0].period_ms", "out of range 10..3600000"),
    ("period-too-long", _set(["sensors", 0, "period_ms"], 3_600_001), "sensors[0].period_ms", "out of range"),
    ("scd4x-too-fast", _set(["sensors", 1, "period_ms"], 1000), "sensors[1].period_ms",
     "scd4x gives a new reading only every 5000 ms"),
    ("window-shorter-than-period", _set(["report", "window_s"], 4), "report.window_s",
     "shorter than the longest sensor period (sensors[1].period_ms = 5000 ms)"),
    ("window-not-multiple", _set(["report", "window_s"], 12), "report.window_s", "not a whole multiple"),
    ("silence-not-multiple", _set(["report", "max_silence_s"], 90), "report.max_silence_s",
     "not a whole multiple of report.window_s"),
    ("deadband-not-a-channel", _set(["report", "deadband", "co2"], 25), "report.deadband.co2",
     "'co2' is not a channel of the configured sensors"),
    ("deadband-of-absent-sensor", _drop_pms, "report.deadband.pm10_ugm3", "not a channel"),
    ("deadband-negative", _set(["report", "deadband", "temp_c"], -0.1), "report.deadband.temp_c", "negative"),
    ("deadband-string", _set(["report", "deadband", "temp_c"], "0.2"), "report.deadband.temp_c",
     "must be a number, not string"),
    ("missing-chip", _del(["chip"]), "chip", "missing (required)"),
    ("missing-kind", _del(["sensors", 0, "kind"]), "sensors[0].kind", "missing (required)"),
    ("missing-pin", _del(["i2c", "main", "scl"]), "i2c.main.scl", "missing (required)"),
    ("no-sensors", _set(["sensors"], []), "sensors", "at least one sensor"),
    ("wrong-type-int", _set(["sensors", 0, "period_ms"], "1000"), "sensors[0].period_ms",
     "must be an integer, not string"),
    ("wrong-type-bool", _set(["i2c", "main", "freq_hz"], True), "i2c.main.freq_hz", "must be an integer, not boolean"),
    ("wrong-type-float", _set(["wdt", "timeout_ms"], 30000.0), "wdt.timeout_ms", "must be an integer, not float"),
    ("wrong-type-table", _set(["report"], 60), "report", "must be a table, not integer"),
    ("sensors-not-array", _set(["sensors"], {"kind": "bme280"}), "sensors", "must be an array"),
    ("bad-name", _set(["name"], "Env Station"), "name", "is not a name"),
    ("schema-2", _set(["schema"], 2), "schema", "reads schema 1, not 2"),
    ("keepalive", _set(["mqtt", "keepalive_s"], 0), "mqtt.keepalive_s", "out of range 10..3600 s"),
    ("outbox-tiny", _set(["outbox", "limit_bytes"], 100), "outbox.limit_bytes", "out of range"),
    # the other sensor families: pins, ADC pins, the radio, options
    ("pins-strapping", _add_sensor(kind="beam_pair", pins={"a": 4, "b": 0}), "sensors[3].pins.b",
     "GPIO 0 is a strapping pin"),
    ("pins-missing", _add_sensor(kind="beam_pair", pins={"a": 4}), "sensors[3].pins.b", "missing (required)"),
    ("pins-unknown", _add_sensor(kind="rain_gauge", pins={"tip": 4, "bucket": 5}), "sensors[3].pins.bucket",
     "unknown key"),
    ("pin-used-twice", _add_sensor(kind="rain_gauge", pins={"tip": 8}), "sensors[3].pins.tip",
     "GPIO 8 is already used by i2c.main.sda"),
    ("adc2-pin", _add_sensor(kind="ct_clamp", pin=11, options={"amps_per_count": 0.01}), "sensors[3].pin",
     "GPIO 11 is not an ADC1 pin on esp32s3 (ADC2 cannot be read while Wi-Fi is on"),
    ("option-required", _add_sensor(kind="ct_clamp", pin=4), "sensors[3].options.amps_per_count",
     "missing (required)"),
    ("option-range", _add_sensor(kind="ct_clamp", pin=4, options={"amps_per_count": 0.01, "burst_hz": 1000}),
     "sensors[3].options.burst_hz", "out of range 2000..20000"),
    ("option-unknown", _add_sensor(kind="beam_pair", pins={"a": 4, "b": 5}, options={"debounse_ms": 3}),
     "sensors[3].options.debounse_ms", "unknown key"),
    ("option-choice", _add_sensor(kind="sdm_meter", bus="uart.pm", options={"model": "sdm220"}),
     "sensors[3].bus", "uart.pm is already used"),
    ("no-options", _set(["sensors", 0, "options"], {"x": 1}), "sensors[0].options", "bme280 takes no options"),
    ("two-radios", lambda d: d["sensors"].extend([{"kind": "ble_counter"}, {"kind": "ble_counter", "name": "b2"}]),
     "sensors[4].kind", "the radio is already used by sensors[3]"),
    ("stages-not-rising", _add_sensor(kind="level_4_20ma", pin=4, options={
        "range_m": 10, "stages": {"standby": 2.0, "caution": 3.0, "evacuation": 2.5, "danger": 4.0}}),
     "sensors[3].options.stages.evacuation", "2.5 m must be above caution (3.0 m)"),
    ("stages-missing", _add_sensor(kind="level_4_20ma", pin=4, options={
        "range_m": 10, "stages": {"standby": 2.0, "caution": 3.0, "evacuation": 3.5}}),
     "sensors[3].options.stages.danger", "missing (required)"),
    ("event-window-too-long", _set(["report", "event_window_s"], 120), "report.event_window_s",
     "out of range 1..60 s"),
]


def test_sdm_model_must_be_a_known_meter():
    d = copy.deepcopy(BASE)
    d["uart"]["rs485"] = {"id": 2, "tx": 40, "rx": 41, "baud": 9600}
    d["sensors"].append({"kind": "sdm_meter", "bus": "uart.rs485", "options": {"model": "sdm220"}})
    with pytest.raises(ConfigError) as info:
        check_profile(d)
    assert str(info.value) == "sensors[3].options.model: 'sdm220' is not one of: sdm120, sdm630"
    d["sensors"][-1]["options"]["model"] = "sdm630"
    out = check_profile(d)["sensors"][-1]
    assert out["options"] == {"model": "sdm630", "address": 1, "timeout_ms": 200}


@pytest.mark.parametrize("mutate,field,reason", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_profile_is_refused(mutate, field, reason):
    d = copy.deepcopy(BASE)
    mutate(d)
    with pytest.raises(ConfigError) as info:
        check_profile(d)
    e = info.value
    assert (e.field, reason in e.reason) == (field, True), str(e)
    assert str(e) == f"{field}: {e.reason}"


def test_bad_profile_from_a_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(ENV.read_text(encoding="utf-8").replace("address = 0x62", "address = 0x90"), encoding="utf-8")
    with pytest.raises(BoardError) as info:
        compile_board(bad)
    assert str(info.value) == f"{bad}: sensors[1].address: 0x90 is not a 7-bit I2C address"
    assert (info.value.field, info.value.path) == ("sensors[1].address", str(bad))


def test_unreadable_files_are_board_errors(tmp_path):
    with pytest.raises(BoardError, match="file not found"):
        compile_board(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("chip = \n")
    with pytest.raises(BoardError, match=r"not valid TOML: .*line 1"):
        compile_board(broken)


def test_checked_profile_is_a_fixed_point_and_input_is_untouched():
    d = copy.deepcopy(BASE)
    out = check_profile(d)
    assert d == BASE
    assert check_profile(out) == out


# --- compact JSON and the config hash --------------------------------------

def test_compact_json_round_trips_through_load_profile(tmp_path):
    d = compile_board(ENV)
    out = tmp_path / "board.json"
    size = write_compact(d, out)
    text = out.read_text(encoding="utf-8")
    assert size == len(text.encode()) and " " not in text.replace(d["description"], "")
    assert json.loads(text) == d
    assert load_profile(str(out)) == d
    assert profile_hash(load_profile(str(out))) == profile_hash(d)


def test_load_profile_refuses_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_profile(str(tmp_path / "none.json"))
    assert info.value.reason == "file not found"
    (tmp_path / "b.json").write_text('{"chip": ')
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_profile(str(tmp_path / "b.json"))


def test_profile_hash_is_stable_and_tracks_changes():
    d = compile_board(ENV)
    h = profile_hash(d)
    reordered = json.loads(json.dumps(d, sort_keys=True))
    reordered = dict(reversed(list(reordered.items())))
    assert profile_hash(reordered) == h
    assert profile_hash(compile_board(ENV)) == h
    changed = copy.deepcopy(d)
    changed["report"]["deadband"]["co2_ppm"] = 30
    assert profile_hash(changed) != h
    changed = copy.deepcopy(d)
    changed["sensors"][0]["period_ms"] = 2000
    assert profile_hash(changed) != h


def test_profile_hash_is_sha256_of_canonical_json():
    import hashlib
    d = {"b": [1, True, None, "x\"y"], "a": {"z": 0.5, "y": "いわき"}}
    canonical = json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert profile_hash(d) == hashlib.sha256(canonical.encode()).hexdigest()[:12]


def test_profile_hash_matches_the_micropython_value():
    fw = _fw_test_constants()
    assert profile_hash(check_profile(fw["GOOD"])) == fw["GOOD_HASH"]


# --- identity ---------------------------------------------------------------

def test_identity_defaults_and_refusals(tmp_path):
    ident = _fw_test_constants()["IDENTITY"]
    d = check_identity(copy.deepcopy(ident))
    assert d == {"node": "env-0001", "root": "iwaki", "broker": {"host": "10.0.0.5", "port": 1883},
                 "user": "env-0001", "password": "", "tls": False}
    p = tmp_path / "identity.json"
    p.write_text(json.dumps(ident))
    assert load_identity(str(p)) == d
    cases = [
        ({"node": "x"}, "node", "is not a node id"),
        ({"node": "a" * 33}, "node", "is not a node id"),
        ({"node": "env.1"}, "node", "is not a node id"),
        ({"root": "iwaki//x"}, "root", "not an MQTT topic root"),
        ({"root": "$SYS"}, "root", "not an MQTT topic root"),
        ({"broker": {"host": "h", "port": 0}}, "broker.port", "out of range 1..65535"),
        ({"broker": {"host": "h", "prot": 1883}}, "broker.prot", "unknown key"),
        ({"broker": {"host": ""}}, "broker.host", "is not a host name"),
        ({"user": ""}, "user", "must not be empty"),
        ({"tls": "yes"}, "tls", "must be true or false, not string"),
        ({"secret": "x"}, "secret", "unknown key"),
    ]
    for change, field, reason in cases:
        bad = dict(copy.deepcopy(ident), **change)
        with pytest.raises(ConfigError) as info:
            check_identity(bad)
        assert info.value.field == field and reason in info.value.reason, str(info.value)
    for missing in ("node", "broker", "user", "password"):
        bad = {k: v for k, v in ident.items() if k != missing}
        with pytest.raises(ConfigError, match=f"^{missing}: missing"):
            check_identity(bad)


# --- the CLI ----------------------------------------------------------------

def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "tools.boards", *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=60)


def test_cli_check_all_boards():
    proc = _cli("check")
    assert proc.returncode == 0, proc.stderr
    assert f"boards/env-station.toml: ok (config hash {profile_hash(compile_board(ENV))})" in proc.stdout


def test_cli_bad_profile_exits_1_with_prog_message(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(ENV.read_text(encoding="utf-8").replace("sda = 8", "sda = 26"), encoding="utf-8")
    proc = _cli("check", bad, ENV)
    assert proc.returncode == 1
    assert proc.stderr == f"tools.boards: {bad}: i2c.main.sda: GPIO 26 is an SPI flash/PSRAM pin on esp32s3\n"
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "env-station.toml: ok" in proc.stdout  # the other files are still checked
    proc = _cli("compile", bad, "-o", tmp_path / "out.json")
    assert proc.returncode == 1 and proc.stderr.startswith("tools.boards: ") and "Traceback" not in proc.stderr
    assert not (tmp_path / "out.json").exists()
    proc = _cli("compile", tmp_path / "missing.toml")
    assert (proc.returncode, proc.stderr) == (1, f"tools.boards: {tmp_path / 'missing.toml'}: file not found\n")


def test_cli_compile_writes_compact_json(tmp_path):
    out = tmp_path / "out.json"
    proc = _cli("compile", ENV, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert load_profile(str(out)) == compile_board(ENV)
    assert out.read_text(encoding="utf-8") == boards.compact_json(compile_board(ENV))
    proc = _cli("compile", ENV)
    assert json.loads(proc.stdout) == compile_board(ENV)


def test_cli_main_is_callable():
    assert boards.main(["check", str(ENV)]) == 0


# --- docs --------------------------------------------------------------------

def test_readme_documents_every_field_chip_and_kind():
    text = README.read_text(encoding="utf-8")
    missing = [f"`{k}`" for keys in config.KEYS.values() for k in keys if f"`{k}`" not in text]
    missing += [f"`{c}`" for c in list(config.CHIPS) + list(config.KINDS) if f"`{c}`" not in text]
    missing += [f"`{ch}`" for chs in config.CHANNELS.values() for ch in chs if f"`{ch}`" not in text]
    assert not missing, f"boards/README.md does not document: {', '.join(sorted(set(missing)))}"
    for cmd in boards.COMMANDS:
        assert f"python -m tools.boards {cmd}" in text, f"boards/README.md does not show `{cmd}`"
