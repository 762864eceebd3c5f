"""Simulated A02YYUW / JSN-SR04T (mode UART) ultrasonic ranger.

Sends a 4-byte frame 0xFF, H, L, SUM (SUM = (0xFF + H + L) & 0xFF, distance
H*256+L mm) every ``period_ms`` (about 100 ms) of the clock. Frames that
pile up while nobody reads arrive together (at most StreamDevice.BURST). ``set(mm)``
changes the distance (any value, so out-of-range answers can be sent);
the fault switches apply to the next frame; ``silence(True)`` stops the
part (cut wire). The usual path returns a preallocated view: no allocation.
"""
from sim.devices.base import StreamDevice


def frame(mm):
    mm = min(max(int(mm), 0), 0xFFFF)
    h, l = mm >> 8, mm & 0xFF
    return bytes((0xFF, h, l, (0xFF + h + l) & 0xFF))


class RangerDevice(StreamDevice):
    GARBAGE = b"\x00\x13\xff\x12"

    def __init__(self, clock, distance_mm=2000, period_ms=100):
        StreamDevice.__init__(self, clock, period_ms)
        self._bad_sum = False
        self._spike = None
        self.set(distance_mm)

    def set(self, mm):
        """Distance to the water surface (mm) for the frames from now on."""
        self.distance_mm = mm
        self._set_frame(frame(mm))

    # fault switches, each for the next frame
    def corrupt_checksum(self):
        self._bad_sum = True

    def spike(self, mm):
        """The next frame reports mm (a stray echo), the ones after it the set distance."""
        self._spike = mm

    def uart_poll(self, now_ms):
        k = self._due(now_ms)
        if not k:
            return None
        if not self._bad_sum and self._spike is None:
            return self._burst(k)
        first = bytearray(frame(self._spike) if self._spike is not None else self._buf[:4])
        if self._bad_sum:
            first[3] ^= 0x5A
        self._bad_sum = False
        self._spike = None
        return self._burst(k, first)
