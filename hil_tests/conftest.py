"""Hardware-in-the-loop tests: a board on a serial port, real or virtual.

With `--port /dev/ttyUSB0` (or IWAKI_HIL_PORT) the tests drive that board:
`--board` is its profile, `--image` the MicroPython image the flash test
writes (skipped without), `--fleet URL` a running fleet the board reaches
over `--wifi SSID` (password in IWAKI_WIFI_PASSWORD) with a technician
token in IWAKI_TOKEN (the fleet tests are skipped without). OTA needs the
private fleet (below) or, on a real fleet, an admin token in
IWAKI_ADMIN_TOKEN.

Without `--port` (as in `make test`) the same tests drive the virtual board
(tools.vboard: the real mpremote and esptool talk to it over a pty, and it
runs what provisioning writes in the MicroPython VM) and a private fleet
(hil_tests/rig.py: a real mosquitto checking passwords, the registry, the
ingest service, the API and the OTA rollout engine, on loopback). Tests are
skipped, with the reason, only when neither is possible.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from hil_tests.rig import REPO, LocalFleet, VirtualBoard, vboard_unavailable


def pytest_addoption(parser):
    parser.addoption("--port", default=os.environ.get("IWAKI_HIL_PORT"),
                     help="serial port of the board under test (or IWAKI_HIL_PORT); "
                          "default: the virtual board")
    parser.addoption("--board", default="boards/env-station.toml",
                     help="board profile of the board under test")
    parser.addoption("--image", default=None, help="MicroPython image (.bin) the flash test writes to a real board")
    parser.addoption("--fleet", default=None, help="URL of a running fleet a real board reaches "
                                                   "(token in IWAKI_TOKEN)")
    parser.addoption("--wifi", default=None, help="Wi-Fi network for a real board (password in IWAKI_WIFI_PASSWORD)")
    parser.addoption("--window-s", type=int, default=None,
                     help="reporting window the tests give the node (default: 5 s on the virtual board, "
                          "the profile's own on a real one)")


def quick_profile(board: Path, out_dir: Path, window_s: int) -> Path:
    """A copy of the board file with report.window_s and health_s set to window_s (when it still checks),
    so the tests need not wait a minute for the first telemetry."""
    from tools.boards import BoardError, compile_board
    text = board.read_text()
    for key in ("window_s", "health_s"):
        text = re.sub(rf"(?m)^{key}\s*=\s*\d+", f"{key} = {window_s}", text)
    out = out_dir / board.name
    out.write_text(text)
    try:
        compile_board(out)
    except BoardError:
        return board
    return out


@pytest.fixture(scope="package")
def rig(request, tmp_path_factory):
    """The board under test: `port`, `board` (profile path), `virtual`, `vb` (the VirtualBoard or None),
    `image` (a MicroPython image for a real board, or None)."""
    port = request.config.getoption("--port")
    board = Path(request.config.getoption("--board"))
    board = board if board.is_absolute() else REPO / board
    window = request.config.getoption("--window-s")
    tmp = tmp_path_factory.mktemp("hil")
    if port:
        if not os.path.exists(port):
            pytest.fail(f"--port {port}: no such device", pytrace=False)
        yield SimpleNamespace(port=port, board=quick_profile(board, tmp, window) if window else board,
                              virtual=False, vb=None, image=request.config.getoption("--image"), tmp=tmp)
        return
    why = vboard_unavailable()
    if why:
        pytest.skip(f"no board: pass --port /dev/ttyUSB0 (or set IWAKI_HIL_PORT); the virtual board cannot "
                    f"run here either: {why}")
    with VirtualBoard(board, tmp / "vboard") as vb:
        yield SimpleNamespace(port=vb.port, board=quick_profile(board, tmp, window or 5), virtual=True, vb=vb,
                              image=None, tmp=tmp)


@pytest.fixture
def port(rig):
    return rig.port


@pytest.fixture(scope="package")
def fleet(rig, request):
    """The fleet the board reports to: `url`, `token` (technician), `admin` (or None), `local`
    (the LocalFleet, or None for a real fleet), `wifi`."""
    wifi = request.config.getoption("--wifi")
    wifi = {"ssid": wifi, "password": os.environ.get("IWAKI_WIFI_PASSWORD", "")} if wifi else None
    if not rig.virtual:
        url, token = request.config.getoption("--fleet"), os.environ.get("IWAKI_TOKEN")
        if not url or not token:
            pytest.skip("a real board reports to a real fleet: pass --fleet http://HOST:8080, a technician token "
                        "in IWAKI_TOKEN and --wifi SSID")
        yield SimpleNamespace(url=url, token=token, admin=os.environ.get("IWAKI_ADMIN_TOKEN"), local=None,
                              wifi=wifi)
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IWAKI_KEYS_DIR", str(rig.tmp / "keys"))
        mp.setenv("IWAKI_RELEASES_DIR", str(rig.tmp / "releases"))
        from fleet import keys
        keys.create(rig.tmp / "keys")
        with LocalFleet(rig.tmp / "fleet", rollouts=True) as local:
            yield SimpleNamespace(url=local.url, token=local.token, admin=local.admin, local=local, wifi=None)


@pytest.fixture(scope="package")
def provisioned(rig, fleet):
    """tools.provision on the board, once (after the flash test when it runs): the summary it printed."""
    from tools import provision as P
    return P.provision(rig.port, rig.board, "hil-bench", fleet.url, fleet.token, wait=120, wifi=fleet.wifi,
                       progress_dir=rig.tmp / "progress", release="latest")
