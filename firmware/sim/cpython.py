# The one place that adapts CPython to run the firmware unchanged: it adds
# the MicroPython-only names the firmware uses. Host-only; never on a board.
import asyncio
import gc
import sys
import time
import types

_PERIOD = 1 << 30
_T0 = time.monotonic_ns()


def _ticks_ms():
    return ((time.monotonic_ns() - _T0) // 1000000) & (_PERIOD - 1)


def _ticks_us():
    return ((time.monotonic_ns() - _T0) // 1000) & (_PERIOD - 1)


def _ticks_add(t, d):
    return (t + d) & (_PERIOD - 1)


def _ticks_diff(a, b):
    return ((a - b + _PERIOD // 2) & (_PERIOD - 1)) - _PERIOD // 2


async def _sleep_ms(ms):
    await asyncio.sleep(ms / 1000)


async def _wait_for_ms(aw, ms):
    return await asyncio.wait_for(aw, ms / 1000)


def _const(x):
    return x


def install():
    """Idempotent: make `time`, `asyncio`, `gc` and `micropython` look like
    MicroPython's to the firmware."""
    if getattr(time, "ticks_ms", None) is _ticks_ms:
        return
    time.ticks_ms = _ticks_ms
    time.ticks_us = _ticks_us
    time.ticks_cpu = _ticks_us
    time.ticks_add = _ticks_add
    time.ticks_diff = _ticks_diff
    time.sleep_ms = lambda ms: time.sleep(ms / 1000)
    time.sleep_us = lambda us: time.sleep(us / 1e6)
    asyncio.sleep_ms = _sleep_ms
    asyncio.wait_for_ms = _wait_for_ms
    gc.mem_alloc = lambda: 0
    gc.mem_free = lambda: 4 * 1024 * 1024
    mp = types.ModuleType("micropython")
    mp.const = _const
    mp.native = mp.viper = lambda f: f
    mp.schedule = lambda f, arg: f(arg)
    sys.modules.setdefault("micropython", mp)
