"""One boot of the vboard's MicroPython: the VM under Node.js (repl.mjs) as a
child process, from a reset to the next one.

The child's stdin and stdout are the board's console (UART0). A socket pair
carries JSON lines: heartbeats and the reset that ends the boot come from the
child, rig commands go to it and are answered by id. ``Console`` only moves
bytes and messages; tools/vboard/board.py decides what a reset means.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from tools.mpvm import REPO, vm_available

HERE = Path(__file__).resolve().parent
REPL = HERE / "repl.mjs"
VMBOARD = HERE / "vmboard.py"
SIM = REPO / "firmware" / "sim"

# exit codes of repl.mjs (see vmboard.py): a soft reboot into the friendly or
# raw REPL, a hard reset (+ reset cause), the bootloader, the VM itself failing
SOFT_REBOOT, SOFT_REBOOT_RAW, HARD_RESET, BOOTLOADER, PANIC = 10, 11, 20, 30, 40


class ConsoleError(Exception):
    """The VM cannot be started here (Node.js or the VM package missing)."""


class Console:
    """repl.mjs running one boot. ``cfg`` is the boot configuration it reads
    (board profile, reset cause, the rig's pins/ADC/faults...)."""

    def __init__(self, cfg: dict, fs_dir: Path, heap: int = 2 * 1024 * 1024):
        why = vm_available()
        if why:
            raise ConsoleError(why)
        ours, theirs = socket.socketpair()
        full = dict(cfg, fs=str(fs_dir), sim=str(SIM), vmboard=str(VMBOARD), heap=heap,
                    ctl_fd=theirs.fileno())
        self.proc = subprocess.Popen([shutil.which("node"), str(REPL), json.dumps(full)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     pass_fds=(theirs.fileno(),), cwd=str(REPO))
        theirs.close()
        self.ctl = ours
        self.ctl.setblocking(False)
        os.set_blocking(self.proc.stdin.fileno(), False)
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.started = self.heartbeat = time.monotonic()
        self.reset: dict | None = None  # {"reset": exit code, "delay_ms": n} once the VM said so
        self._ctl_buf = b""
        self._next_id = 1
        self._waiting: dict = {}  # request id -> callback(error or None)

    @property
    def stdout(self):
        return self.proc.stdout

    def write(self, data: bytes) -> None:
        """Bytes from the host to the board's console; dropped when the board
        is not reading (its UART buffer is full), as on hardware."""
        try:
            os.write(self.proc.stdin.fileno(), data)
        except (BlockingIOError, BrokenPipeError):
            pass

    def read(self) -> bytes | None:
        """Console output waiting to be read; None once the VM has ended."""
        try:
            data = os.read(self.proc.stdout.fileno(), 65536)
        except BlockingIOError:
            return b""
        return data or None

    def request(self, msg: dict, done) -> None:
        """Send a rig command; done(error or None) when the VM has applied it."""
        rid = self._next_id
        self._next_id += 1
        self._waiting[rid] = done
        try:
            self.ctl.sendall((json.dumps(dict(msg, id=rid)) + "\n").encode())
        except OSError:
            self._waiting.pop(rid)
            done(None)  # the VM is gone: the next boot applies the rig's state anyway

    def read_ctl(self) -> bool:
        """Take the VM's messages: heartbeats, answers, the reset it ends with.
        False once the VM has closed its end."""
        try:
            data = self.ctl.recv(65536)
        except BlockingIOError:
            return True
        except ConnectionResetError:
            return False
        if not data:
            return False
        self._ctl_buf += data
        *lines, self._ctl_buf = self._ctl_buf.split(b"\n")
        for line in lines:
            msg = json.loads(line)
            if "hb" in msg:
                self.heartbeat = time.monotonic()
            elif "reset" in msg:
                self.reset = msg
            elif msg.get("id") in self._waiting:
                self._waiting.pop(msg["id"])(msg.get("error"))
        return True

    def stuck(self, limit_s: float = 1.0) -> bool:
        """True when the VM has been busy in code that cannot be interrupted
        (no heartbeat for limit_s)."""
        return time.monotonic() - self.heartbeat > limit_s

    def kill(self) -> None:
        """End this boot at once (a reset or a power cut: nothing more is written)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait()

    def wait(self) -> int:
        code = self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        self.ctl.close()
        for done in self._waiting.values():
            done(None)
        self._waiting.clear()
        return code
