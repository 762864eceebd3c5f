"""Simulated Sensirion SCD40/SCD41 CO2 sensor at I2C command level.

16-bit commands; answers are 16-bit words each followed by the Sensirion
CRC-8 (poly 0x31, init 0xFF). Execution times are enforced with the clock:
reading an answer too early, a command during the 500 ms after stop, or a
command not allowed in the current mode is NACKed (OSError 19), as the part
does. Periodic mode yields a measurement every 5000 ms.
"""
from sim.clock import ticks_add, ticks_diff

START_PERIODIC = 0x21B1
READ_MEASUREMENT = 0xEC05
STOP_PERIODIC = 0x3F86
DATA_READY = 0xE4B8
SERIAL_NUMBER = 0x3682
REINIT = 0x3646
_IN_PERIODIC = (READ_MEASUREMENT, STOP_PERIODIC, DATA_READY)
_INTERVAL = 5000
_READY = (0x8006,)  # data ready: lower 11 bits non-zero
_NOT_READY = (0x8000,)


def crc8(data, start=0, n=2):
    """Sensirion CRC-8 of data[start:start+n] (0xBEEF -> 0x92)."""
    crc = 0xFF
    for i in range(start, start + n):
        crc ^= data[i]
        for _ in range(8):
            crc = ((crc << 1) ^ 0x31) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def _nack():
    raise OSError(19)


class SCD4xDevice:
    def __init__(self, clock, serial=0x0BAD0C0FFEE0):
        self.clock = clock
        self.serial = serial
        self.co2_ppm = 600
        self.temp_c = 22.0
        self.rh_pct = 45.0
        self.periodic = False
        self.measurements = 0  # measurements read out
        self._next = 0
        self._avail = False
        self._busy = None  # ticks until which every command is NACKed
        self._out = bytearray(9)
        self._n = 0  # bytes in the pending answer
        self._at = 0  # ticks when the answer may be read
        self._bad_crc = False
        self.set()

    def set(self, co2_ppm=None, temp_c=None, rh_pct=None):
        if co2_ppm is not None:
            self.co2_ppm = co2_ppm
        if temp_c is not None:
            self.temp_c = temp_c
        if rh_pct is not None:
            self.rh_pct = rh_pct
        # encoded once here, so answering allocates nothing
        t = int((self.temp_c + 45.0) * 65535.0 / 175.0 + 0.5)
        h = int(self.rh_pct * 65535.0 / 100.0 + 0.5)
        self._words = (int(self.co2_ppm) & 0xFFFF, max(0, min(t, 65535)), max(0, min(h, 65535)))
        s = self.serial
        self._serial = ((s >> 32) & 0xFFFF, (s >> 16) & 0xFFFF, s & 0xFFFF)

    def corrupt_crc(self):
        """Fault: the next answer carries a wrong CRC in its first word."""
        self._bad_crc = True

    def _tick(self, now):
        if self.periodic:
            d = ticks_diff(now, self._next)
            if d >= 0:
                self._next = ticks_add(self._next, (d // _INTERVAL + 1) * _INTERVAL)
                self._avail = True

    def _answer(self, words, now, exec_ms):
        o = self._out
        for i in range(len(words)):
            w = words[i]
            o[3 * i] = w >> 8
            o[3 * i + 1] = w & 0xFF
            o[3 * i + 2] = crc8(o, 3 * i)
        if self._bad_crc:
            o[2] ^= 0xFF
            self._bad_crc = False
        self._n = 3 * len(words)
        self._at = ticks_add(now, exec_ms)

    def i2c_write(self, data):
        now = self.clock.ticks_ms()
        if self._busy is not None:
            if ticks_diff(now, self._busy) < 0:
                _nack()
            self._busy = None
        if len(data) < 2:
            _nack()
        cmd = (data[0] << 8) | data[1]
        self._tick(now)
        self._n = 0
        if self.periodic and cmd not in _IN_PERIODIC:
            _nack()
        if cmd == START_PERIODIC:
            self.periodic = True
            self._avail = False
            self._next = ticks_add(now, _INTERVAL)
        elif cmd == STOP_PERIODIC:
            self.periodic = False
            self._busy = ticks_add(now, 500)
        elif cmd == REINIT:
            self._busy = ticks_add(now, 30)
        elif cmd == DATA_READY:
            self._answer(_READY if self._avail else _NOT_READY, now, 1)
        elif cmd == SERIAL_NUMBER:
            self._answer(self._serial, now, 1)
        elif cmd == READ_MEASUREMENT:
            if not self._avail:
                return  # nothing buffered: the read is NACKed
            self._avail = False
            self.measurements += 1
            self._answer(self._words, now, 1)
        else:
            _nack()

    def i2c_read_into(self, buf):
        if self._n == 0 or ticks_diff(self.clock.ticks_ms(), self._at) < 0:
            _nack()
        o = self._out
        for i in range(len(buf)):
            buf[i] = o[i] if i < self._n else 0xFF
        self._n = 0

    def i2c_read(self, n):
        buf = bytearray(n)
        self.i2c_read_into(buf)
        return bytes(buf)
