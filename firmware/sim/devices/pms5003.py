"""Simulated Plantower PMS5003 on a UART (active mode).

Emits a 32-byte frame every second of the clock: 0x42 0x4D, length 28,
13 big-endian words (PM1.0/PM2.5/PM10 CF=1, the same atmospheric, six
particle counts, reserved) and the 16-bit sum of bytes 0..29. Frames that
pile up while nobody reads arrive together (at most StreamDevice.BURST of them, as a
real FIFO would have lost the rest). Faults apply to the next frame.
"""
import struct
from sim.devices.base import StreamDevice



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
    GARBAGE = b"\x00\x13\x42\xff\x4d"  # with a lone header byte in it

    def __init__(self, clock, pm1=5, pm25=8, pm10=12, period_ms=1000):
        StreamDevice.__init__(self, clock, period_ms)
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
        self._set_frame(frame(self.pm1, self.pm25, self.pm10, cf1))

    # fault switches, each for the next frame
    def corrupt_checksum(self):
        self._bad_sum = True

    def truncate_next(self, n=20):
        self._truncate = n

    def uart_poll(self, now_ms):
        k = self._due(now_ms)
        if not k:
            return None
        if not self._bad_sum and not self._truncate:
            return self._burst(k)
        first = bytearray(self._buf[:32])
        if self._bad_sum:
            first[31] ^= 0x5A
        if self._truncate:
            first = first[:self._truncate]
        self._bad_sum = False
        self._truncate = 0
        return self._burst(k, first)
