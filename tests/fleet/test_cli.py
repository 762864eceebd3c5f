"""`python -m fleet`: the command table, `nodes`, `serve`, settings and error handling."""
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fleet import cli
from fleet.mosquitto import free_port
from fleet.registry import Registry, RegistryError
from fleet.settings import Settings, SettingsError, get_settings
from tests.fleet import payloads as P

REPO = Path(__file__).resolve().parents[2]
NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)


def fleet(*args, env=None, timeout=20):
    """Run `python -m fleet ARGS` as a user would."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("IWAKI_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "fleet", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def no_traceback(proc):
    assert "Traceback" not in proc.stderr, proc.stderr


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "fleet.db"
    with Registry(path) as r:
        r.ingest(P.NODE, "birth", P.birth(boot=2), NOW - timedelta(seconds=30))
        r.ingest(P.NODE, "telemetry", P.telemetry(boot=2, seq=0), NOW - timedelta(seconds=30))
        r.ingest(P.NODE, "telemetry", P.telemetry(boot=2, seq=3), NOW - timedelta(seconds=12))
        r.ingest(P.NODE, "telemetry", P.telemetry(boot=2, seq=3), NOW - timedelta(seconds=12))
        r.ingest("env-0002", "state", P.state(node="env-0002", value="offline", reason="lost"), NOW, retained=True)
    return path


# -- nodes --

def test_nodes_prints_a_table_of_the_stored_nodes(db):
    proc = fleet("nodes", "--db", str(db))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["NODE", "STATE", "LAST", "SEEN", "FW", "BOARD", "BOOT", "SEQ", "GAPS", "DUPS"]
    assert lines[1].split()[:2] == ["env-0001", "online"] and lines[1].split()[-5:] == ["env-station", "2", "3",
                                                                                         "2", "1"]
    assert lines[2].split() == ["env-0002", "offline", "never", "-", "-", "1", "-", "0", "0"]
    # columns line up: every row has each column at the header's offset
    for header in ("STATE", "FW", "BOARD"):
        col = lines[0].index(header)
        assert all(line[col - 2:col] == "  " for line in lines[1:])


def test_nodes_table_shows_ages_and_keeps_its_widths(db):
    with Registry(db) as r:
        rows = r.nodes()
    table = cli.nodes_table(rows, now=NOW).splitlines()
    assert "12s ago" in table[1] and "never" in table[2]
    later = cli.nodes_table(rows, now=NOW + timedelta(hours=3)).splitlines()
    assert "3h ago" in later[1]
    assert [len(line) for line in later[:1]] == [len(line) for line in table[:1]]
    assert cli.nodes_table([], now=NOW).splitlines()[1] == "(no nodes)"


@pytest.mark.parametrize("seconds, text", [(0, "0s ago"), (59, "59s ago"), (60, "1m ago"), (3599, "59m ago"),
                                           (7200, "2h ago"), (3 * 86400 + 5, "3d ago")])
def test_age(seconds, text):
    assert cli.age((NOW - timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.000Z"), NOW) == text


def test_nodes_json_is_a_list_of_node_records(db):
    proc = fleet("nodes", "--db", str(db), "--json")
    assert proc.returncode == 0, proc.stderr
    nodes = json.loads(proc.stdout)
    assert [n["id"] for n in nodes] == ["env-0001", "env-0002"]
    assert {k: nodes[0][k] for k in ("state", "fw", "boot", "last_seq", "gaps", "duplicates")} == \
        {"state": "online", "fw": "0.1.0", "boot": 2, "last_seq": 3, "gaps": 2, "duplicates": 1}


def test_nodes_reads_the_database_named_by_the_environment(db):
    proc = fleet("nodes", "--json", env={"IWAKI_DB": str(db)})
    assert proc.returncode == 0 and len(json.loads(proc.stdout)) == 2


def test_nodes_without_a_registry_says_so(tmp_path):
    proc = fleet("nodes", "--db", str(tmp_path / "nope.db"))
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"fleet: no registry at {tmp_path / 'nope.db'}")
    no_traceback(proc)
    assert not (tmp_path / "nope.db").exists()


# -- serve --

def test_serve_with_an_unreachable_broker_fails_with_a_clear_message(tmp_path):
    port = free_port()
    proc = fleet("serve", "--db", str(tmp_path / "fleet.db"), "--port", str(port))
    assert proc.returncode == 1
    no_traceback(proc)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"fleet: cannot reach the MQTT broker at 127.0.0.1:{port}: ")
    assert "--host/--port" in last


def test_serve_with_an_unwritable_database_fails_with_a_clear_message(tmp_path):
    (tmp_path / "afile").write_text("")
    proc = fleet("serve", "--db", str(tmp_path / "afile" / "fleet.db"), "--port", str(free_port()))
    assert proc.returncode == 1
    no_traceback(proc)
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"fleet: cannot open the registry at {tmp_path / 'afile' / 'fleet.db'}: ")


def test_bad_settings_in_the_environment_are_a_usage_error(tmp_path):
    proc = fleet("serve", "--db", str(tmp_path / "f.db"), env={"IWAKI_MQTT_PORT": "eighteen"})
    assert proc.returncode == 2
    assert proc.stderr.strip() == "fleet: IWAKI_MQTT_PORT='eighteen' is not a valid int"
    proc = fleet("serve", "--db", str(tmp_path / "f.db"), "--root", "iwaki/#")
    assert proc.returncode == 2 and "topic root 'iwaki/#'" in proc.stderr
    no_traceback(proc)


@pytest.mark.broker
def test_serve_stores_what_nodes_publish_and_stops_cleanly_on_sigterm(tmp_path, broker):
    db = tmp_path / "fleet.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("IWAKI_")}
    proc = subprocess.Popen([sys.executable, "-m", "fleet", "serve", "--db", str(db), "--port", str(broker.port),
                             "--report-every", "0.2"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="cli-node")
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        # the fleet may not have subscribed yet: a retained birth reaches it anyway
        pub.publish(P.topic("birth"), P.encode(P.birth()), qos=1, retain=True).wait_for_publish(5)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not stats(db).get("nodes"):
            time.sleep(0.1)
        pub.publish(P.topic("telemetry"), P.encode(P.telemetry()), qos=1).wait_for_publish(5)
        while time.monotonic() < deadline and not stats(db).get("telemetry_stored"):
            time.sleep(0.1)
        pub.disconnect()
        pub.loop_stop()
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    assert "received 2, stored 2, duplicates 0, invalid 0, errors 0" in err
    with Registry(db) as r:
        assert r.node(P.NODE)["fw"] == "0.1.0" and r.stats()["telemetry_stored"] == 1


def stats(db) -> dict:
    try:
        with Registry(db, create=False) as r:
            return r.stats()
    except RegistryError:   # not there yet, or the server is still creating it
        return {}


# -- the command table --

def test_help_lists_every_command():
    proc = fleet("--help")
    assert proc.returncode == 0
    for name in ("serve", "nodes", "demo"):
        assert name in proc.stdout


def test_no_or_unknown_command_is_a_usage_error():
    assert fleet().returncode == 2
    proc = fleet("fly")
    assert proc.returncode == 2 and "invalid choice: 'fly'" in proc.stderr


def test_a_command_whose_module_is_missing_says_it_is_not_available(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "demo", ("fleet._no_such_demo", "add_arguments", "run", "demo"))
    assert cli.main(["demo", "--nodes", "3"]) == 1
    assert capsys.readouterr().err == "fleet: demo is not available\n"


def test_demo_is_registered_as_a_lazily_imported_module():
    module, add, run, _ = cli.COMMANDS["demo"]
    assert (module, add, run) == ("fleet.demo", "add_arguments", "run")
    proc = subprocess.run([sys.executable, "-c", "import sys, fleet.cli; sys.exit('fleet.demo' in sys.modules)"],
                          cwd=REPO)
    assert proc.returncode == 0


# -- settings --

def test_settings_come_from_the_environment_and_flags_override_them(monkeypatch):
    env = {"IWAKI_DB": "/data/fleet.db", "IWAKI_MQTT_HOST": "broker.local", "IWAKI_MQTT_PORT": "8883",
           "IWAKI_MQTT_USER": "fleet", "IWAKI_MQTT_PASSWORD": "s3cret", "IWAKI_ROOT": "city/iwaki",
           "IWAKI_OFFLINE_AFTER_S": "90", "IWAKI_MAX_PAYLOAD": "4096"}
    s = Settings.from_env(env)
    assert s == Settings(db="/data/fleet.db", mqtt_host="broker.local", mqtt_port=8883, mqtt_user="fleet",
                         mqtt_password="s3cret", root="city/iwaki", offline_after_s=90.0, max_payload=4096)
    assert s.override(mqtt_port=1883, db=None).mqtt_port == 1883 and s.override(db=None).db == "/data/fleet.db"
    assert Settings.from_env({}) == Settings()
    for k in list(os.environ):
        if k.startswith("IWAKI_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("IWAKI_ROOT", "test-root")
    get_settings.cache_clear()
    try:
        assert get_settings().root == "test-root" and get_settings() is get_settings()
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize("env, message", [
    ({"IWAKI_MQTT_PORT": "70000"}, "MQTT port 70000"),
    ({"IWAKI_OFFLINE_AFTER_S": "0"}, "offline_after_s must be positive"),
    ({"IWAKI_ROOT": "/iwaki"}, "topic root '/iwaki'"),
    ({"IWAKI_MAX_PAYLOAD": "big"}, "IWAKI_MAX_PAYLOAD='big' is not a valid int"),
])
def test_bad_settings_are_refused_with_the_reason(env, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_env(env)


@pytest.mark.parametrize("command, things", [(["alerts"], "alerts"), (["tokens", "list"], "tokens"),
                                             (["release", "list"], "releases"), (["rollout", "list"], "rollouts")])
def test_list_commands_on_an_empty_registry_say_so_or_print_an_empty_json_list(tmp_path, capsys, command, things):
    db = str(tmp_path / "fleet.db")
    Registry(db).close()
    assert cli.main([*command, "--db", db]) == 0
    assert capsys.readouterr().out == f"(no {things})\n"
    assert cli.main([*command, "--json", "--db", db]) == 0
    assert json.loads(capsys.readouterr().out) == []
