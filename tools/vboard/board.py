"""The virtual board: one event loop over its serial port (port.py), its
MicroPython (console.py: the VM running one boot at a time), its ROM
bootloader (rom.py) and the rig's control socket (control.py).

Modes: "micropython" (a boot is running), "bootloader" (the ROM answers
esptool), "asleep" (deep sleep; nothing answers until it wakes) and "off".
What the board keeps across resets lives in the state directory: ``fs/`` (the
MicroPython filesystem), ``flash.bin`` (the SPI flash esptool sees) and
``vboard.json`` (its MAC). What the rig sets (pins driven, ADC levels,
sensor faults) is the world around the board and survives resets too.
"""
from __future__ import annotations

import heapq
import itertools
import json
import secrets
import select
import selectors
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tools.boards import BoardError, compile_board
from tools.mpvm import vm_available
from tools.vboard.console import (BOOTLOADER, HARD_RESET as _EXIT_HARD, SOFT_REBOOT, SOFT_REBOOT_RAW,
                                  Console, ConsoleError)
from tools.vboard.control import ControlServer
from tools.vboard.port import Port
from tools.vboard.rom import CHIPS, SYNC_FRAME, Flash, Rom, RomError

PWRON_RESET, HARD_RESET, WDT_RESET, DEEPSLEEP_RESET, SOFT_RESET = 1, 2, 3, 4, 5
CAUSES = {PWRON_RESET: "power-on", HARD_RESET: "hard", WDT_RESET: "watchdog",
          DEEPSLEEP_RESET: "deep-sleep", SOFT_RESET: "soft"}
_ROM_RST = {PWRON_RESET: "0x1 (POWERON_RESET)", HARD_RESET: "0x1 (POWERON_RESET)",
            WDT_RESET: "0x7 (TG0WDT_SYS_RESET)", DEEPSLEEP_RESET: "0x5 (DEEPSLEEP_RESET)",
            SOFT_RESET: "0xc (SW_CPU_RESET)"}
_DOWNLOAD_BANNER = b"rst:0x1 (POWERON_RESET),boot:0x3 (DOWNLOAD_BOOT(UART0/UART1/SDIO_REI_REO_V2))\r\nwaiting for download\r\n"

# what MicroPython's ESP32 port writes to a fresh filesystem
DEFAULT_BOOT_PY = """\
# This file is executed on every boot (including wake-boot from deepsleep)
#import esp
#esp.osdebug(None)
#import webrepl
#webrepl.start()
"""


class VBoardError(Exception):
    """A board file, state directory or option the vboard cannot use."""


def _log(msg: str) -> None:
    print(f"vboard: {msg}", file=sys.stderr, flush=True)


class VBoard:
    """A virtual ESP32 on a pseudo-terminal. ``start()`` returns the port's path;
    ``run()`` serves until ``stop()``."""

    def __init__(self, board_file, state_dir=None, control=None, chip=None,
                 scenario="live", link=None, log=_log):
        try:
            self.profile = compile_board(board_file)
        except BoardError as exc:
            raise VBoardError(str(exc)) from None
        self.chip = chip or self.profile["chip"]
        if self.chip not in CHIPS:
            raise VBoardError(f"the vboard's ROM bootloader answers as {' or '.join(CHIPS)}, "
                              f"not {self.chip}: pass --chip")
        if scenario not in ("live", "still"):
            raise VBoardError(f"scenario {scenario!r}: use 'live' or 'still'")
        why = vm_available()
        if why:
            raise VBoardError(why)
        self.scenario = scenario
        self._own_state = state_dir is None
        self.state = Path(state_dir or tempfile.mkdtemp(prefix="vboard-"))
        self.fs_dir = self.state / "fs"
        try:
            self.state.mkdir(parents=True, exist_ok=True)
            self.mac = self._hardware()["mac"]
            self.flash = Flash(self.state / "flash.bin")
        except (OSError, ValueError) as exc:
            raise VBoardError(f"{self.state}: cannot use as the state directory: "
                              f"{getattr(exc, 'strerror', None) or exc}") from None
        except RomError as exc:
            raise VBoardError(str(exc)) from None
        self.control_path = Path(control) if control else self.state / "control.sock"
        self.log = log
        self.port = Port(link)
        self.sel = selectors.DefaultSelector()
        self.mode = "off"
        self.cause = PWRON_RESET
        self.boots = 0
        self.console: Console | None = None
        self.rom: Rom | None = None
        self.world = {"pins": {}, "adc": {}, "faults": {}}
        self._timers: list = []
        self._seq = itertools.count()
        self._held = b""
        self._wake = None
        self._port_watched = False
        self._checking = False
        self._stopping = False
        self.control = None

    # -- the state directory
    def _hardware(self) -> dict:
        path = self.state / "vboard.json"
        if path.exists():
            return json.loads(path.read_text())
        hw = {"mac": "246f28" + secrets.token_hex(3)}  # an Espressif OUI, a random board
        path.write_text(json.dumps(hw) + "\n")
        return hw

    def _fresh_fs(self) -> None:
        if not self.fs_dir.exists():
            self.fs_dir.mkdir(parents=True)
            (self.fs_dir / "boot.py").write_text(DEFAULT_BOOT_PY)

    def _erase_fs(self) -> None:
        # esptool erase-flash: on a board the filesystem is in that flash too
        shutil.rmtree(self.fs_dir, ignore_errors=True)

    # -- life cycle
    def start(self) -> str:
        """Make the port, open the control socket and power the board on."""
        try:
            path = self.port.plug()
        except OSError as exc:
            raise VBoardError(f"cannot make the port: {exc}") from None
        try:
            self.control = ControlServer(self, self.control_path)
        except OSError as exc:
            self.port.unplug()
            raise VBoardError(f"{self.control_path}: cannot listen: {exc.strerror or exc}") from None
        self._watch_port()
        self._boot(PWRON_RESET)
        return path

    def run(self) -> None:
        while not self._stopping:
            now = time.monotonic()
            timeout = 0.2 if not self._timers else max(0.0, min(0.2, self._timers[0][0] - now))
            for key, events in self.sel.select(timeout):
                key.data(events)
            while self._timers and self._timers[0][0] <= time.monotonic():
                _, _, fn = heapq.heappop(self._timers)
                fn()

    def stop(self) -> None:
        self._stopping = True

    def close(self) -> None:
        self._stop_console()
        if self.control is not None:
            self.control.close()
        self.port.unplug()
        self.flash.close()
        if self._own_state:
            shutil.rmtree(self.state, ignore_errors=True)

    def later(self, seconds: float, fn) -> list:
        entry = [time.monotonic() + seconds, next(self._seq), fn]
        heapq.heappush(self._timers, entry)
        return entry

    def cancel(self, entry) -> None:
        if entry is not None:
            entry[2] = lambda: None

    def watch(self, fileobj, events, handler) -> None:
        self.sel.register(fileobj, events, handler)

    def unwatch(self, fileobj) -> None:
        try:
            self.sel.unregister(fileobj)
        except (KeyError, ValueError):
            pass

    # -- booting
    def _boot(self, cause: int, soft=False, raw=False, interrupted=False) -> None:
        self._stop_console()
        self.cancel(self._wake)
        if not soft and self.world["pins"].get("0") == 0:
            self.enter_bootloader("GPIO 0 held low at reset", banner=True)
            return
        if not soft:
            self.cause = cause
        self.mode = "micropython"
        self.rom = None
        self.boots += 1
        self._fresh_fs()
        name = self.chip.upper().replace("-", "")
        cfg = {"soft": soft, "raw": raw, "interrupted": interrupted,
               "machine": f"{self.profile['name']} (vboard) with {name}",
               "banner": "MPY: soft reboot\r\n" if soft else
                         f"rst:{_ROM_RST[self.cause]},boot:0x13 (SPI_FAST_FLASH_BOOT)\r\n",
               "board": {"profile": self.profile, "mac": self.mac, "reset_cause": self.cause,
                         "world": self.world, "scenario": self.scenario,
                         "seed": int(self.mac[-6:], 16)}}
        if interrupted:
            cfg["banner"] = ("Traceback (most recent call last):\r\n  File \"<stdin>\", line 1, in <module>\r\n"
                             "KeyboardInterrupt: \r\n")
        try:
            self.console = Console(cfg, self.fs_dir)
        except ConsoleError as exc:
            self.log(f"cannot run MicroPython: {exc}")
            self.mode = "off"
            return
        c = self.console
        self.watch(c.stdout, selectors.EVENT_READ, lambda _ev: self._on_console_output(c))
        self.watch(c.ctl, selectors.EVENT_READ, lambda _ev: self._on_console_ctl(c))

    def _stop_console(self) -> None:
        c, self.console = self.console, None
        if c is not None:
            self.unwatch(c.stdout)
            self.unwatch(c.ctl)
            c.kill()

    def _on_console_output(self, c: Console) -> None:
        if c is not self.console:
            return  # a boot that just ended (its event came in the same batch)
        data = c.read()
        if data:
            self.port.send(data)
            self._watch_port()
        elif data is None:
            self._console_ended(c)

    def _on_console_ctl(self, c: Console) -> None:
        if c is not self.console:
            return
        if not c.read_ctl():
            self.unwatch(c.ctl)

    def _console_ended(self, c: Console) -> None:
        self.unwatch(c.stdout)
        self.unwatch(c.ctl)
        while _readable(c.ctl) and c.read_ctl():
            pass  # the reset message the VM sent before it ended
        code = c.wait()
        self.console = None
        delay = (c.reset or {}).get("delay_ms", 0) / 1000
        if code == SOFT_REBOOT:
            self._boot(self.cause, soft=True)
        elif code == SOFT_REBOOT_RAW:
            self._boot(self.cause, soft=True, raw=True)
        elif code == BOOTLOADER:
            self.enter_bootloader("machine.bootloader()")
        elif _EXIT_HARD < code < _EXIT_HARD + 10:
            cause = code - _EXIT_HARD
            self.log(f"reset ({CAUSES.get(cause, cause)})")
            if delay > 0:
                self.mode = "asleep"
                self._wake = self.later(delay, lambda: self._boot(cause))
            else:
                self._boot(cause)
        elif time.monotonic() - c.started < 2:
            self.log(f"the MicroPython VM failed as it started (exit code {code}); the board stays off "
                     "until a reset or power cycle")
            self.mode = "off"
        else:
            self.log(f"the MicroPython VM failed (exit code {code}); the board restarts, as after a panic")
            self._boot(HARD_RESET)

    # -- the bootloader
    def enter_bootloader(self, why: str, banner: bool = False) -> None:
        """Reset into the ROM's serial download mode."""
        self._stop_console()
        self.cancel(self._wake)
        self.mode = "bootloader"
        self.rom = Rom(CHIPS[self.chip], self.flash, bytes.fromhex(self.mac), on_erase_all=self._erase_fs)
        self.log(f"bootloader ({why})")
        if banner:
            self.port.send(_DOWNLOAD_BANNER)

    def _to_rom(self, data: bytes) -> None:
        rom = self.rom
        self.port.send(rom.feed(data))
        self._watch_port()
        if rom.exit:
            self.log(f"esptool left the bootloader ({rom.exit})")
            self._boot(HARD_RESET)

    # -- the serial port
    def _watch_port(self) -> None:
        present = self.port.host_present()
        if present:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.port.pending() else 0)
            if self._port_watched:
                self.sel.modify(self.port.master, events, self._on_port)
            else:
                self.watch(self.port.master, events, self._on_port)
                self._port_watched = True
        else:
            if self._port_watched:
                # no one has the port open: watching it would only report the hang-up
                self.unwatch(self.port.master)
                self._port_watched = False
                self._host_closed()
            if not self._checking:
                self._checking = True
                self.later(0.05, self._check_host)

    def _check_host(self) -> None:
        # polled while no one has the port open, until someone opens it
        self._checking = False
        if not self._port_watched and self.port.plugged:
            self._watch_port()

    def _on_port(self, events) -> None:
        if not self._port_watched:
            return  # unplugged earlier in this batch of events
        if events & selectors.EVENT_WRITE:
            self.port.flush()
        if events & selectors.EVENT_READ:
            data = self.port.read()
            if data is None:
                self._watch_port()  # the host closed the port
                return
            if data:
                self._from_host(data)
        if self._port_watched and self.port.plugged:
            self._watch_port()

    def _host_closed(self) -> None:
        rom = self.rom
        if self.mode == "bootloader" and rom is not None and rom.active and not rom.stay:
            # esptool's default --after hard-reset toggles RTS, which a pty cannot
            # carry: the port closing is the end of its session
            self.log("the host closed the port after esptool: hard reset")
            self._boot(HARD_RESET)

    def _from_host(self, data: bytes) -> None:
        if self.mode == "bootloader":
            self._to_rom(data)
            return
        data, self._held = self._held + data, b""
        i = data.find(SYNC_FRAME)
        if i >= 0:
            # esptool is talking: on a board it would have reset the chip into
            # the bootloader with DTR/RTS first
            self._to_console(data[:i])
            self.enter_bootloader("esptool's SYNC on the line")
            self._to_rom(data[i:])
            return
        j = data.rfind(b"\xc0")
        if j >= 0 and SYNC_FRAME.startswith(data[j:]):
            data, self._held = data[:j], data[j:]  # maybe the start of a SYNC: wait for the rest
            self.later(0.1, self._release_held)
        self._to_console(data)

    def _release_held(self) -> None:
        held, self._held = self._held, b""
        if held and self.mode == "micropython":
            self._to_console(held)

    def _to_console(self, data: bytes) -> None:
        c = self.console
        if not data or self.mode != "micropython" or c is None:
            return
        i = data.find(b"\x03")
        if i >= 0 and c.stuck():
            # Ctrl-C, but the VM is busy in code it cannot be interrupted in (a
            # loop with no await): end that boot and give the REPL, without
            # running boot.py or main.py again
            self.log("Ctrl-C while the VM is busy: restarting it into the REPL")
            self._boot(self.cause, soft=True, interrupted=True)
            self.console.write(data[i + 1:])
            return
        c.write(data)

    # -- what the rig does (control.py)
    def power_cycle(self) -> None:
        """Power off and on: the VM ends at once, nothing more is written."""
        self.log("power cycle")
        self._boot(PWRON_RESET)

    def reset(self) -> None:
        """The EN pin: a hard reset (also ends the bootloader)."""
        self.log("reset (EN)")
        self._boot(HARD_RESET)

    def apply(self, section: str, values: dict, done) -> None:
        """Set pins / ADC levels / faults in the world; done(error or None)
        once the running VM has them (at once when no VM runs)."""
        for k, v in values.items():
            if section == "faults" and v in ("none", "garbage"):
                self.world[section].pop(k, None)  # garbage is a one-off
            elif section == "pins" and v is None:
                self.world[section].pop(k, None)
            else:
                self.world[section][k] = v
        self.send_vm({"cmd": section, "set": values}, done)

    def send_vm(self, msg: dict, done) -> None:
        """A rig command for the running VM; done(error or None) once applied.
        With no VM running, or one busy where it cannot listen, done at once:
        the next boot starts from self.world anyway."""
        c = self.console
        if c is None or c.stuck():
            if c is not None:
                c.request(msg, lambda _error: None)
            done(None)
        else:
            c.request(msg, done)

    def unplug(self) -> None:
        self._unwatch_port()
        self.port.unplug()
        self.log("unplugged")

    def _unwatch_port(self) -> None:
        if self._port_watched:
            self.unwatch(self.port.master)
            self._port_watched = False

    def plug(self) -> str:
        if self.port.plugged:
            return self.port.path
        path = self.port.plug()
        print(path, flush=True)  # the new port, as the first line was
        self.log(f"plugged in at {path}")
        self._watch_port()
        return path

    def status(self) -> dict:
        return {"mode": self.mode, "port": self.port.path if self.port.plugged else None,
                "plugged": self.port.plugged, "host": self.port.host_present(),
                "chip": self.chip, "board": self.profile["name"], "mac": self.mac,
                "boots": self.boots, "reset_cause": CAUSES[self.cause],
                "state": str(self.state), "world": self.world}


def _readable(sock) -> bool:
    return bool(select.select([sock], [], [], 0)[0])
