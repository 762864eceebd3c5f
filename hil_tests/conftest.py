"""Hardware-in-the-loop tests: a real board on a serial port.

The port comes from `--port` (or IWAKI_HIL_PORT); without one every test
here is skipped with the reason. The virtual board (a later issue) will be
the no-hardware path that `make test` uses.
"""
import os

import pytest


def pytest_addoption(parser):
    parser.addoption("--port", default=os.environ.get("IWAKI_HIL_PORT"),
                     help="serial port of the board under test (or IWAKI_HIL_PORT)")
    parser.addoption("--board", default="boards/env-station.toml",
                     help="board profile of the board under test")


@pytest.fixture
def port(request):
    p = request.config.getoption("--port")
    if not p:
        pytest.skip("no board: pass --port /dev/ttyUSB0 (or set IWAKI_HIL_PORT)")
    if not os.path.exists(p):
        pytest.fail(f"--port {p}: no such device", pytrace=False)
    return p
