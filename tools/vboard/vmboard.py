# The virtual board as firmware sees it, inside the MicroPython VM (loaded by
# repl.mjs; host-only, never on a board).
#
# setup() builds the simulated board from the board profile with
# sim.virtual.make_board and installs it as `machine`, with a `network` whose
# WLAN is always in reach of the host's network and, on boards with a BLE
# counter, a `bluetooth` radio. The parts around the board follow sim.virtual's
# scenario (weather, people, charging, the river), once a second ("live") or
# frozen at their first values ("still"). Then the board's own filesystem
# (the state directory) is mounted at /.
#
# The VM cannot block, so asyncio.run() starts its coroutine as a task and
# returns; the console (repl.mjs) waits for such tasks before it shows the next
# prompt, as a board does, and Ctrl-C cancels them. machine.reset() and
# friends end the VM process with an exit code that names the reset cause.
import asyncio
import builtins
import io
import json
import os
import sys
import time
import vfs

import js
from sim import vmnet  # TCP to the host through tools/mpvm/hostnet.mjs
from sim.clock import PacedClock
from sim.machine import SOFT_RESET, DEEPSLEEP_RESET

_SOFT_REBOOT = 10  # exit codes read by tools/vboard/console.py
_HARD_RESET = 20   # + reset cause
_BOOTLOADER = 30

_KBD = "Traceback (most recent call last):\n  File \"<stdin>\", line 1, in <module>\nKeyboardInterrupt: \n"

board = None     # the Machine
devices = None   # {kind: simulated part}
world = None     # the Surroundings
_g = None        # __main__'s globals: shared by boot.py, main.py and both REPLs
_tasks = []      # tasks started by asyncio.run and not finished
_levels = {}     # pin -> level the rig holds it at (None: let go)
_errors = []


class _Stub:
    Node = None


class _Namespace:
    pass


def _import_sim_virtual():
    # sim.virtual imports node.app for VirtualNode; the firmware a board runs
    # is the one on its filesystem, loaded later, so stand in for it here
    had = [k for k in ("node", "node.app") if k in sys.modules]
    if not had:
        sys.modules["node"] = sys.modules["node.app"] = _Stub
    try:
        import sim.virtual
    finally:
        if not had:
            del sys.modules["node"]
            del sys.modules["node.app"]
    return sim.virtual


def setup(cfg_json):
    """Build the board from the boot configuration (JSON from console.py) and
    mount its filesystem at /."""
    global board, devices, world, _g
    cfg = json.loads(cfg_json)
    virtual = _import_sim_virtual()
    profile = cfg["profile"]
    uid = bytes.fromhex(cfg["mac"])
    clock = PacedClock(step_ms=20)
    ble = None
    if any(s["kind"] == "ble_counter" for s in profile["sensors"]):
        from sim.ble import SimBLE
        ble = SimBLE(clock)
    world = _surroundings(virtual)(profile, clock, uid, ble, cfg.get("seed", 0))
    board, devices = world.machine, world.devices
    board._cause = cfg["reset_cause"]
    board.reset = lambda: _exit(_HARD_RESET + SOFT_RESET)  # ESP32: a software reset
    board.soft_reset = lambda: _exit(_SOFT_REBOOT)
    board.deepsleep = lambda ms=0: _exit(_HARD_RESET + DEEPSLEEP_RESET, ms)
    board_time = _BoardTime(time, clock)
    board.lightsleep = lambda ms=0: board_time.sleep_ms(ms)
    board.bootloader = lambda: _exit(_BOOTLOADER)
    sys.modules["machine"] = board
    sys.modules["network"] = _network(uid, cfg.get("rssi", -60))
    if ble is not None:
        bt = _Namespace()
        bt.BLE = lambda: ble
        sys.modules["bluetooth"] = bt
    asyncio.run = _run
    asyncio.open_connection = vmnet.open_connection
    sys.modules["os"] = _BoardOS(os)
    sys.modules["time"] = board_time
    builtins.open = _board_errno(open)
    for cmd, values in cfg.get("world", {}).items():
        control(json.dumps({"cmd": cmd, "set": values}))
    asyncio.create_task(clock.run())
    if cfg.get("scenario", "live") == "live":
        asyncio.create_task(_live(world))
    import __main__
    _g = __main__.__dict__
    vfs.umount("/")
    vfs.mount(vfs.VfsPosix("/board"), "/")
    os.chdir("/")


def _surroundings(virtual):
    class Surroundings(virtual.VirtualNode):
        """sim.virtual's scenario around a board, without a node of its own:
        the board runs whatever firmware its filesystem holds."""

        def __init__(self, profile, clock, uid, ble, seed):
            self.clock = clock
            self.profile = profile
            self.machine, self.devices = virtual.make_board(profile, clock, uid, ble)
            self.scenario = virtual.Scenario(seed, 10.0)
            self.t0 = clock.ticks_ms()
            self.tick = 0
            self.adc = {}  # pin -> counts set by the rig, kept over the scenario
            self.update()

        def update(self):
            virtual.VirtualNode.update(self)
            for pin, counts in self.adc.items():
                self.machine.adc_source(pin, counts)
    return Surroundings


async def _live(w):
    while True:
        await asyncio.sleep_ms(1000)
        w.update()


def _network(uid, rssi):
    # the host's network is always in reach; connect() only records the SSID
    class WLAN:
        def __init__(self, interface=0):
            self._active = False
            self._ssid = None

        def active(self, on=None):
            if on is None:
                return self._active
            self._active = bool(on)

        def connect(self, ssid=None, key=None, **kw):
            self._ssid = ssid

        def disconnect(self):
            self._ssid = None

        def isconnected(self):
            return self._active and self._ssid is not None

        def status(self, param=None):
            if param == "rssi":
                return rssi
            return 1010 if self.isconnected() else 1000  # STAT_GOT_IP / STAT_IDLE

        def ifconfig(self, *args):
            return ("127.0.0.1", "255.0.0.0", "127.0.0.1", "127.0.0.1")

        def config(self, name=None, **kw):
            if name == "mac":
                return uid
            if name == "ssid":
                return self._ssid
            return None

    n = _Namespace()
    n.WLAN = WLAN
    n.STA_IF, n.AP_IF = 0, 1
    n.STAT_IDLE, n.STAT_GOT_IP = 1000, 1010
    return n


# errno numbers: VfsPosix in the VM raises Emscripten's (ENOENT is 44), a board
# raises MicroPython's (ENOENT is 2), which firmware and mpremote expect
_ERRNO = {63: 1, 44: 2, 29: 5, 8: 9, 6: 11, 48: 12, 2: 13, 10: 16, 20: 17, 43: 19, 54: 20,
          31: 21, 28: 22, 22: 27, 51: 28, 69: 30, 37: 36, 55: 39, 138: 95}


def _board_errno(fn):
    def call(*args, **kw):
        try:
            return fn(*args, **kw)
        except OSError as e:
            n = e.args[0] if e.args else None
            if isinstance(n, int) and n in _ERRNO:
                raise OSError(_ERRNO[n])
            raise
    return call


class _BoardOS:
    """`os` as firmware on a board sees it: the board's errno numbers, and
    ilistdir() entries with their size, as littlefs gives them."""

    def __init__(self, real):
        self._os = real

    def __getattr__(self, name):
        v = getattr(self._os, name)
        if callable(v):
            v = _board_errno(v)
            setattr(self, name, v)
        return v

    def rename(self, old, new):
        # VfsPosix mounted with a root renames a path onto itself in 1.27 (both
        # paths share one buffer): rename in the VM's filesystem directly
        e = js.vboardRename(_vm_path(old), _vm_path(new))
        if e:
            raise OSError(_ERRNO.get(e, e))

    def ilistdir(self, path="."):
        entries = _board_errno(self._os.ilistdir)(path)
        return self._sized(path, entries)

    def _sized(self, path, entries):
        for e in entries:
            size = 0
            if e[1] == 0x8000:
                try:
                    size = self._os.stat(path.rstrip("/") + "/" + e[0])[6]
                except OSError:
                    pass
            yield (e[0], e[1], e[2], size)


class _BoardTime:
    """`time` whose blocking sleeps let the simulated parts live through them
    (their clock follows real time at each asyncio sleep and after these)."""

    def __init__(self, real, clock):
        self._time = real
        self._clock = clock

    def __getattr__(self, name):
        v = getattr(self._time, name)
        setattr(self, name, v)
        return v

    def sleep_ms(self, ms):
        self._time.sleep_ms(ms)
        self._clock.catch_up()

    def sleep_us(self, us):
        self._time.sleep_us(us)
        self._clock.catch_up()

    def sleep(self, s):
        self._time.sleep(s)
        self._clock.catch_up()


def _vm_path(p):
    # a path on the board -> the same file in the VM's filesystem (under /board)
    if not p.startswith("/"):
        p = os.getcwd().rstrip("/") + "/" + p
    return "/board" + p


def _exit(code, delay_ms=0):
    # a reset: the VM process ends here (repl.mjs flushes the console first)
    js.vboardExit(code, delay_ms)


# -- running code for the console


def _run(coro):
    # asyncio.run in the VM: a task the console waits for
    t = asyncio.create_task(_main(coro))
    _tasks.append(t)


async def _main(coro):
    try:
        await coro
    except asyncio.CancelledError:
        _errors.append(_KBD)
    except SystemExit:
        _errors.append("\x1aexit")
    except BaseException as e:
        _errors.append(_traceback(e))
    finally:
        _tasks.remove(asyncio.current_task())
        if not _tasks:
            text = "".join(_errors)
            _errors.clear()
            js.vboardDone(text)


def _traceback(e, name="<stdin>"):
    b = io.StringIO()
    sys.print_exception(e, b)
    lines = [l for l in b.getvalue().split("\n") if "vmboard.py" not in l]
    return "\n".join(lines).replace('"<string>"', '"%s"' % name)


def pending():
    """How many asyncio.run tasks are still running."""
    return len(_tasks)


def watchdog():
    """1 when the firmware started machine.WDT and stopped feeding it."""
    return 1 if _tasks and board.wdt_expired() else 0


def interrupt():
    """Ctrl-C: cancel what asyncio.run started."""
    for t in _tasks:
        t.cancel()


def run_file(name):
    """Run boot.py or main.py as a board does at reset: '' when it ended (errors
    printed), 'wait' while its asyncio.run tasks run, '\\x1aexit' on sys.exit()."""
    try:
        with open(name) as f:
            src = f.read()
    except OSError:
        return ""
    try:
        exec(src, _g)
    except SystemExit:
        return "\x1aexit"
    except BaseException as e:
        print(_traceback(e, name), end="")
    return "wait" if _tasks else ""


def run_raw(code):
    """Run one raw-REPL command: '' when done, 'wait' while asyncio.run tasks
    it started run, '\\x1aexit' on sys.exit(), else the traceback to show."""
    try:
        exec(code, _g)
    except SystemExit:
        return "\x1aexit"
    except BaseException as e:
        return _traceback(e)
    return "wait" if _tasks else ""


# -- the rig's side: pins, ADC levels, faults (see docs/hil.md)


def control(req_json):
    """Apply one rig command; return '' or why it cannot be done."""
    req = json.loads(req_json)
    cmd = req.get("cmd")
    try:
        if cmd == "pins":  # {pin: level, or None to let go}
            for pin, level in req["set"].items():
                _levels[int(pin)] = level
                _drive(int(pin), level)
        elif cmd == "pulse":
            asyncio.create_task(_pulse(req["pin"], req["level"], req["ms"]))
        elif cmd == "adc":  # {pin: counts 0..65535}
            for pin, counts in req["set"].items():
                world.adc[int(pin)] = counts
                board.adc_source(int(pin), counts)
        elif cmd == "faults":  # {sensor name: "silent", "garbage" or "none"}
            for name, fault in req["set"].items():
                _fault(name, fault)
        else:
            return "unknown command %r" % cmd
    except Exception as e:
        return "%s: %s" % (type(e).__name__, e)
    return ""


def _drive(pin, level):
    # the rig drives a GPIO; an IRQ handler that fails is reported as a board does
    try:
        board.pin(pin).drive(level)
    except Exception as e:
        print("Unhandled exception in IRQ callback handler")
        sys.print_exception(e)


async def _pulse(pin, level, ms):
    # then back to what the rig holds the pin at (or let go)
    _drive(pin, level)
    await asyncio.sleep_ms(ms)
    _drive(pin, _levels.get(pin))


def _fault(name, fault):
    s = [x for x in world.profile["sensors"] if x["name"] == name][0]
    part = devices[s["kind"]]
    bus = s.get("bus", "")
    if bus.startswith("i2c."):
        i2c = board.i2c_bus(world.profile["i2c"][bus[4:]]["id"])
        if fault == "silent":
            i2c.detach(s["address"])  # the part NACKs: OSError(ENODEV)
        else:
            i2c.attach(s["address"], part)
    elif bus.startswith("uart."):
        port = board.uart_port(world.profile["uart"][bus[5:]]["id"])
        if fault == "silent":
            port.detach()
        elif fault == "garbage":
            port.attach(part)
            port.feed(b"\x00\x13\xff\x42\x4d\xaa")  # noise, with a false frame start
        else:
            port.attach(part)
