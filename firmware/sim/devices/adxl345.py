"""Simulated Analog Devices ADXL345 accelerometer (I2C registers, 32-entry FIFO).

Registers: DEVID 0x00 (0xE5), BW_RATE 0x2C (rate code, 0x0A = 100 Hz),
POWER_CTL 0x2D (bit 3 Measure), DATA_FORMAT 0x31 (bit 3 FULL_RES, bits 1:0
range), INT_SOURCE 0x30 (bit 0 Overrun), DATAX0..DATAZ1 0x32..0x37,
FIFO_CTL 0x38 (bits 7:6 mode: bypass, FIFO, stream, trigger), FIFO_STATUS
0x39 (bits 5:0 entries). While measuring, a sample is taken at the output
data rate of virtual time (a clock listener) from ``wave(t_s) -> (ax, ay,
az)`` in gal (plus 1 g on z when ``gravity``); in FIFO modes it goes into the
FIFO, whose oldest entry the data registers show; a read that starts in
0x32..0x37 pops it. A full FIFO in stream mode drops the oldest entry
(FIFO mode: the new one), counted in ``overflows`` and flagged in INT_SOURCE.
Reads and writes allocate nothing (the waveform runs in the listener).
"""
import math
from sim.clock import ticks_diff
from sim.devices.base import RegisterDevice

G_GAL = 980.665
DEVID = 0x00
BW_RATE = 0x2C
POWER_CTL = 0x2D
INT_SOURCE = 0x30
DATA_FORMAT = 0x31
DATAX0 = 0x32
DATAZ1 = 0x37
FIFO_CTL = 0x38
FIFO_STATUS = 0x39
_DEPTH = 32
_READ_ONLY = (DEVID, INT_SOURCE, 0x32, 0x33, 0x34, 0x35, 0x36, 0x37, FIFO_STATUS)


def still(t):
    return (0.0, 0.0, 0.0)


def sine(amp_gal, freq_hz, axis=0, start_s=0.0, dur_s=None):
    """A waveform: a sine of amp_gal on one axis (0 x, 1 y, 2 z) from start_s
    for dur_s seconds (None: forever), still otherwise."""

    def wave(t):
        v = 0.0
        if t >= start_s and (dur_s is None or t < start_s + dur_s):
            v = amp_gal * math.sin(2 * math.pi * freq_hz * (t - start_s))
        return (v, 0.0, 0.0) if axis == 0 else ((0.0, v, 0.0) if axis == 1 else (0.0, 0.0, v))

    return wave


class ADXL345Device(RegisterDevice):
    def __init__(self, clock, wave=None, gravity=True, noise_lsb=0, devid=0xE5, seed=1):
        super().__init__()
        self.clock = clock
        self.wave = wave or still
        self.gravity = gravity
        self.noise_lsb = noise_lsb
        self._seed = seed & 0x7FFFFFFF or 1
        self.regs[DEVID] = devid
        self.regs[BW_RATE] = 0x0A
        self._fifo = bytearray(6 * _DEPTH)
        self._head = 0
        self._n = 0
        self.overflows = 0
        self.samples = 0  # taken while measuring
        self._last = clock.ticks_ms()
        self._now_us = 0  # virtual time since the part was made
        self._period_us = self._period()
        self._next_us = self._period_us
        self._listener = self._tick
        clock.add_listener(self._listener, self._period_us // 1000)

    # -- host side
    def on_write(self, reg, value):
        if reg in _READ_ONLY:
            return
        old = self.regs[reg]
        self.regs[reg] = value
        if reg == FIFO_CTL and (value >> 6) == 0:
            self._clear()  # bypass mode clears the FIFO
        elif reg == BW_RATE:
            self._period_us = self._period()
        elif reg == POWER_CTL and (value & 0x08) and not (old & 0x08):
            self._catch_up(self.clock.ticks_ms())
            self._next_us = self._now_us + self._period_us  # first sample one period on

    def i2c_read_into(self, buf):
        p0 = self.ptr
        RegisterDevice.i2c_read_into(self, buf)
        if DATAX0 <= p0 <= DATAZ1 and self.regs[FIFO_CTL] >> 6:
            self._pop()
        elif p0 <= INT_SOURCE < p0 + len(buf):
            self.regs[INT_SOURCE] &= 0xFE

    # -- the part
    def _period(self):
        code = self.regs[BW_RATE] & 0x0F
        return 1000000 * (1 << (15 - code)) // 3200

    def _clear(self):
        self._head = 0
        self._n = 0
        self.regs[FIFO_STATUS] = 0

    def _present(self):
        # the data registers show the oldest FIFO entry
        f = self._fifo
        h = self._head * 6
        r = self.regs
        for i in range(6):
            r[DATAX0 + i] = f[h + i]

    def _pop(self):
        if self._n == 0:
            return
        self._head = (self._head + 1) % _DEPTH
        self._n -= 1
        self.regs[FIFO_STATUS] = self._n
        if self._n:
            self._present()

    def _push(self, x, y, z):
        mode = self.regs[FIFO_CTL] >> 6
        if mode == 0:  # bypass: straight into the data registers
            self._put(self.regs, DATAX0, x, y, z)
            return
        if self._n == _DEPTH:
            self.overflows += 1
            self.regs[INT_SOURCE] |= 0x01
            if mode == 1:  # FIFO mode: stops collecting when full
                return
            self._head = (self._head + 1) % _DEPTH  # stream: the oldest is lost
            self._n -= 1
        self._put(self._fifo, ((self._head + self._n) % _DEPTH) * 6, x, y, z)
        self._n += 1
        self.regs[FIFO_STATUS] = self._n
        self.regs[INT_SOURCE] |= 0x80
        self._present()

    @staticmethod
    def _put(dst, at, x, y, z):
        for v in (x, y, z):
            v &= 0xFFFF
            dst[at] = v & 0xFF
            dst[at + 1] = v >> 8
            at += 2

    def lsb_per_g(self):
        f = self.regs[DATA_FORMAT]
        return 256 if f & 0x08 else 256 >> (f & 0x03)

    def to_lsb(self, gal):
        """Counts for an acceleration in gal at the current format (clipped)."""
        f = self.regs[DATA_FORMAT]
        lim = 1 << (9 + (f & 0x03)) if f & 0x08 else 512
        v = int(round(gal * self.lsb_per_g() / G_GAL))
        return -lim if v < -lim else (lim - 1 if v > lim - 1 else v)

    def _noise(self):
        self._seed = (self._seed * 1103515245 + 12345) & 0x7FFFFFFF
        return (self._seed >> 8) % (2 * self.noise_lsb + 1) - self.noise_lsb

    def _sample(self, t_s):
        ax, ay, az = self.wave(t_s)
        if self.gravity:
            az += G_GAL
        x, y, z = self.to_lsb(ax), self.to_lsb(ay), self.to_lsb(az)
        if self.noise_lsb:
            x += self._noise()
            y += self._noise()
            z += self._noise()
        self.samples += 1
        self._push(x, y, z)

    def _catch_up(self, now):
        self._now_us += ticks_diff(now, self._last) * 1000
        self._last = now
        while self._next_us <= self._now_us:
            if self.regs[POWER_CTL] & 0x08:
                self._sample(self._next_us / 1e6)
            self._next_us += self._period_us

    def _tick(self, now):
        self._catch_up(now)
        return (self._next_us - self._now_us + 999) // 1000

    def fifo_entries(self):
        return self._n
