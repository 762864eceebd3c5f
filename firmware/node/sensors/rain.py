"""Tipping-bucket rain gauge on a pin interrupt.

The reed switch closes to ground (input with pull-up) once per tip and
chatters while it does. The interrupt handler only stores the edge's
ticks_ms in a preallocated ring; read_into debounces (an edge within
"debounce_ms" of the last accepted tip is a bounce), books each tip into
per-minute buckets (the last 60 minutes, a preallocated array) and reports
the rain since the previous read in 0.1 mm, a counter: the window "sum" is
the rain of the window. summary() adds the rolling sums "rain_10min_mm" and
"rain_1h_mm" (the current minute and the 9 or 59 before it). ``alert``
while the hour's rain is at least "alert_mm_h" (大雨: 50 mm/h by default),
with ("rain.heavy", "warning", {...}) on entry and ("rain.heavy", "info",
{...}) when it falls 10 % below again.
"""
from array import array
from micropython import const

from node.sensors import EventSource, SensorError, OK, WARNING, FAILED

_RING = const(64)  # edges between two reads (a power of two)
_MASK = const(0x0FFFFFFF)  # edge counter: stays a small int
_MINUTES = const(60)
_MINUTE_MS = const(60000)


class RainGauge(EventSource):
    KIND = "rain_gauge"
    CHANNELS = ("rain_mm",)
    SCALES = (10,)
    COUNTERS = (True,)

    def __init__(self, pins, clock, opts=None):
        opts = opts or {}
        if "tip" not in pins:
            raise SensorError("rain_gauge: needs the pin 'tip'")
        self._pin = pins["tip"]
        self._clock = clock
        self._um = int(opts.get("mm_per_tip", 0.5) * 1000 + 0.5)  # um of rain per tip
        if self._um <= 0:
            raise SensorError("rain_gauge: mm_per_tip must be positive")
        self._debounce = int(opts.get("debounce_ms", 100))
        self.alert_mm_h = opts.get("alert_mm_h", 50)
        self._alert_on = int(self.alert_mm_h * 1000 + 0.5)  # um per hour
        self._alert_off = self._alert_on * 9 // 10
        ts = self._ts = array("i", [0] * _RING)  # edge ticks_ms
        wr = self._wr = array("i", [0])  # edges written (masked)
        ticks_ms = clock.ticks_ms

        def irq(pin):
            n = wr[0]
            ts[n & (_RING - 1)] = ticks_ms()
            wr[0] = (n + 1) & _MASK

        self._irq = irq
        self._rd = 0  # edges read (masked)
        self._have_tip = False
        self._t_tip = 0
        self._buckets = array("H", [0] * _MINUTES)  # tips per minute
        self._bi = 0  # the current minute's bucket
        self._bend = 0  # ticks_ms when the current minute ends
        self._carry = 0  # um not yet reported (below 0.1 mm)
        self._ready = False
        self.tips = 0
        self.bounces = 0
        self.lost = 0  # edges the ring had no room for
        self.errors = 0
        self.status = WARNING
        self.alert = False
        self._events = []

    def begin(self):
        """Attach the interrupt (falling edge: the switch closing)."""
        p = self._pin
        try:
            p.irq(handler=self._irq, trigger=p.IRQ_FALLING)
        except (OSError, ValueError) as e:
            self._ready = False
            self.status = FAILED
            raise SensorError("rain_gauge: cannot attach the interrupt (%s)" % e)
        self._rd = self._wr[0]
        self._bend = self._clock.ticks_add(self._clock.ticks_ms(), _MINUTE_MS)
        self._ready = True
        self.status = OK

    def irq_handler(self):
        """The handler given to Pin.irq (for tests and diagnostics)."""
        return self._irq

    def _roll(self, t):
        # advance the minute buckets so that t falls in the current one
        c = self._clock
        if c.ticks_diff(t, self._bend) < 0:
            return
        b = self._buckets
        if c.ticks_diff(t, self._bend) >= _MINUTES * _MINUTE_MS:
            for i in range(_MINUTES):
                b[i] = 0
            self._bend = c.ticks_add(t, _MINUTE_MS)
            return
        while c.ticks_diff(t, self._bend) >= 0:
            i = self._bi + 1
            if i == _MINUTES:
                i = 0
            self._bi = i
            b[i] = 0
            self._bend = c.ticks_add(self._bend, _MINUTE_MS)

    def read_into(self, out, offset):
        """out[offset] = rain since the last read in 0.1 mm (0 when dry)."""
        if not self._ready:
            return False
        c = self._clock
        w = self._wr[0]
        k = (w - self._rd) & _MASK
        if k > _RING:
            self.lost += k - _RING
            self.errors += k - _RING
            self._rd = (w - _RING) & _MASK
            k = _RING
        ts = self._ts
        deb = self._debounce
        new = 0
        for _ in range(k):
            t = ts[self._rd & (_RING - 1)]
            self._rd = (self._rd + 1) & _MASK
            if self._have_tip and c.ticks_diff(t, self._t_tip) < deb:
                self.bounces += 1
                continue
            self._have_tip = True
            self._t_tip = t
            self._roll(t)
            self._buckets[self._bi] += 1
            new += 1
        self.tips += new
        self._roll(c.ticks_ms())
        um = self._carry + new * self._um
        tenths = um // 100
        self._carry = um - tenths * 100
        out[offset] = tenths
        self._check_alert()
        self.status = OK
        return True

    def _sum_tips(self, minutes):
        b = self._buckets
        i = self._bi
        s = 0
        for _ in range(minutes):
            s += b[i]
            i -= 1
            if i < 0:
                i = _MINUTES - 1
        return s

    def rain_um(self, minutes):
        """Rain over the current minute and the minutes - 1 before it, in um."""
        return self._sum_tips(minutes) * self._um

    def _check_alert(self):
        h = self.rain_um(_MINUTES)
        if not self.alert and h >= self._alert_on:
            self.alert = True
            self._heavy("warning", h)
        elif self.alert and h < self._alert_off:
            self.alert = False
            self._heavy("info", h)

    def _heavy(self, sev, h):
        self._emit("rain.heavy", sev, {"rain_1h_mm": h / 1000, "rain_10min_mm": self.rain_um(10) / 1000,
                                       "alert_mm_h": self.alert_mm_h})

    def summary(self):
        """Rolling 10 min and 1 h sums (mm) as aggregates."""
        if self._ready:
            self._roll(self._clock.ticks_ms())
        ch = {}
        for name, minutes in (("rain_10min_mm", 10), ("rain_1h_mm", _MINUTES)):
            v = self.rain_um(minutes) / 1000
            ch[name] = {"n": 1, "min": v, "max": v, "mean": v, "last": v}
        return {"ch": ch}
