"""The board answers on its raw REPL with the MicroPython the firmware needs."""
import subprocess
import sys

import pytest

pytestmark = pytest.mark.hil


def mpremote(port, *args, timeout=30):
    return subprocess.run([sys.executable, "-m", "mpremote", "connect", port, *args],
                          capture_output=True, text=True, timeout=timeout)


def test_board_runs_micropython_1_2x(port):
    r = mpremote(port, "exec", "import sys; print(sys.implementation.name, sys.implementation.version[:2])")
    assert r.returncode == 0, r.stderr
    name, major, minor = r.stdout.replace("(", " ").replace(")", " ").replace(",", " ").split()[:3]
    assert name == "micropython" and int(major) == 1 and int(minor) >= 20, r.stdout
