"""The virtual board (python -m tools.vboard) answers the real mpremote and the
real esptool on its pty, runs boot.py and main.py from its state directory,
reaches a real broker, and obeys its control socket."""
from __future__ import annotations

import json
import select
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import serial

from tools.boards import compact_json, compile_board
from tools.mpvm import vm_available
from tools.vboard.control import ControlError, request

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.vm,
              pytest.mark.skipif(vm_available() is not None, reason=str(vm_available()))]


class Board:
    def __init__(self, port: str, state: Path, proc: subprocess.Popen):
        self.port = port
        self.state = state
        self.proc = proc
        self.control = state / "control.sock"

    def mpremote(self, *args, ok=True, timeout=30) -> str:
        r = subprocess.run([sys.executable, "-m", "mpremote", "connect", self.port, *args],
                           capture_output=True, text=True, timeout=timeout, cwd=REPO)
        if ok:
            assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    def esptool(self, *args) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "esptool", "--port", self.port, "--before", "no-reset",
                               *args], capture_output=True, text=True, timeout=60, cwd=REPO)


@contextmanager
def vboard(state: Path, board: str = "boards/env-station.toml"):
    log = open(state.parent / (state.name + ".log"), "a")
    proc = subprocess.Popen([sys.executable, "-m", "tools.vboard", "--board", board, "--state", str(state)],
                            stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO)
    try:
        assert select.select([proc.stdout], [], [], 20)[0], "the vboard printed no port"
        port = proc.stdout.readline().strip()
        assert port.startswith("/dev/"), port
        yield Board(port, state, proc)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


@pytest.fixture
def board(tmp_path):
    with vboard(tmp_path / "state") as b:
        yield b


class Console:
    """The board's console as a terminal sees it."""

    def __init__(self, port):
        self.s = serial.Serial(port, 115200, timeout=0.05)
        self.seen = b""

    def until(self, marker: bytes, timeout=10.0) -> bytes:
        end = time.monotonic() + timeout
        while marker not in self.seen:
            assert time.monotonic() < end, f"no {marker!r} on the console; saw {self.seen[-600:]!r}"
            self.seen += self.s.read(4096)
        i = self.seen.index(marker) + len(marker)
        text, self.seen = self.seen[:i], self.seen[i:]
        return text

    def send(self, data: bytes):
        self.s.write(data)

    def close(self):
        self.s.close()


def test_mpremote_exec_and_eval_run_micropython(board):
    assert board.mpremote("exec", "import sys; print(sys.implementation.name, 6 * 7)").strip() == "micropython 42"
    assert board.mpremote("eval", "[n * n for n in range(4)]").strip() == "[0, 1, 4, 9]"
    r = subprocess.run([sys.executable, "-m", "mpremote", "connect", board.port, "exec", "1/0"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "ZeroDivisionError" in r.stdout + r.stderr


def test_the_hil_suite_passes_against_a_vboard(board):
    from hil_tests.test_board_repl import test_board_runs_micropython_1_2x
    test_board_runs_micropython_1_2x(board.port)


@pytest.mark.slow
def test_mpremote_filesystem_commands_work_on_the_state_directory(board, tmp_path):
    src = tmp_path / "hello.py"
    src.write_text("print('hello from the board')\n")
    board.mpremote("fs", "mkdir", ":app")
    board.mpremote("fs", "cp", str(src), ":app/hello.py")
    assert (board.state / "fs" / "app" / "hello.py").read_text() == src.read_text()
    listing = board.mpremote("fs", "ls", ":app")
    assert listing.split()[-2:] == [str(len(src.read_text())), "hello.py"], listing
    assert board.mpremote("fs", "cat", ":app/hello.py") == src.read_text()
    assert board.mpremote("run", str(src)).strip() == "hello from the board"
    board.mpremote("fs", "cp", ":app/hello.py", str(tmp_path / "back.py"))
    assert (tmp_path / "back.py").read_text() == src.read_text()
    board.mpremote("fs", "rm", ":app/hello.py")
    board.mpremote("fs", "rmdir", ":app")
    assert not (board.state / "fs" / "app").exists()
    r = subprocess.run([sys.executable, "-m", "mpremote", "connect", board.port, "fs", "cat", ":nope.txt"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "No such file" in r.stderr, r.stderr


def test_state_survives_a_vboard_restart(tmp_path):
    state = tmp_path / "state"
    with vboard(state) as b:
        b.mpremote("exec", "f = open('note.txt', 'w'); f.write('kept'); f.close()")
        mac = b.mpremote("exec", "import machine; print(machine.unique_id().hex())").strip()
    with vboard(state) as b:
        assert b.mpremote("exec", "print(open('note.txt').read())").strip() == "kept"
        assert b.mpremote("exec", "import machine; print(machine.unique_id().hex())").strip() == mac
    assert mac == json.loads((state / "vboard.json").read_text())["mac"]


BOOT_PY = "print('boot.py ran')\nBOOTED = True\n"
MAIN_PY = """\
import asyncio, machine
MAIN = True
with open('cause.txt', 'w') as f:
    f.write(str(machine.reset_cause()))
async def ticks():
    n = 0
    while True:
        print('tick', n)
        n += 1
        await asyncio.sleep_ms(100)
asyncio.run(ticks())
"""


@pytest.mark.slow
def test_resets_run_boot_py_and_main_py_and_ctrl_c_gives_the_repl(board, tmp_path):
    for name, text in (("boot.py", BOOT_PY), ("main.py", MAIN_PY)):
        (tmp_path / name).write_text(text)
        board.mpremote("fs", "cp", str(tmp_path / name), ":" + name)
    # mpremote's soft reset into the raw REPL runs boot.py, not main.py, as on a board
    assert board.mpremote("exec", "print('MAIN' in globals(), BOOTED)").strip() == "False True"
    board.mpremote("soft-reset")

    board.mpremote("reset")  # machine.reset(): boot.py then main.py, reset cause SOFT_RESET
    con = Console(board.port)
    try:
        con.until(b"tick 2")
        con.send(b"\x03")
        text = con.until(b">>> ")
        assert b"KeyboardInterrupt" in text and b"MicroPython v1.27.0" in text, text
        con.send(b"print(open('cause.txt').read(), MAIN, BOOTED)\r")
        assert b"5 True True" in con.until(b">>> ")
        con.send(b"\x04")  # soft reboot from the friendly REPL: boot.py, then main.py again
        text = con.until(b"tick 0")
        assert b"MPY: soft reboot" in text and b"boot.py ran" in text, text
    finally:
        con.close()
    # mpremote reaches the board while main.py runs: Ctrl-C, then its soft reset
    assert board.mpremote("exec", "print('MAIN' in globals(), BOOTED)").strip() == "False True"


@pytest.mark.slow
def test_esptool_detects_flashes_verifies_reads_and_erases(tmp_path):
    image = tmp_path / "image.bin"
    image.write_bytes(bytes((i * 37 + 11) & 0xFF for i in range(20000)))
    with vboard(tmp_path / "state", "boards/river-station.toml") as b:
        r = b.esptool("--no-stub", "chip-id")
        assert r.returncode == 0 and "Detecting chip type... ESP32\n" in r.stdout, r.stdout + r.stderr
        mac = json.loads((b.state / "vboard.json").read_text())["mac"]
        assert "MAC:                " + ":".join(mac[i:i + 2] for i in range(0, 12, 2)) in r.stdout
        r = b.esptool("--no-stub", "write-flash", "0x1000", str(image))
        assert r.returncode == 0 and "Hash of data verified" in r.stdout, r.stdout + r.stderr
        assert (b.state / "flash.bin").read_bytes()[0x1000:0x1000 + 20000] == image.read_bytes()
        r = b.esptool("--no-stub", "verify-flash", "0x1000", str(image))
        assert r.returncode == 0 and "Verification successful" in r.stdout, r.stdout + r.stderr
        r = b.esptool("--no-stub", "read-flash", "0x1800", "0x100", str(tmp_path / "back.bin"))
        assert r.returncode == 0, r.stdout + r.stderr
        assert (tmp_path / "back.bin").read_bytes() == image.read_bytes()[0x800:0x900]
        # between esptool runs the board is back in MicroPython
        assert b.mpremote("eval", "'alive'").strip() == "alive"
        b.mpremote("exec", "open('data.txt', 'w').write('x')")
        r = b.esptool("erase-flash")  # stub-only: esptool uploads its stub first
        assert r.returncode == 0 and "Stub flasher running" in r.stdout, r.stdout + r.stderr
        r = b.esptool("verify-flash", "0x1000", str(image))
        assert r.returncode != 0 and "digest mismatch" in r.stdout, r.stdout + r.stderr
        # erasing the flash erased the MicroPython filesystem with it
        assert "data.txt" not in b.mpremote("fs", "ls")


def test_esptool_sees_the_board_profiles_chip(board):
    r = board.esptool("chip-id")
    assert r.returncode == 0 and "Detecting chip type... ESP32-S3" in r.stdout, r.stdout + r.stderr


def test_the_bootloader_is_entered_and_left_as_documented(board):
    def mode():
        return request(board.control, "status")["mode"]

    # the stub's --after no-reset sends it back to the ROM: the board stays there
    r = board.esptool("--after", "no-reset", "chip-id")
    assert r.returncode == 0, r.stdout + r.stderr
    time.sleep(0.3)
    assert mode() == "bootloader"
    request(board.control, "reset")
    assert mode() == "micropython" and board.mpremote("eval", "1 + 1").strip() == "2"
    board.mpremote("bootloader")  # machine.bootloader()
    _wait(lambda: mode() == "bootloader", "the bootloader after machine.bootloader()")
    r = board.esptool("--no-stub", "--after", "soft-reset", "chip-id")  # FLASH_END: run the app
    assert r.returncode == 0, r.stdout + r.stderr
    _wait(lambda: mode() == "micropython", "MicroPython after --after soft-reset")
    assert request(board.control, "status")["reset_cause"] == "hard"


def test_unplug_closes_the_port_and_plug_brings_a_new_one(board):
    con = Console(board.port)
    request(board.control, "unplug")
    with pytest.raises(serial.SerialException):
        for _ in range(20):
            con.send(b"\r")
            con.s.read(10)
            time.sleep(0.05)
    con.close()
    assert request(board.control, "status")["plugged"] is False
    port = request(board.control, "plug")["port"]
    assert board.proc.stdout.readline().strip() == port  # printed as the first line was
    board.port = port
    assert board.mpremote("eval", "'back'").strip() == "back"


def test_control_socket_sets_adc_levels_faults_and_power_cycles(board):
    assert request(board.control, "adc", pin=4, raw=12345)["raw"] == 12345
    assert request(board.control, "adc", pin=5, volts=1.2)["raw"] == round(1.2 / 2.45 * 65535)
    read = ("import machine\nprint(machine.ADC(machine.Pin(4)).read_u16(), "
            "machine.ADC(machine.Pin(5), atten=machine.ADC.ATTN_11DB).read_uv() // 1000, "
            "machine.reset_cause())")
    assert board.mpremote("exec", read).split() == ["12345", "1200", "1"]

    request(board.control, "fault", sensor="bme280", fault="silent")
    scan = "import machine\nprint(machine.I2C(0).scan())"
    assert board.mpremote("exec", scan).strip() == "[98]"  # the BME280 at 0x76 NACKs
    request(board.control, "fault", sensor="bme280", fault="none")
    assert board.mpremote("exec", scan).strip() == "[98, 118]"

    # a file closed survives a power cut; one still open loses what it held
    board.mpremote("exec", "f = open('closed.txt', 'w'); f.write('safe'); f.close()\n"
                           "g = open('open.txt', 'w'); g.write('lost')")
    assert request(board.control, "power-cycle")["ok"]
    assert request(board.control, "status")["reset_cause"] == "power-on"
    assert board.mpremote("exec", "print(open('closed.txt').read())").strip() == "safe"
    assert not (board.state / "fs" / "open.txt").exists()
    assert board.mpremote("exec", read).split() == ["12345", "1200", "1"]  # the rig's levels stay

    with pytest.raises(ControlError, match="not on board env-station"):
        request(board.control, "fault", sensor="nope", fault="silent")
    with pytest.raises(ControlError, match="pin: want an integer 0..48"):
        request(board.control, "adc", pin=99, raw=1)
    with pytest.raises(ControlError, match="unknown command"):
        request(board.control, "explode")


def test_control_socket_drives_pins_seen_by_irq_handlers(board, tmp_path):
    script = tmp_path / "irq.py"
    script.write_text("import machine\nedges = []\n"
                      "p = machine.Pin(14, machine.Pin.IN, machine.Pin.PULL_UP)\n"
                      "p.irq(lambda pin: edges.append(pin.value()), trigger=machine.Pin.IRQ_FALLING)\n")
    board.mpremote("run", str(script))
    request(board.control, "pulse", pin=14, level=0, ms=30)
    time.sleep(0.2)  # low for 30 ms, then let go
    assert board.mpremote("resume", "exec", "print(len(edges), p.value())").split() == ["1", "1"]
    request(board.control, "pin", pin=14, level=0)
    assert board.mpremote("resume", "exec", "print(len(edges), p.value())").split() == ["2", "0"]
    request(board.control, "pin", pin=14, level=None)  # let go: the pull-up wins
    assert board.mpremote("resume", "exec", "print(p.value())").strip() == "1"


@pytest.mark.slow
@pytest.mark.broker
def test_the_real_firmware_boots_and_publishes_its_birth(broker, tmp_path):
    state = tmp_path / "state"
    fs = state / "fs"
    shutil.copytree(REPO / "firmware" / "node", fs / "node", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("boot.py", "main.py"):
        shutil.copy(REPO / "firmware" / name, fs / name)
    (fs / "board.json").write_text(compact_json(compile_board(REPO / "boards" / "env-station.toml")))
    (fs / "identity.json").write_text(json.dumps({
        "node": "vb-test", "root": "iwaki", "user": "vb-test", "password": "pw",
        "broker": {"host": broker.host, "port": broker.port}}))
    births = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    c.on_message = lambda _c, _u, m: births.append(json.loads(m.payload))
    c.connect(broker.host, broker.port)
    c.subscribe("iwaki/vb-test/birth", qos=1)
    c.loop_start()
    try:
        with vboard(state) as b:
            _wait(lambda: births, "a birth from the node")
            first = births[-1]
            assert (first["node"], first["board"], first["chip"], first["boot_count"]) == \
                ("vb-test", "env-station", "esp32s3", 1)
            # mpremote reaches a board running the firmware (Ctrl-C stops main.py)
            mac = json.loads((state / "vboard.json").read_text())["mac"]
            assert b.mpremote("exec", "import machine; print(machine.unique_id().hex())").strip() == mac
            b.mpremote("reset")  # the firmware starts again and counts the boot on its filesystem
            _wait(lambda: births[-1]["boot_count"] == 2, "a second birth after the reset")
            assert (fs / "bootcount").read_text() == "2"
    finally:
        c.loop_stop()
        c.disconnect()


def _wait(cond, what, timeout=20.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"no {what} within {timeout:.0f} s"
        time.sleep(0.05)
