"""`fleet demo --seconds`: broker, fleet and virtual nodes, then a JSON summary."""
import json
import re
import signal
import subprocess
import sys
import threading
import time

import pytest


@pytest.mark.broker
def test_demo_runs_and_prints_its_summary_last(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fleet", "demo", "--nodes", "2", "--seconds", "12",
                           "--window-s", "5", "--boards", "env-station,ev-charger", "--state", str(tmp_path),
                           "--api-port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(summary) == ["nodes", "nodes_online", "telemetry_stored", "invalid", "duplicates",
                             "delivered_upstream", "upstream_backlog", "platform_entities", "seconds"]
    assert summary["nodes"] == 2 and summary["nodes_online"] == 2, summary
    assert summary["telemetry_stored"] >= 2 and summary["invalid"] == 0 and summary["duplicates"] == 0
    assert "crashed" not in proc.stderr
    # relayed to the platform stand-in, nothing left behind; the dashboard was served with a token
    assert summary["delivered_upstream"] > 0 and summary["upstream_backlog"] == 0, summary
    assert summary["platform_entities"] >= 2, summary
    assert re.search(r"dashboard on http://127\.0\.0\.1:\d+/ - sign in with the operator token iwk_", proc.stderr)
    # the broker ran with an account per device: no anonymous access
    conf = (tmp_path / "broker" / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in conf and "acl_file" in conf


def test_demo_refuses_an_unknown_board(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fleet", "demo", "--boards", "tram-stop", "--seconds", "1",
                           "--state", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("fleet: no board profile 'tram-stop'") and "Traceback" not in proc.stderr


@pytest.mark.broker
def test_a_rollout_in_the_demo_updates_its_nodes_and_the_demo_still_stops_cleanly(tmp_path):
    """The commands the demo prints build a signed release (here for the env-station only) and
    start a rollout; the env-station node downloads it, reboots into it on trial and commits,
    the ev-charger is left alone; then Ctrl-C stops the demo with its summary."""
    from fleet import rollouts as RO
    from fleet.registry import Registry

    db = tmp_path / "fleet.db"
    proc = subprocess.Popen([sys.executable, "-m", "fleet", "demo", "--nodes", "2", "--seconds", "240",
                             "--window-s", "5", "--boards", "env-station,ev-charger", "--state", str(tmp_path),
                             "--api-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        def printed(pattern):
            return next((m for m in map(re.compile(pattern).search, list(lines)) if m), None)

        def wait_for(what, check, timeout):
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                found = check()
                if found:
                    return found
                assert proc.poll() is None, f"the demo ended while waiting for {what}:\n" + "".join(lines)
                time.sleep(0.5)
            pytest.fail(f"no {what} within {timeout} s:\n" + "".join(lines))

        start = wait_for("rollout start command", lambda: printed(r"^demo:   (.* -m fleet rollout start .*)$"), 60)
        build = printed(r"^demo:   (.* -m fleet release build .*)$")  # printed just before
        version = re.search(r"--version (\S+)", build.group(1)).group(1)
        assert f"--release {version} " in start.group(1), "".join(lines)
        assert (tmp_path / "keys" / "ota-signing.key").exists()

        def nodes():
            with Registry(str(db)) as reg:
                return {n["id"]: n for n in reg.nodes()}
        wait_for("two nodes online", lambda: [n for n in nodes().values()
                                              if n["state"] == "online" and n["board"]][1:], 60)
        old = nodes()["ev-0002"]["fw"]
        assert nodes()["env-0001"]["fw"] == old and old != version
        # the printed commands, as an operator types them (the build for one board of the mix)
        out = subprocess.run(build.group(1) + " --boards env-station", shell=True, capture_output=True,
                             text=True, timeout=180)
        assert out.returncode == 0 and f"release {version}: bundle" in out.stdout, out.stderr
        out = subprocess.run(start.group(1), shell=True, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        rid = int(re.search(r"rollout (\d+)", out.stdout).group(1))

        def finished():
            with Registry(str(db)) as reg:
                r = RO.detail(reg, rid)
            return r if r["state"] != "running" else None
        rollout = wait_for("finished rollout", finished, 120)
        assert rollout["state"] == "done", rollout
        [dep] = rollout["deployments"]
        assert dep["node"] == "env-0001" and dep["state"] == "committed", dep
        steps = [h["state"] for h in dep["history"]]
        assert steps[0] == "pending" and steps[-1] == "committed" and "staged" in steps, steps
        # the node rebooted into the new slot and committed it; the fleet knows it runs the release
        state = json.loads((tmp_path / "nodes" / "env-0001" / "ota" / "state.json").read_text())
        assert state["active"] in ("a", "b") and state["version"] == version and not state["trial"], state
        wait_for("env-0001 online on the new version",
                 lambda: nodes()["env-0001"]["fw"] == version and nodes()["env-0001"]["state"] == "online", 30)
        assert nodes()["ev-0002"]["fw"] == old
        assert any(re.search(r"^demo: rollout \d+: env-0001 \w+ -> committed", line) for line in lines)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        stdout = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    assert proc.returncode == 0, "".join(lines)
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["nodes"] == 2 and summary["nodes_online"] == 2 and summary["invalid"] == 0, summary
    assert summary["seconds"] < 200, summary  # stopped by Ctrl-C, not by --seconds
    assert "crashed" not in "".join(lines) and "Traceback" not in "".join(lines)
