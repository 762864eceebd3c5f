"""tools.provision against the real fleet (registry, API on loopback, ingest and a real mosquitto) and
the virtual board running the real firmware: done when the birth is heard; an unplugged board
resumes; re-provisioning keeps the identity; and every refusal says what to do."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from fleet import credentials as C
from fleet import keys as K
from fleet import releases as R
from fleet import tokens as T
from fleet.api import create_app
from fleet.registry import Registry
from fleet.server import ApiServer
from fleet.settings import Settings
from hil_tests.rig import LocalFleet, VirtualBoard, vboard_unavailable
from tools import provision as P
from tools.boards import compile_board, profile_hash

REPO = Path(__file__).resolve().parents[2]
BOARD = REPO / "boards" / "env-station.toml"


@pytest.fixture
def api(tmp_path, monkeypatch):
    """The fleet's API on a free loopback port over a fresh registry, with a token per role."""
    monkeypatch.setenv("IWAKI_KEYS_DIR", str(tmp_path / "keys"))
    db = tmp_path / "fleet.db"
    with Registry(db) as reg:
        toks = {r: T.issue(reg, f"{r}-1", r, "setup") for r in T.ROLES}
        T.issue(reg, "gone", "technician", "setup")
        T.revoke(reg, "gone", "setup")
    settings = Settings(db=str(db), mqtt_port=1883, node_broker_host="127.0.0.1")
    server = ApiServer(create_app(settings, dashboard=None)).start()
    yield SimpleNamespace(url=server.url, tokens=toks, db=db, settings=settings, tmp=tmp_path)
    server.stop()


def provision(api, port="/dev/ttyUSB-nonexistent", token=None, **kw):
    kw.setdefault("progress_dir", api.tmp / "progress")
    kw.setdefault("say", lambda m: None)
    return P.provision(port, kw.pop("board", BOARD), kw.pop("site", "taira-3"), kw.pop("fleet", api.url),
                       token or api.tokens["technician"], **kw)


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "tools.provision", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=60, env={**os.environ, **(env or {})})


# -- refusals before anything is written ------------------------------------------

def test_the_fleet_unreachable_a_bad_token_and_a_role_that_may_not_provision(api):
    with pytest.raises(P.ProvisionError, match="the fleet at http://127.0.0.1:9 is unreachable"):
        provision(api, fleet="http://127.0.0.1:9")
    with pytest.raises(P.ProvisionError, match="the fleet refused the token: this token is unknown or revoked"):
        provision(api, token="iwk_" + "x" * 43)
    # a viewer may read the fleet but not provision: found before the board is touched (no port here)
    for role in ("viewer", "operator"):
        with pytest.raises(P.ProvisionError, match="may not provision boards: this needs the role admin or "
                                                   f"technician; the token '{role}-1' has the role {role}"):
            provision(api, token=api.tokens[role])
    with Registry(api.db) as reg:  # and the probe issued nothing
        assert not list(reg.db["credentials"].rows) and not list(reg.db["audit"].rows_where("action = 'node.provision'"))
    with pytest.raises(P.ProvisionError, match="not a URL"):
        provision(api, fleet="fleet.iwaki.local")


def test_the_command_line_prints_one_line_and_no_traceback(api, tmp_path):
    res = run_cli("--port", "/dev/ttyUSB-nonexistent", "--board", str(BOARD), "--site", "x", "--fleet", api.url,
                  "--token", api.tokens["technician"], "--progress-dir", str(tmp_path))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.splitlines()[-1] == ("tools.provision: port /dev/ttyUSB-nonexistent: no such device; is the "
                                           "board plugged in? (`ls /dev/ttyUSB* /dev/ttyACM*` lists the serial ports)")
    res = run_cli("--port", "/dev/null", "--board", str(BOARD), "--site", "x", "--fleet", api.url, "--token", "",
                  env={"IWAKI_TOKEN": ""})
    assert res.returncode == 1 and "no token: pass --token (or set IWAKI_TOKEN)" in res.stderr


def test_a_bad_profile_or_contradicting_options_are_refused(api, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(BOARD.read_text().replace("sda = 8", "sda = 0"))
    with pytest.raises(P.ProvisionError, match=r"board profile .*bad.toml: i2c.main.sda: GPIO 0 is a strapping pin"):
        provision(api, board=bad)
    with pytest.raises(P.ProvisionError, match="contradict"):
        provision(api, replace=True, keep_identity=True)
    with pytest.raises(P.ProvisionError, match="--release 'newest'"):
        P._firmware(None, "env-station", "esp32s3", "newest", False, [], lambda m: None)


def test_the_local_tree_is_compiled_for_the_chip_and_boot_and_main_stay_source():
    files = P.tree_bundle("esp32s3")
    assert {"/boot.py", "/main.py", "/node/app.mpy", "/node/config.mpy", "/node/sensors/bme280.mpy"} <= set(files)
    assert not any(p.startswith("/sim") or p.endswith(".py") and p not in ("/boot.py", "/main.py") for p in files)
    assert files["/node/app.mpy"][:1] == b"M"  # an .mpy header
    sources = P.tree_bundle("esp32s3", source_only=True)
    assert "/node/app.py" in sources and "/sim/machine.py" not in sources


def test_a_release_from_the_fleet_is_checked_against_its_signed_manifest(api, monkeypatch):
    monkeypatch.setenv("IWAKI_RELEASES_DIR", str(api.tmp / "releases"))
    key = K.create(api.tmp / "keys")["public"]
    fleet = P.Fleet(api.url, api.tokens["technician"])
    assert P.release_bundle(fleet, "env-station", "latest", [key]) is None  # none yet: the tree is used
    with Registry(api.db) as reg:
        R.build("2.0.0", ["people-gate"], registry=reg, actor="test")
        R.build("1.1.0", ["env-station"], registry=reg, actor="test")
    version, files = P.release_bundle(fleet, "env-station", "latest", [key])
    assert version == "1.1.0" and {"/main.py", "/boot.py", "/node/_version.mpy", "/node/app.mpy"} <= set(files)
    with pytest.raises(P.ProvisionError, match="release 2.0.0 is for people-gate, not env-station"):
        P.release_bundle(fleet, "env-station", "2.0.0", [key])
    with pytest.raises(P.ProvisionError, match="not by the fleet's OTA key; do not install it"):
        P.release_bundle(fleet, "env-station", "1.1.0", ["ab" * 32])
    (api.tmp / "releases" / "1.1.0" / "files" / "main.py").write_text("print('tampered')\n")
    with pytest.raises(P.ProvisionError, match="main.py does not match its manifest"):
        P.release_bundle(fleet, "env-station", "1.1.0", [key])
    with pytest.raises(P.ProvisionError, match="the fleet has no release 9.9.9"):
        P.release_bundle(fleet, "env-station", "9.9.9", [key])
    fleet.close()


def test_an_identity_from_the_fleet_is_checked_as_the_node_checks_it(api):
    fleet = P.Fleet(api.url, api.tokens["technician"])
    answer = fleet.json("POST", "/api/v1/provision", json={"board": "env-station", "site": "x"})
    fleet.close()
    ident = P.identity_from(answer, {"ssid": "iwaki-field", "password": "pw"})
    assert ident["node"] == "env-0001" and ident["broker"] == {"host": "127.0.0.1", "port": 1883}
    assert "ota_keys" not in ident and ident["fleet_url"] == api.url and ident["wifi"]["ssid"] == "iwaki-field"
    with pytest.raises(P.ProvisionError, match="broker.host"):
        P.identity_from(answer | {"broker": {"host": "", "port": 1883}}, None)


def test_the_progress_file_is_private_and_goes_away(tmp_path):
    prog = P.Progress(tmp_path / "p", "/dev/ttyUSB0")  # a board without a unique id: by port
    prog.save({"identity": {"node": "env-0001", "password": "secret"}})
    assert prog.path.name == "dev_ttyUSB0.json" and oct(prog.path.stat().st_mode & 0o777) == "0o600"
    assert prog.load()["identity"]["password"] == "secret"
    prog.clear()
    assert prog.load() is None and not prog.path.exists()


def test_waiting_for_a_birth_that_never_comes_says_what_to_check(api):
    fleet = P.Fleet(api.url, api.tokens["technician"])
    with pytest.raises(P.ProvisionError, match=r"no birth from env-0099 within 1 s \(the fleet has never heard it\)"
                                               r".*tools.monitor.*Wi-Fi.*broker 127.0.0.1:1883"):
        P.wait_for_birth(fleet, "env-0099", "2000-01-01T00:00:00.000Z", 1, 0.2,
                         {"broker": {"host": "127.0.0.1", "port": 1883}})
    fleet.close()


# -- against the virtual board and a real fleet -------------------------------------

def mpremote(port: str, *args: str) -> str:
    """The real mpremote command line against the board."""
    res = subprocess.run([sys.executable, "-m", "mpremote", "connect", port, *args], capture_output=True,
                         text=True, timeout=60, cwd=REPO)
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.fixture
def rig(tmp_path, monkeypatch):
    """A private fleet whose broker checks passwords (the API rewrites its accounts and reloads it),
    the fleet's OTA key, and a virtual env-station running what provisioning writes."""
    why = vboard_unavailable()
    if why:
        pytest.skip(why)
    monkeypatch.setenv("IWAKI_KEYS_DIR", str(tmp_path / "keys"))
    monkeypatch.setenv("IWAKI_RELEASES_DIR", str(tmp_path / "releases"))
    key = K.create(tmp_path / "keys")["public"]
    with LocalFleet(tmp_path / "fleet") as fleet, VirtualBoard(BOARD, tmp_path / "vb") as vb:
        said: list[str] = []
        yield SimpleNamespace(fleet=fleet, vb=vb, key=key, said=said, progress=tmp_path / "progress",
                              run=lambda **kw: P.provision(
                                  kw.pop("port", vb.port), BOARD, "taira-3", fleet.url, fleet.token,
                                  progress_dir=tmp_path / "progress", release=kw.pop("release", "tree"),
                                  wait=60, say=kw.pop("say", said.append), **kw))


@pytest.mark.slow
@pytest.mark.vm
@pytest.mark.broker
def test_provisioning_ends_when_the_fleet_hears_the_node_and_again_keeps_its_identity(rig):
    with rig.fleet.registry() as reg:  # the fleet's newest release for the board is what goes on it
        R.build("1.4.0", ["env-station", "people-gate"], registry=reg, actor="test")
        R.build("1.3.0", ["env-station"], registry=reg, actor="test")
    first = rig.run(release="latest")
    node = rig.fleet.node("env-0001")
    assert first["node"] == "env-0001" and node["state"] == "online" and node["board"] == "env-station"
    assert first["birth_at"] == node["last_seen"] >= first["started_at"]
    assert first["config_hash"] == node["config_hash"] == profile_hash(compile_board(BOARD))
    assert first["fw"] == node["fw"] == "1.4.0" and first["firmware"] == "release 1.4.0"
    assert first["kept_identity"] is False and first["ota_keys"] == 1
    assert first["files_written"] == first["files_skipped"] + first["files_written"] > 20
    assert "provisioned env-0001: board env-station (esp32s3), site taira-3" in P.work_log(first)
    # what is on the board, read back with the real mpremote
    ident = json.loads(mpremote(rig.vb.port, "cat", ":identity.json"))
    assert ident["node"] == ident["user"] == "env-0001" and ident["ota_keys"] == [rig.key]
    assert ident["broker"] == {"host": "127.0.0.1", "port": rig.fleet.broker.port}
    assert ident["fleet_url"] == rig.fleet.url
    with rig.fleet.registry() as reg:  # the broker checked that password; the fleet keeps only its hash
        stored = next(reg.db["credentials"].rows_where("account = 'env-0001'"))["password_hash"]
        audit = list(reg.db["audit"].rows_where("action = 'node.provision'"))
    assert C.verify_password(ident["password"], stored) and ident["password"] not in json.dumps(first)
    assert [(a["actor"], a["target"]) for a in audit] == [("bench-tech", "env-0001")]
    assert not any(rig.progress.iterdir())  # the password left the laptop

    # provisioning again: same identity, nothing copied twice, heard again
    again = rig.run(release="1.4.0")
    assert again["node"] == "env-0001" and again["kept_identity"] is True and again["files_written"] == 0
    assert again["birth_at"] > first["birth_at"]
    # another id is refused unless the technician says which one wins
    with pytest.raises(P.ProvisionError, match="already has the identity env-0001, not env-0099: pass "
                                               "--keep-identity to keep env-0001, or --replace"):
        rig.run(node="env-0099")
    with rig.fleet.registry() as reg:
        assert [r["account"] for r in C.accounts(reg) if r["kind"] == "node"] == ["env-0001"]


@pytest.mark.slow
@pytest.mark.vm
@pytest.mark.broker
def test_a_board_unplugged_while_provisioning_resumes_with_the_same_identity(rig):
    def unplug_at_the_eighth_file(message):
        rig.said.append(message)
        if "[8/" in message:
            rig.vb.control("unplug")

    with pytest.raises(P.ProvisionError, match=r"went away while .* \(unplugged\?\); plug it back in and run "
                                               "the same command again: it resumes"):
        rig.run(say=unplug_at_the_eighth_file)
    kept = list(rig.progress.iterdir())
    assert len(kept) == 1 and kept[0].stat().st_mode & 0o777 == 0o600
    rig.vb.control("plug")  # the port may come back under another name
    assert "identity.json" not in mpremote(rig.vb.port, "ls", ":")  # written last: not there yet
    rig.said.clear()
    done = rig.run()
    assert done["node"] == "env-0001" and done["kept_identity"] is False
    assert any(m.startswith("resuming the unfinished provisioning of env-0001") for m in rig.said), rig.said
    assert done["files_skipped"] >= 7 and done["files_written"] >= 1
    assert rig.fleet.node("env-0001")["state"] == "online" and not any(rig.progress.iterdir())
    with rig.fleet.registry() as reg:  # no second identity was issued
        assert [r["account"] for r in C.accounts(reg) if r["kind"] == "node"] == ["env-0001"]
