"""`fleet demo --seconds`: broker, fleet and virtual nodes, then a JSON summary."""
import json
import re
import subprocess
import sys

import pytest


@pytest.mark.broker
def test_demo_runs_and_prints_its_summary_last(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fleet", "demo", "--nodes", "2", "--seconds", "12",
                           "--window-s", "5", "--boards", "env-station,ev-charger", "--state", str(tmp_path),
                           "--api-port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
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
