"""SimClock: virtual time with MicroPython ticks semantics.

Ticks wrap at 2**30 like on the board. Nothing here allocates on the
advance/sleep path (the sampler's allocation tests run through it), so time
is kept as wrapped ticks plus whole seconds, all small ints.
"""
import asyncio

TICKS_PERIOD = 1 << 30
_MASK = TICKS_PERIOD - 1
_HALF = TICKS_PERIOD >> 1
_CHUNK = 1 << 27  # longest single step, well inside ticks_diff's range

_yield_ms = getattr(asyncio, "sleep_ms", None)


def ticks_add(t, delta):
    if not -_HALF < delta < _HALF:
        raise OverflowError("ticks interval overflow")
    return (t + delta) & _MASK


def ticks_diff(a, b):
    return ((a - b + _HALF) & _MASK) - _HALF


class SimClock:
    """Drivable clock. Listeners are fn(now_ms) -> None or ms until the next
    call wanted; each is called at the times it asks for and at the end of
    every advance()."""

    ticks_add = staticmethod(ticks_add)
    ticks_diff = staticmethod(ticks_diff)

    def __init__(self, start_ms=0, utc=None):
        self._ms = start_ms & _MASK
        self._us = (start_ms * 1000) & _MASK
        self._sec = 0  # whole seconds elapsed
        self._msr = 0  # and the milliseconds past them
        self._listeners = []  # [fn, due ticks or None]
        self._jitter = None
        self._utc = None
        self.set_utc(utc)

    def ticks_ms(self):
        return self._ms

    def ticks_us(self):
        return self._us

    def add_listener(self, fn, due_ms=None):
        """Call fn(now_ms) at the end of each advance and, if due_ms is given,
        due_ms from now; fn returns the ms until its next call or None."""
        self._listeners.append([fn, None if due_ms is None else ticks_add(self._ms, max(due_ms, 1))])

    def remove_listener(self, fn):
        L = self._listeners
        for i in range(len(L)):
            if L[i][0] is fn:
                L.pop(i)
                return

    def _step(self, ms):
        if ms <= 0:
            return
        self._ms = (self._ms + ms) & _MASK
        self._us = (self._us + ms * 1000) & _MASK
        r = self._msr + ms
        if r >= 1000:
            self._sec += r // 1000
            r %= 1000
        self._msr = r

    def _call(self, ent):
        r = ent[0](self._ms)
        ent[1] = None if r is None else (self._ms + (r if r > 0 else 1)) & _MASK

    def advance(self, ms):
        """Move virtual time forward by ms, firing listeners on the way."""
        if ms < 0:
            raise ValueError("negative advance")
        while ms > _CHUNK:
            self._advance(_CHUNK)
            ms -= _CHUNK
        self._advance(ms)

    def _advance(self, ms):
        end = (self._ms + ms) & _MASK
        L = self._listeners
        while True:
            best = None
            bd = 0
            for ent in L:
                d = ent[1]
                if d is not None:
                    x = ticks_diff(d, end)
                    if x <= 0 and (best is None or x < bd):
                        best = ent
                        bd = x
            if best is None:
                break
            self._step(ticks_diff(best[1], self._ms))
            self._call(best)
        self._step(ticks_diff(end, self._ms))
        i = 0
        while i < len(L):
            self._call(L[i])
            i += 1

    def delay_ms(self, ms):
        # a driver's blocking wait: virtual time passes, nothing else runs
        self.advance(ms)

    def set_jitter(self, fn):
        """fn() -> extra ms added to every sleep_ms (None to remove)."""
        self._jitter = fn

    async def sleep_ms(self, ms):
        if self._jitter is not None:
            ms += self._jitter()
        if ms > 0:
            self.advance(ms)
        if _yield_ms is not None:
            await _yield_ms(0)
        else:
            await asyncio.sleep(0)

    def set_utc(self, seconds):
        """Set UTC (seconds since 1970) now; None means not set."""
        self._utc = None if seconds is None else (int(seconds), self._sec, self._msr)

    def utc(self):
        u = self._utc
        if u is None:
            return None
        return u[0] + (self._sec - u[1]) + (self._msr - u[2]) // 1000


class PacedClock(SimClock):
    """A SimClock that keeps pace with the host's real time, for virtual
    nodes in the demo and integration tests: simulated devices run on its
    listeners (timers, FIFOs at 100 Hz, rain tips) while the firmware waits
    in real time. catch_up() moves virtual time to the real time elapsed;
    run() calls it every few ms. UTC is set from the host."""

    def __init__(self, step_ms=5):
        import time
        SimClock.__init__(self, start_ms=0, utc=int(time.time()))
        self._time = time
        self._t0 = time.ticks_ms()
        self.step_ms = step_ms

    def catch_up(self):
        t = self._time
        behind = ticks_diff(ticks_diff(t.ticks_ms(), self._t0), self._ms)
        if behind > 0:
            self.advance(behind)

    async def sleep_ms(self, ms):
        if ms > 0:
            await asyncio.sleep_ms(ms) if _yield_ms else await asyncio.sleep(ms / 1000)
        else:
            await (asyncio.sleep_ms(0) if _yield_ms else asyncio.sleep(0))
        self.catch_up()

    async def run(self):
        while True:
            await self.sleep_ms(self.step_ms)
