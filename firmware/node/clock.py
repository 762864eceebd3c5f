# The real clock: MicroPython ticks, asyncio sleeps and UTC from the RTC.
import time
import asyncio

_EPOCH_2000 = 946684800  # 2000-01-01 in Unix seconds
_VALID_AFTER = 1704067200  # 2024-01-01: anything earlier means "not set"

# Boards whose time.time() counts from 2000 (ESP32) report 2000 for gmtime(0).
_OFFSET = _EPOCH_2000 if time.gmtime(0)[0] == 2000 else 0


class Clock:
    ticks_ms = staticmethod(time.ticks_ms)
    ticks_us = staticmethod(time.ticks_us)
    ticks_add = staticmethod(time.ticks_add)
    ticks_diff = staticmethod(time.ticks_diff)

    # a blocking wait of a few ms, for parts that need one between a command
    # and its answer (SCD4x); never used to pace the sampling loop
    delay_ms = staticmethod(time.sleep_ms)

    async def sleep_ms(self, ms):
        await asyncio.sleep_ms(ms)

    def utc(self):
        t = int(time.time()) + _OFFSET
        return t if t >= _VALID_AFTER else None


def iso(utc):
    # UTC seconds -> "YYYY-MM-DDTHH:MM:SSZ", or None when the clock is not set
    if utc is None:
        return None
    y, mo, d, h, mi, s = time.gmtime(utc - _OFFSET)[:6]
    return "%04d-%02d-%02dT%02d:%02d:%02dZ" % (y, mo, d, h, mi, s)


class Uptime:
    """Milliseconds since boot without the 2**30 ms (12.4 day) wrap of ticks.
    Call ms() at least once every few days (health reports do)."""

    def __init__(self, clock):
        self.clock = clock
        self.last = clock.ticks_ms()
        self.total = 0

    def ms(self):
        now = self.clock.ticks_ms()
        d = self.clock.ticks_diff(now, self.last)
        if d > 0:
            self.total += d
            self.last = now
        return self.total
