"""The rig's side of a vboard: a UNIX socket speaking JSON lines.

One request per line, one answer per line: ``{"cmd": "adc", "pin": 4,
"volts": 1.2}`` gets ``{"ok": true, ...}`` or ``{"ok": false, "error": why}``.
Commands (docs/hil.md has examples):

    status                           mode, port, boots, reset cause, the world
    power-cycle                      power off and on: nothing unwritten survives
    reset                            the EN pin: a hard reset (ends the bootloader)
    bootloader                       reset into the ROM's download mode
    pin        pin, level            drive a GPIO from outside (level null: let go)
    pulse      pin, level, ms        drive it for ms, then back as it was
    adc        pin, raw | volts      an ADC input level: counts 0..65535, or volts
                                     (full scale 2.45 V, as read with 11 dB attenuation)
    fault      sensor, fault         "silent" (I2C part NACKs / UART part sends
                                     nothing), "garbage" (noise bytes on its UART,
                                     once) or "none"
    unplug / plug                    pull / put back the USB cable (the port path may change)

Pins, ADC levels and faults are the world around the board: they stay set
across resets and power cycles until changed.

    python -m tools.vboard.control DIR/control.sock adc pin=4 volts=1.2
"""
from __future__ import annotations

import json
import selectors
import socket
import stat
import sys
from pathlib import Path

from tools.boards import config as _node_config

ADC_FULL_SCALE_V = 2.45


class ControlError(Exception):
    """A rig command refused (bad arguments), or the vboard's answer to one."""


def _int(req, key, lo, hi):
    v = req.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ControlError(f"{key}: want an integer {lo}..{hi}, not {v!r}")
    return v


def _pin(board, req):
    gpios = _node_config.CHIPS[board.profile["chip"]]["gpios"] if board.profile["chip"] in \
        _node_config.CHIPS else 49
    return _int(req, "pin", 0, gpios - 1)


def _level(req, allow_none=False):
    v = req.get("level")
    if v is None and allow_none:
        return None
    if v not in (0, 1) or isinstance(v, bool):
        raise ControlError(f"level: want 0 or 1{' or null (let go)' if allow_none else ''}, not {v!r}")
    return v


def _sensor(board, name):
    for s in board.profile["sensors"]:
        if s["name"] == name:
            return s
    names = ", ".join(s["name"] for s in board.profile["sensors"])
    raise ControlError(f"sensor {name!r} is not on board {board.profile['name']} (it has {names})")


def _ok(reply, **extra):
    def done(error):
        reply({"ok": False, "error": error} if error else dict(extra, ok=True))
    return done


def cmd_status(board, req, reply):
    reply(dict(board.status(), ok=True))


def cmd_power_cycle(board, req, reply):
    board.power_cycle()
    reply({"ok": True})


def cmd_reset(board, req, reply):
    board.reset()
    reply({"ok": True})


def cmd_bootloader(board, req, reply):
    board.enter_bootloader("the rig", banner=True)
    reply({"ok": True})


def cmd_pin(board, req, reply):
    pin, level = _pin(board, req), _level(req, allow_none=True)
    board.apply("pins", {str(pin): level}, _ok(reply, pin=pin, level=level))


def cmd_pulse(board, req, reply):
    pin, level, ms = _pin(board, req), _level(req), _int(req, "ms", 1, 600_000)
    board.send_vm({"cmd": "pulse", "pin": pin, "level": level, "ms": ms}, _ok(reply))


def cmd_adc(board, req, reply):
    pin = _pin(board, req)
    if "volts" in req:
        v = req["volts"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 3.3:
            raise ControlError(f"volts: want a number 0..3.3, not {v!r}")
        counts = min(65535, round(v / ADC_FULL_SCALE_V * 65535))
    else:
        counts = _int(req, "raw", 0, 65535)
    board.apply("adc", {str(pin): counts}, _ok(reply, pin=pin, raw=counts))


def cmd_fault(board, req, reply):
    s = _sensor(board, req.get("sensor"))
    fault = req.get("fault")
    bus = s.get("bus", "")
    allowed = {"i2c": ("silent", "none"), "uart": ("silent", "garbage", "none")}.get(bus.split(".")[0])
    if allowed is None:
        raise ControlError(f"sensor {s['name']} ({s['kind']}) is not on a bus: drive its pins "
                           "(pin, pulse) or its ADC input (adc) instead")
    if fault not in allowed:
        raise ControlError(f"fault: want one of {', '.join(allowed)} for {s['name']} on {bus}, not {fault!r}")
    board.apply("faults", {s["name"]: fault}, _ok(reply, sensor=s["name"], fault=fault))


def cmd_unplug(board, req, reply):
    board.unplug()
    reply({"ok": True})


def cmd_plug(board, req, reply):
    reply({"ok": True, "port": board.plug()})


COMMANDS = {
    "status": cmd_status, "power-cycle": cmd_power_cycle, "reset": cmd_reset,
    "bootloader": cmd_bootloader, "pin": cmd_pin, "pulse": cmd_pulse, "adc": cmd_adc,
    "fault": cmd_fault, "unplug": cmd_unplug, "plug": cmd_plug,
}


class ControlServer:
    """The listening socket and its clients, served from the vboard's event loop."""

    def __init__(self, board, path: Path):
        self.board = board
        self.path = Path(path)
        if self.path.exists() and stat.S_ISSOCK(self.path.stat().st_mode):
            self.path.unlink()  # left by a vboard that was killed
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(self.path))
        self.sock.listen(8)
        self.sock.setblocking(False)
        self.clients: dict = {}
        board.watch(self.sock, selectors.EVENT_READ, self._accept)

    def _accept(self, _events):
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        self.clients[conn] = b""
        self.board.watch(conn, selectors.EVENT_READ, lambda ev, c=conn: self._read(c))

    def _read(self, conn):
        if conn not in self.clients:
            return  # dropped earlier in this batch of events
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return
        except ConnectionResetError:
            data = b""
        if not data:
            self._drop(conn)
            return
        *lines, self.clients[conn] = (self.clients[conn] + data).split(b"\n")
        for line in lines:
            if line.strip():
                self.handle(line, lambda answer, c=conn: self._send(c, answer))

    def handle(self, line: bytes, reply) -> None:
        """Run one request line; reply(answer) is called once."""
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError
        except ValueError:
            reply({"ok": False, "error": "not a JSON object: " + line[:80].decode(errors="replace")})
            return
        fn = COMMANDS.get(req.get("cmd"))
        if fn is None:
            reply({"ok": False, "error": f"unknown command {req.get('cmd')!r}; commands: {', '.join(COMMANDS)}"})
            return
        try:
            fn(self.board, req, reply)
        except ControlError as exc:
            reply({"ok": False, "error": str(exc)})

    def _send(self, conn, answer: dict) -> None:
        try:
            conn.setblocking(True)
            conn.sendall((json.dumps(answer) + "\n").encode())
            conn.setblocking(False)
        except OSError:
            self._drop(conn)

    def _drop(self, conn):
        self.board.unwatch(conn)
        self.clients.pop(conn, None)
        conn.close()

    def close(self):
        for conn in list(self.clients):
            self._drop(conn)
        self.board.unwatch(self.sock)
        self.sock.close()
        self.path.unlink(missing_ok=True)


def request(path, cmd: str, timeout: float = 15, **args) -> dict:
    """Send one command to the vboard listening on path; return its answer.
    Raises ControlError when the vboard refuses it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except OSError as exc:
            raise ControlError(f"{path}: no vboard listening ({exc.strerror or exc})") from None
        s.sendall((json.dumps(dict(args, cmd=cmd)) + "\n").encode())
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise ControlError(f"{path}: the vboard closed the connection")
            buf += chunk
    answer = json.loads(buf)
    if not answer.get("ok"):
        raise ControlError(answer.get("error", "refused"))
    return answer


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or args[0] in ("-h", "--help"):
        print("usage: python -m tools.vboard.control SOCKET COMMAND [key=value ...]\n\n"
              "commands: " + ", ".join(COMMANDS) + " (see docs/hil.md)")
        return 0 if args and args[0] in ("-h", "--help") else 2
    kw = {}
    for a in args[2:]:
        k, sep, v = a.partition("=")
        if not sep:
            print(f"tools.vboard.control: {a!r}: want key=value", file=sys.stderr)
            return 2
        try:
            kw[k] = json.loads(v)
        except ValueError:
            kw[k] = v
    try:
        print(json.dumps(request(args[0], args[1], **kw)))
    except ControlError as exc:
        print(f"tools.vboard.control: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
