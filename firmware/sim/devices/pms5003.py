"""Simulated Plantower PMS5003 on a UART (active mode).

Emits a 32-byte frame every second of the clock: 0x42 0x4D, length 28,
13 big-endian words (PM1.0/PM2.5/PM10 CF=1, the same atmospheric, six
particle counts, reserved) and the 16-bit sum of bytes 0..29. Frames that
pile up while nobody reads arrive together (at most _BURST of them, as a
real FIFO would have lost the rest). Faults apply to the next frame.
"""
import struct
from sim.devices.base import StreamDevice

_BURST = 16


def frame(pm1, pm25, pm10, cf1=None, counts=None):
    """One frame as bytes (cf1: the three CF=1 values, default the atmospheric ones)."""
    if cf1 is None:
        cf1 = (pm1, pm25, pm10)
    if counts is None:
        counts = (pm10 * 150, pm10 * 45, pm10 * 9, pm10 * 2, pm10 // 2, pm10 // 5)
    words = tuple(min(max(int(v), 0), 65535) for v in tuple(cf1) + (pm1, pm25, pm10) + tuple(counts) + (0,))
    body = struct.pack(">BBH13H", 0x42, 0x4D, 28, *words)
    return body + struct.pack(">H", sum(body) & 0xFFFF)


class PMS5003Device(StreamDevice):
    def __init__(self, clock, pm1=5, pm25=8, pm10=12, period_ms=1000):
        StreamDevice.__init__(self, clock, period_ms)
        self._buf = bytearray(32 * _BURST)
        mv = memoryview(self._buf)
        self._views = [mv[:32 * (i + 1)] for i in range(_BURST)]
        self._garbage = None
        self._bad_sum = False
        self._truncate = 0
        self.set(pm1, pm25, pm10)

    def set(self, pm1=None, pm25=None, pm10=None, cf1=None):
        """Atmospheric PM values in ug/m3 for the frames from now on."""
        if pm1 is not None:
            self.pm1 = pm1
        if pm25 is not None:
            self.pm25 = pm25
        if pm10 is not None:
            self.pm10 = pm10
        f = frame(self.pm1, self.pm25, self.pm10, cf1)
        for k in range(_BURST):
            self._buf[32 * k:32 * k + 32] = f

    # fault switches, each for the next frame
    def corrupt_checksum(self):
        self._bad_sum = True

    def inject_garbage(self, data=b"\x00\x13\x42\xff\x4d"):
        self._garbage = bytes(data)

    def truncate_next(self, n=20):
        self._truncate = n

    def uart_poll(self, now_ms):
        k = self._due(now_ms)
        if not k:
            return None
        if k > _BURST:
            k = _BURST
        if self._garbage is None and not self._bad_sum and not self._truncate:
            return self._views[k - 1]
        first = bytearray(self._buf[:32])
        if self._bad_sum:
            first[31] ^= 0x5A
        if self._truncate:
            first = first[:self._truncate]
        out = (self._garbage or b"") + bytes(first) + bytes(self._buf[32:32 * k])
        self._garbage = None
        self._bad_sum = False
        self._truncate = 0
        return out
