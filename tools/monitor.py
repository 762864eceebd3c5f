"""A serial console for a board: every line it prints, with the time it arrived.

    python -m tools.monitor --port /dev/ttyUSB0 [--baud 115200] [--log board.log] [--follow]

Lines are shown as `12:00:01.234  <line>`; on a terminal, errors
(tracebacks, `E (...)` lines, `critical`) are red, warnings (`W (...)`,
`safe mode`, `warning`) yellow and debug lines dim. `--log FILE` appends
every line with its full UTC time (no colours). Ctrl-C exits. When the port
goes away (board unplugged, or reset through USB) the monitor says so and
exits 1, or with `--follow` waits for the port to come back and carries on.

It only listens: for an interactive REPL use `mpremote connect PORT repl`
(close the monitor first: one program at a time on a port). The Python
function is `monitor()`.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone

import serial

PROG = "tools.monitor"
_IDLE_FLUSH_S = 1.0  # a line without its newline (a prompt) is shown after this long
_RETRY_S = 0.5
COLOURS = {"error": "\x1b[31m", "warning": "\x1b[33m", "debug": "\x1b[2m"}
_RESET = "\x1b[0m"
_LEVELS = (
    ("error", re.compile(r"^E \(\d+\)|Traceback \(most recent call last\)|^\w*(Error|Exception)\b|"
                         r"\bcritical\b|\bCRITICAL\b|\bpanic\b|Guru Meditation", re.I)),
    ("warning", re.compile(r"^W \(\d+\)|\bsafe mode\b|\bwarning\b|\brst:0x", re.I)),
    ("debug", re.compile(r"^[DV] \(\d+\)")),
)


class MonitorError(Exception):
    """The port cannot be opened, or went away."""


def level(line: str) -> str | None:
    """"error", "warning", "debug" or None (plain) for one console line."""
    for name, pattern in _LEVELS:
        if pattern.search(line):
            return name
    return None


def stamp(line: str, now: datetime, colour: bool) -> str:
    """The console form of a line: local time to the millisecond, then the line (coloured by level)."""
    text = f"{now.astimezone().strftime('%H:%M:%S.%f')[:-3]}  {line}"
    lvl = level(line) if colour else None
    return f"{COLOURS[lvl]}{text}{_RESET}" if lvl else text


def open_port(port: str, baud: int) -> serial.Serial:
    if not os.path.exists(port) and "://" not in port:
        raise MonitorError(f"port {port}: no such device; is the board plugged in? "
                           "(`ls /dev/ttyUSB* /dev/ttyACM*` lists the serial ports)")
    try:
        return serial.serial_for_url(port, baudrate=baud, timeout=0.1, exclusive=True)
    except (serial.SerialException, OSError) as exc:
        raise MonitorError(f"port {port}: cannot open it ({exc}); is another program (mpremote, a monitor, "
                           "tools.provision) using it?") from None


def lines(ser: serial.Serial, port: str) -> Iterator[str | None]:
    """The port's lines as text (no line ending), a pending partial line after a second of quiet,
    None after each quiet tenth of a second; MonitorError when the port goes away."""
    pending = b""
    last = time.monotonic()
    while True:
        try:
            chunk = ser.read(ser.in_waiting or 1)
        except (serial.SerialException, OSError, TypeError):
            if pending:
                yield pending.decode("utf-8", "replace").rstrip("\r")
            raise MonitorError(f"port {port} went away (board unplugged?)") from None
        now = time.monotonic()
        if chunk:
            pending += chunk
            last = now
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                yield line.decode("utf-8", "replace").rstrip("\r")
        elif pending and now - last >= _IDLE_FLUSH_S:
            yield pending.decode("utf-8", "replace").rstrip("\r")
            pending = b""
        elif "://" not in port and not os.path.exists(port):
            raise MonitorError(f"port {port} went away (board unplugged?)")
        else:
            yield None


def monitor(port: str, baud: int = 115200, log: str | None = None, follow: bool = False,
            out=None, colour: bool | None = None, say: Callable[[str], None] | None = None,
            stop: Callable[[], bool] = lambda: False) -> int:
    """Print the board's lines on `out` (default stdout) until `stop()` or Ctrl-C; return the lines shown.

    `colour` defaults to "out is a terminal". With `follow`, a port that goes
    away is waited for and reopened; otherwise MonitorError. `say` gets the
    monitor's own messages (default: stderr).
    """
    out = out or sys.stdout
    colour = out.isatty() if colour is None else colour
    say = say or (lambda m: print(f"{PROG}: {m}", file=sys.stderr, flush=True))
    logfile = None
    if log:
        try:
            logfile = open(log, "a", encoding="utf-8")
        except OSError as exc:
            raise MonitorError(f"--log {log}: cannot open it ({exc.strerror or exc})") from None
    shown = 0

    def show(line: str) -> None:
        now = datetime.now(timezone.utc)
        out.write(stamp(line, now, colour) + "\n")
        out.flush()
        if logfile:
            logfile.write(f"{now.isoformat(timespec='milliseconds').replace('+00:00', 'Z')}  {line}\n")
            logfile.flush()

    ser = None
    try:
        ser = open_port(port, baud)
        say(f"listening on {port} at {baud} baud (Ctrl-C to stop)")
        while ser is not None:
            try:
                for line in lines(ser, port):  # endless: left by break or MonitorError
                    if line is not None:
                        show(line)
                        shown += 1
                    if stop():
                        break
                break
            except MonitorError as exc:
                ser.close()
                ser = None
                if not follow:
                    raise
                say(f"{exc}; waiting for it to come back (Ctrl-C to stop)")
                ser = _reopen(port, baud, stop)
                if ser is not None:
                    say(f"{port} is back")
    finally:
        if ser is not None:
            ser.close()
        if logfile:
            logfile.close()
    return shown


def _reopen(port: str, baud: int, stop: Callable[[], bool]) -> serial.Serial | None:
    while not stop():
        time.sleep(_RETRY_S)
        try:
            return open_port(port, baud)
        except MonitorError:
            continue
    return None


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="Show a board's serial console with timestamps.")
    ap.add_argument("--port", required=True, help="the board's serial port (/dev/ttyUSB0)")
    ap.add_argument("--baud", type=int, default=115200, help="baud rate (default 115200, MicroPython's)")
    ap.add_argument("--log", default=None, help="also append every line, with its UTC time, to this file")
    ap.add_argument("--follow", action="store_true",
                    help="when the port goes away, wait for it to come back instead of exiting")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        monitor(args.port, args.baud, args.log, args.follow)
    except MonitorError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
