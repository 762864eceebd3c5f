"""tools.monitor on real pseudo-terminals: the test writes what a board would print into the pty's
master side; closing the master is the board being unplugged."""
from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tools import monitor as M

REPO = Path(__file__).resolve().parents[2]
STAMP = r"\d\d:\d\d:\d\d\.\d{3}  "


class Pty:
    """A pseudo-terminal: `path` is the board's port, `write()` is the board printing."""

    def __init__(self, link: Path | None = None):
        self.master, self.slave = os.openpty()
        self.path = os.ttyname(self.slave)
        self.link = link
        if link:
            link.symlink_to(self.path)
            self.path = str(link)

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def unplug(self) -> None:
        if self.link:
            self.link.unlink()
        os.close(self.master)
        os.close(self.slave)


def later(delay: float, fn, *args) -> threading.Thread:
    t = threading.Thread(target=lambda: (time.sleep(delay), fn(*args)), daemon=True)
    t.start()
    return t


def test_lines_get_a_timestamp_a_colour_by_level_and_the_log_its_utc_time(tmp_path):
    pty, out, log = Pty(), io.StringIO(), tmp_path / "board.log"
    later(0.4, pty.write, b"MicroPython v1.27.0 on ESP32\r\nE (812) wifi: auth failed\r\n"
                          b"safe mode: bad configuration: broker.host: missing (required)\r\n"
                          b"Traceback (most recent call last):\r\nOSError: [Errno 113] EHOSTUNREACH\r\n>>> ")
    later(2.0, pty.unplug)
    with pytest.raises(M.MonitorError, match="went away .*unplugged"):
        M.monitor(pty.path, out=out, colour=True, log=str(log), say=lambda m: None)
    shown = out.getvalue().splitlines()
    assert len(shown) == 6, shown
    assert all(re.match(r"(\x1b\[\d+m)?" + STAMP, line) for line in shown), shown
    red, yellow, reset = M.COLOURS["error"], M.COLOURS["warning"], "\x1b[0m"
    assert shown[0].endswith("MicroPython v1.27.0 on ESP32") and not shown[0].startswith("\x1b")
    assert shown[1].startswith(red) and shown[1].endswith("wifi: auth failed" + reset)
    assert shown[2].startswith(yellow)
    assert shown[3].startswith(red) and shown[4].startswith(red)
    assert shown[5].endswith(">>> ")  # a prompt without its newline is shown after a quiet second
    logged = log.read_text().splitlines()
    assert len(logged) == 6 and "\x1b" not in log.read_text()
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z  E \(812\) wifi: auth failed$", logged[1])


def test_without_a_terminal_there_are_no_colours():
    pty, out = Pty(), io.StringIO()
    later(0.3, pty.write, b"E (1) x\n")
    later(0.8, pty.unplug)
    with pytest.raises(M.MonitorError):
        M.monitor(pty.path, out=out, say=lambda m: None)  # StringIO is not a tty
    assert re.fullmatch(STAMP + r"E \(1\) x\n", out.getvalue())


def test_follow_waits_for_the_board_to_come_back(tmp_path):
    link = tmp_path / "ttyUSB0"
    first, out, said = Pty(link), io.StringIO(), []
    done = threading.Event()
    second: list[Pty] = []

    def board():
        time.sleep(0.4)
        first.write(b"before\n")
        time.sleep(0.4)
        first.unplug()  # the port disappears ...
        time.sleep(1.0)
        second.append(Pty(link))  # ... and comes back at the same path
        time.sleep(1.0)  # the monitor retries every half second
        second[0].write(b"after\n")
        time.sleep(0.5)
        done.set()

    later(0, board)
    shown = M.monitor(str(link), out=out, follow=True, say=said.append, stop=done.is_set)
    second[0].unplug()
    assert shown == 2 and re.fullmatch(STAMP + "before\n" + STAMP + "after\n", out.getvalue())
    assert any("went away" in m and "waiting for it to come back" in m for m in said), said
    assert any(m.endswith("is back") for m in said), said


def run_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "tools.monitor", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=30, **kw)


def test_a_missing_port_is_a_clear_error():
    res = run_cli("--port", "/dev/ttyUSB-nonexistent")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.startswith("tools.monitor: port /dev/ttyUSB-nonexistent: no such device; is the board plugged in?")


def test_ctrl_c_exits_quietly():
    pty = Pty()
    proc = subprocess.Popen([sys.executable, "-m", "tools.monitor", "--port", pty.path], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "listening on" in proc.stderr.readline()
        pty.write(b"hello\n")
        assert re.fullmatch(STAMP + "hello\n", proc.stdout.readline())
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
        pty.unplug()


def test_levels():
    assert M.level("E (123) wifi: x") == "error" and M.level("ValueError: bad") == "error"
    assert M.level("event sensor.failed severity critical") == "error"
    assert M.level("W (5) phy: y") == "warning" and M.level("safe mode: GPIO 0 held low at reset") == "warning"
    assert M.level("rst:0x1 (POWERON_RESET),boot:0x13") == "warning"
    assert M.level("D (9) z") == "debug" and M.level("I (9) z") is None and M.level("hello") is None


@pytest.mark.vm
def test_the_virtual_boards_console_through_resets_and_an_unplug(tmp_path):
    """The virtual board's console (a stable link, as /dev/serial/by-id/...): its reset banner, the
    unplugged cable noticed, and the console again once it is plugged back."""
    from hil_tests.rig import VirtualBoard, vboard_unavailable, wait_until
    why = vboard_unavailable()
    if why:
        pytest.skip(why)
    link = tmp_path / "ttyUSB0"
    out, said, done = io.StringIO(), [], threading.Event()
    with VirtualBoard(REPO / "boards" / "env-station.toml", tmp_path / "vb", link=link) as vb:
        watcher = threading.Thread(target=M.monitor, args=(str(link),), daemon=True,
                                   kwargs=dict(out=out, follow=True, say=said.append, stop=done.is_set))
        watcher.start()
        try:
            wait_until(lambda: said, 5, "monitor start")
            vb.control("power-cycle")
            wait_until(lambda: "rst:0x1 (POWERON_RESET)" in out.getvalue(), 10, "reset banner")
            vb.control("unplug")
            wait_until(lambda: any("went away" in m for m in said), 5, "unplug noticed")
            vb.control("plug")
            wait_until(lambda: any(m.endswith("is back") for m in said), 5, "the port back")
            vb.control("reset")
            wait_until(lambda: out.getvalue().count("rst:0x1 (POWERON_RESET)") == 2, 10, "second banner")
        finally:
            done.set()
            watcher.join(5)
    assert re.search(r"(?m)^" + STAMP + r"rst:0x1 \(POWERON_RESET\),boot:0x13", out.getvalue())
