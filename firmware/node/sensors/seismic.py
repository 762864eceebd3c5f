"""Earthquakes: the ADXL345 accelerometer read from its FIFO at 100 Hz, with
the JMA instrumental seismic intensity (計測震度) and PGA computed on the node
(node.sensors.jma, re-exported here: jma_intensity(ax, ay, az, rate_hz)).
"""
import math
from array import array
from micropython import const
from node.sensors import EventSource, I2CSensor, SensorError, isqrt, OK, WARNING
from node.sensors.jma import (JMA, SCALES_JMA, jma_gain, jma_intensity,  # noqa: F401
                              jma_published, jma_scale, pga, scale_index, G_GAL)


# -- ADXL345 (Analog Devices), I2C, FIFO in stream mode ---------------------
_ADDRESS = const(0x53)  # SDO low; 0x1D with SDO high
_REG_DEVID = const(0x00)
_REG_BW_RATE = const(0x2C)
_REG_POWER_CTL = const(0x2D)
_REG_DATA_FORMAT = const(0x31)
_REG_DATAX0 = const(0x32)  # X0 X1 Y0 Y1 Z0 Z1, little-endian two's complement
_REG_FIFO_CTL = const(0x38)
_REG_FIFO_STATUS = const(0x39)
_DEVID = const(0xE5)
_RATE_100HZ = const(0x0A)
# FULL_RES with the +-16 g range: the same 3.9 mg/LSB as +-2 g full
# resolution, but gravity plus strong shaking does not clip at 2 g
_FULL_RES_16G = const(0x0B)
_MEASURE = const(0x08)
_FIFO_BYPASS = const(0x00)  # also clears the FIFO
_FIFO_STREAM = const(0x90)  # stream mode, watermark 16
_FIFO_DEPTH = const(32)
_RATE = const(100)
_LSB_PER_G = const(256)
_CGAL_Q = const(24517)  # centi-gal per 1/4 LSB, times 256 (980.665 / 256 / 4 * 100 * 256)
_BASE_SHIFT = const(9)  # gravity/offset baseline: 512 samples (5 s) time constant
_TRIG_S = const(10)  # the fast trigger's intensity window
_MARGIN_S = const(10)  # ring beyond the window: samples drained during a computation
_STALE_MS = const(1000)
_COUNT_MASK = const(0x0FFFFFFF)


def _agg(v):
    return {"n": 1, "min": v, "max": v, "mean": v, "last": v}


class ADXL345(I2CSensor, EventSource):
    """3-axis accelerometer read from its 32-entry FIFO (stream mode, 100 Hz).

    ``__init__(i2c, clock, opts)``: opts "address" (0x53, or 0x1D), "window_s"
    (60: the record summary() computes the intensity over), "trigger_gal" (8),
    "event_intensity" (3.5). read_into must run at least every 320 ms (a
    full FIFO is counted in ``overruns``). Per sample it stores raw counts in
    array('h') rings, tracks a gravity/offset baseline and the peak vector
    acceleration, all in small ints: no allocation. Its channel is the peak
    vector acceleration of the samples it drained, in centi-gal.

    The fast trigger: a sample above trigger_gal makes the next read_into
    compute the intensity of the last 10 s (at most once per second, and
    every second while ``alert``); at event_intensity or more it emits
    ("earthquake", "warning" | "critical" from 5+, {...}), again when the
    scale rises, and keeps ``alert`` until the 10 s intensity falls below.
    """

    KIND = "adxl345"
    CHANNELS = ("accel_gal",)
    SCALES = (100,)

    def __init__(self, i2c, clock, opts=None):
        opts = opts or {}
        self._i2c = i2c
        self._clock = clock
        self.address = opts.get("address", _ADDRESS)
        self.window_s = int(opts.get("window_s", 60))
        if self.window_s < 1:
            raise SensorError("adxl345: window_s must be at least 1 s")
        self.trigger_gal = opts.get("trigger_gal", 8.0)
        self.event_intensity = opts.get("event_intensity", 3.5)
        self.gal_per_lsb = G_GAL / _LSB_PER_G
        t = self.trigger_gal / self.gal_per_lsb
        self._trig2 = int(t * t + 0.5)  # in LSB^2
        self._wn = self.window_s * _RATE
        self._tn = min(_TRIG_S * _RATE, self._wn)
        self._margin = _MARGIN_S * _RATE
        size = self._size = self._wn + self._margin
        self._x = array("h", bytes(2 * size))
        self._y = array("h", bytes(2 * size))
        self._z = array("h", bytes(2 * size))
        self._jma = JMA(self._wn)
        self._buf = bytearray(6)
        self._b1 = bytearray(1)
        self._poll = self._drain_quiet  # bound once: drains the FIFO during a computation
        # per-sample state (small ints)
        self._w = 0  # next write index
        self._count = 0  # samples in the rings
        self._total = 0  # samples ever (masked), for the margin check
        self._bx = self._by = self._bz = 0  # baseline in 1/65536 LSB (< 2**29 at 16 g)
        self._based = False
        self._peak2 = 0  # peak |v|^2 (LSB^2) since the last read_into
        self._pga2 = 0  # since the last summary
        self._blk = 0  # samples into the current second
        self._armed = True
        self._pending = False
        self._last_ms = 0
        self.overruns = 0
        self.late = 0
        self.errors = 0
        self.status = WARNING
        self._ready = False
        self.alert = False
        self.intensity = None  # of the last fast-trigger evaluation (last 10 s)
        self._scale_i = -1
        self._events = []

    def _configure(self):
        self._write(_REG_POWER_CTL, 0)  # standby while configuring
        self._write(_REG_BW_RATE, _RATE_100HZ)
        self._write(_REG_DATA_FORMAT, _FULL_RES_16G)
        self._write(_REG_FIFO_CTL, _FIFO_BYPASS)
        self._write(_REG_FIFO_CTL, _FIFO_STREAM)
        self._write(_REG_POWER_CTL, _MEASURE)

    def begin(self):
        """Probe the device id, set 100 Hz, full resolution, FIFO stream, measure."""
        try:
            dev = self._reg(_REG_DEVID)
            if dev != _DEVID:
                self._fail("device id 0x%02x, expected 0x%02x" % (dev, _DEVID))
            self._configure()
        except OSError as e:
            self._fail("no answer (OSError %s)" % e.args[0])
        self._last_ms = self._clock.ticks_ms()
        self._ready = True
        self.status = OK

    def _drain(self):
        # Every FIFO entry into the rings; returns how many. Ints only.
        i2c = self._i2c
        addr = self.address
        b = self._buf
        i2c.readfrom_mem_into(addr, _REG_FIFO_STATUS, self._b1)
        k = self._b1[0] & 0x3F
        if k >= _FIFO_DEPTH:
            self.overruns += 1  # full: samples may have been lost
            self.errors += 1
        xs = self._x
        ys = self._y
        zs = self._z
        w = self._w
        size = self._size
        bx = self._bx
        by = self._by
        bz = self._bz
        trig2 = self._trig2
        peak = 0
        pga = self._pga2
        blk = self._blk
        for _ in range(k):
            i2c.readfrom_mem_into(addr, _REG_DATAX0, b)
            x = b[0] | (b[1] << 8)
            if x & 0x8000:
                x -= 0x10000
            y = b[2] | (b[3] << 8)
            if y & 0x8000:
                y -= 0x10000
            z = b[4] | (b[5] << 8)
            if z & 0x8000:
                z -= 0x10000
            xs[w] = x
            ys[w] = y
            zs[w] = z
            w += 1
            if w == size:
                w = 0
            if not self._based:
                bx = x << 16
                by = y << 16
                bz = z << 16
                self._based = True
            else:
                bx += ((x << 16) - bx) >> _BASE_SHIFT
                by += ((y << 16) - by) >> _BASE_SHIFT
                bz += ((z << 16) - bz) >> _BASE_SHIFT
            x -= (bx + 0x8000) >> 16
            y -= (by + 0x8000) >> 16
            z -= (bz + 0x8000) >> 16
            v = x * x + y * y + z * z
            if v > peak:
                peak = v
            if v >= trig2 and self._armed:
                self._pending = True
                self._armed = False
            blk += 1
            if blk == _RATE:
                blk = 0
                self._armed = True
                if self.alert:
                    self._pending = True
        if peak > pga:
            pga = peak
        if peak > self._peak2:
            self._peak2 = peak
        self._w = w
        self._bx = bx
        self._by = by
        self._bz = bz
        self._blk = blk
        self._pga2 = pga
        c = self._count + k
        self._count = size if c > size else c
        self._total = (self._total + k) & _COUNT_MASK
        return k

    def _drain_quiet(self):
        try:
            self._drain()
        except OSError:
            self.errors += 1

    @property
    def samples(self):
        """Samples read so far (wraps at 2**28)."""
        return self._total

    def read_into(self, out, offset):
        """Drain the FIFO; out[offset] = peak vector acceleration of the drained
        samples (centi-gal, gravity removed). False when nothing was new."""
        if not self._ready:
            return False
        over = self.overruns
        try:
            k = self._drain()
        except OSError:
            self.errors += 1
            self.status = WARNING
            return False
        now = self._clock.ticks_ms()
        if k == 0:
            if self._clock.ticks_diff(now, self._last_ms) > _STALE_MS:
                # no samples for a second: the part lost power or its settings
                self._last_ms = now
                self.errors += 1
                self.status = WARNING
                try:
                    self._configure()
                except OSError:
                    pass
            return False
        self._last_ms = now
        out[offset] = (isqrt(self._peak2 << 4) * _CGAL_Q) >> 8
        self._peak2 = 0
        if self._pending:
            self._pending = False
            self._evaluate()
        self.status = WARNING if self.overruns != over else OK
        return True

    # -- once per trigger or window: floats and allocation are fine here
    def _compute(self, n):
        start = self._w - n
        if start < 0:
            start += self._size
        t0 = self._total
        i = self._jma.intensity(self._x, self._y, self._z, n, _RATE, start, self._size,
                                self.gal_per_lsb, self._poll)
        if ((self._total - t0) & _COUNT_MASK) > self._margin:
            self.late += 1  # the oldest samples were overwritten while computing
        return i, start

    def _ring_pga(self, start, n):
        # peak vector acceleration (gal) of n ring samples about their mean
        size = self._size
        peak = 0
        m = []
        for a in (self._x, self._y, self._z):
            s = 0
            p = start
            for _ in range(n):
                s += a[p]
                p = p + 1 if p + 1 < size else 0
            m.append((s + n // 2) // n)
        xs, ys, zs = self._x, self._y, self._z
        mx, my, mz = m
        p = start
        for _ in range(n):
            x = xs[p] - mx
            y = ys[p] - my
            z = zs[p] - mz
            v = x * x + y * y + z * z
            if v > peak:
                peak = v
            p = p + 1 if p + 1 < size else 0
        return math.sqrt(peak) * self.gal_per_lsb

    def _evaluate(self):
        n = min(self._tn, self._count)
        if n < _RATE:
            return
        i, start = self._compute(n)
        self.intensity = i
        p = jma_published(i)
        if p >= self.event_intensity:
            si = scale_index(i)
            if not self.alert or si > self._scale_i:
                sev = "critical" if si >= 6 else "warning"  # 5+ and above
                self._emit("earthquake", sev, {"intensity": round(i, 2), "scale": SCALES_JMA[si],
                                                "pga_gal": round(self._ring_pga(start, n), 1)})
                self._scale_i = si
            self.alert = True
        elif self.alert:
            self.alert = False
            self._scale_i = -1

    def summary(self):
        """At a window's close: the JMA intensity of the last window_s and the
        PGA since the previous summary."""
        ch = {}
        n = min(self._wn, self._count)
        pga2 = self._pga2
        self._pga2 = 0  # samples drained while computing count for the next window
        if n >= _RATE:
            i, _ = self._compute(n)
            if i > -math.inf:
                ch["intensity"] = _agg(round(i, 2))
        if n:
            ch["pga_gal"] = _agg(round(math.sqrt(pga2) * self.gal_per_lsb, 1))
        return {"ch": ch}
