"""OTA on the provisioned board (after hil_tests/test_node.py): a release the fleet builds and rolls
out is committed; then a broken release crashes its trial boots and, after power cycles, the board
rolls back to the version it ran."""
from __future__ import annotations

import json
import shutil
import time

import pytest

from hil_tests.rig import api, wait_until
from tools import provision as P

pytestmark = [pytest.mark.hil, pytest.mark.slow]


def post(fleet, path: str, body: dict) -> dict:
    client = P.Fleet(fleet.url, fleet.admin)
    try:
        return client.json("POST", path, json=body)
    finally:
        client.close()


def next_version(fw: str, step: int) -> str:
    major, minor = (fw.split(".") + ["0", "0"])[:2]
    return f"{int(major)}.{int(minor) + step}.{int(time.time()) % 100000}"


def roll_out(fleet, version: str, node: str) -> int:
    rollout = post(fleet, "/api/v1/rollouts", {"release": version, "waves": ["100%"], "soak_s": 0,
                                               "nodes": [node]})
    return rollout["id"]


def deployment(fleet, rollout_id: int, node: str) -> dict:
    found = api(fleet, f"/api/v1/rollouts/{rollout_id}", fleet.admin)
    return next(d for d in found["deployments"] if d["node"] == node)


@pytest.fixture(scope="module")
def ota_ready(provisioned, fleet):
    if fleet.admin is None:
        pytest.skip("OTA needs an admin token (IWAKI_ADMIN_TOKEN) to build a release and start a rollout")
    if not provisioned["ota_keys"]:
        pytest.skip("the fleet had no OTA signing key when the board was provisioned")
    return provisioned


def test_an_update_is_committed_and_a_broken_one_rolls_back_after_power_cycles(ota_ready, rig, fleet):
    node_id = ota_ready["node"]
    before = api(fleet, f"/api/v1/nodes/{node_id}")["fw"]
    good = next_version(before, 1)
    board = api(fleet, f"/api/v1/nodes/{node_id}")["board"]
    post(fleet, "/api/v1/releases", {"version": good, "boards": [board]})
    first = roll_out(fleet, good, node_id)
    wait_until(lambda: deployment(fleet, first, node_id)["state"] in ("committed", "failed", "rolled_back",
                                                                     "timed_out"), 180, f"end of the {good} update")
    assert deployment(fleet, first, node_id)["state"] == "committed", deployment(fleet, first, node_id)
    assert wait_until(lambda: api(fleet, f"/api/v1/nodes/{node_id}")["fw"] == good, 30, f"{node_id} on {good}")

    if fleet.local is None or not rig.virtual:
        pytest.skip("the rollback half builds a broken release on the private fleet and power-cycles the "
                    "virtual board")
    from fleet import releases as R
    tree = rig.tmp / "broken-firmware"
    shutil.copytree(R.FIRMWARE, tree, ignore=shutil.ignore_patterns("__pycache__", "sim"))
    (tree / "main.py").write_text('raise RuntimeError("a broken release")\n')
    bad = next_version(good, 1)
    with fleet.local.registry() as reg:
        R.build(bad, [board], registry=reg, actor="hil", source=tree)
    second = roll_out(fleet, bad, node_id)
    state_file = rig.vb.state / "fs" / "ota" / "state.json"

    def trial_booted():
        try:
            trial = json.loads(state_file.read_text()).get("trial") or {}
        except (OSError, ValueError):
            return False
        return trial.get("version") == bad and trial.get("boots", 0) >= 1
    wait_until(trial_booted, 120, f"the first trial boot of {bad}")
    # its main.py raises: every trial boot ends at the REPL; three more power-on resets and boot.py gives up
    for _ in range(3):
        rig.vb.control("power-cycle")
        time.sleep(2)
    wait_until(lambda: deployment(fleet, second, node_id)["state"] == "rolled_back", 90, f"{bad} rolled back")
    node = wait_until(lambda: (n := api(fleet, f"/api/v1/nodes/{node_id}"))["state"] == "online"
                      and n["fw"] == good and n, 60, f"{node_id} back on {good}")
    assert node["fw"] == good
