# Sampling engine: a drift-free ticker, per-channel ring buffers and window
# aggregates in preallocated int arrays. The per-sample path (Ticker.wait_ms,
# Ticker.mark, Sampler.step) allocates nothing: values are fixed-point small
# ints and every buffer is made in __init__.
from array import array
from micropython import const

_BIG = const(0x3FFFFFFF)


class Ticker:
    """Fixed-rate schedule: due times are start + k * period, never now + period,
    so lateness never accumulates. A tick later than a whole period is an
    overrun: the missed slots are skipped, keeping the phase."""

    def __init__(self, clock, period_ms, start=None):
        self.clock = clock
        self.period = period_ms
        self.due = clock.ticks_add(clock.ticks_ms() if start is None else start, period_ms)
        self.ticks = 0
        self.overruns = 0
        self.lag_max = 0
        self.lag_sum = 0

    def wait_ms(self):
        # milliseconds until the next tick is due (<= 0: due now)
        return self.clock.ticks_diff(self.due, self.clock.ticks_ms())

    def mark(self):
        # call once per tick after waiting; returns the lag in ms
        c = self.clock
        lag = c.ticks_diff(c.ticks_ms(), self.due)
        if lag < 0:
            lag = 0
        self.ticks += 1
        if lag > self.lag_max:
            self.lag_max = lag
        self.lag_sum += lag
        p = self.period
        if lag >= p:
            skipped = lag // p
            self.overruns += skipped
            self.due = c.ticks_add(self.due, skipped * p)
        self.due = c.ticks_add(self.due, p)
        return lag

    def stats(self, reset=True):
        n = self.ticks
        s = {"lag_max_ms": self.lag_max, "lag_mean_ms": (self.lag_sum / n) if n else 0.0,
             "overruns": self.overruns, "ticks": n}
        if reset:
            self.ticks = self.overruns = self.lag_max = self.lag_sum = 0
        return s


class Ring:
    """The last `size` samples of one channel."""

    def __init__(self, size):
        self.buf = array("i", bytes(4 * size))
        self.size = size
        self.head = 0
        self.n = 0

    def push(self, v):
        self.buf[self.head] = v
        self.head = (self.head + 1) % self.size
        if self.n < self.size:
            self.n += 1

    def latest(self, k=None):
        # oldest-first list of up to k recent values (allocates: not for the hot path)
        k = self.n if k is None or k > self.n else k
        out = []
        i = (self.head - k) % self.size
        for _ in range(k):
            out.append(self.buf[i])
            i = (i + 1) % self.size
        return out


class Sampler:
    """Reads each sensor at its own period (a multiple of the base tick) into
    per-channel rings and window aggregates.

    sensors: list of (driver, period_ms); a driver has CHANNELS, SCALES and
    read_into(out, offset) -> bool. Channel names must be unique.
    deadbands: {channel: value in the channel's unit}.
    """

    def __init__(self, sensors, base_ms, ring_size=64, deadbands=None):
        self.sensors = [s for s, _ in sensors]
        self.every = array("i", [max(1, p // base_ms) for _, p in sensors])
        self.countdown = array("i", [0] * len(sensors))
        self.offset = array("i", [0] * len(sensors))
        names, scales, owner = [], [], []
        for i, s in enumerate(self.sensors):
            self.offset[i] = len(names)
            for j, name in enumerate(s.CHANNELS):
                if name in names:
                    raise ValueError("channel %s given by two sensors" % name)
                names.append(name)
                scales.append(s.SCALES[j])
                owner.append(s.KIND)
        n = len(names)
        self.names = names
        self.scales = scales
        self.owner = owner
        self.base_ms = base_ms
        self.vals = array("i", [0] * n)
        self.cnt = array("i", [0] * n)
        self.mn = array("i", [0] * n)
        self.mx = array("i", [0] * n)
        self.sm = array("i", [0] * n)
        self.last = array("i", [0] * n)
        self.rings = [Ring(ring_size) for _ in range(n)]
        # report-by-exception: deadband in fixed point, last reported mean
        self.band = array("i", [0] * n)
        self.reported = array("i", [0] * n)
        self.has_reported = array("b", [0] * n)
        for name, v in (deadbands or {}).items():
            if name in names:
                k = names.index(name)
                self.band[k] = int(v * scales[k] + 0.5)
        self.samples = 0
        self.failed_reads = 0

    def step(self):
        # one base tick: read the sensors that are due; allocation-free
        vals = self.vals
        for i in range(len(self.sensors)):
            c = self.countdown[i] - 1
            if c > 0:
                self.countdown[i] = c
                continue
            self.countdown[i] = self.every[i]
            s = self.sensors[i]
            off = self.offset[i]
            if not s.read_into(vals, off):
                self.failed_reads += 1
                continue
            for k in range(off, off + len(s.CHANNELS)):
                self.add(k, vals[k])

    def add(self, k, v):
        # one sample of channel k (fixed point)
        n = self.cnt[k]
        if n == 0:
            self.mn[k] = v
            self.mx[k] = v
            self.sm[k] = v
        else:
            if v < self.mn[k]:
                self.mn[k] = v
            if v > self.mx[k]:
                self.mx[k] = v
            self.sm[k] += v
        self.cnt[k] = n + 1
        self.last[k] = v
        self.rings[k].push(v)
        self.samples += 1

    def close_window(self, force=False):
        """End the window: (aggregates, changed). aggregates maps each channel
        that had samples to {n, min, max, mean, last} in its unit; changed is
        True when a channel's mean moved past its deadband since it was last
        reported (or force, or no deadband set). Counters restart."""
        out = {}
        changed = force
        for k in range(len(self.names)):
            n = self.cnt[k]
            if not n:
                continue
            sc = self.scales[k]
            mean_fx = self.sm[k] // n
            out[self.names[k]] = {"n": n, "min": self.mn[k] / sc, "max": self.mx[k] / sc,
                                  "mean": round(self.sm[k] / n / sc, 4), "last": self.last[k] / sc}
            if not self.has_reported[k] or abs(mean_fx - self.reported[k]) > self.band[k] \
                    or self.band[k] == 0:
                changed = True
            self.cnt[k] = 0
        return out, changed

    def mark_reported(self, aggregates):
        # remember what was sent, as the reference for the deadband
        for name, a in aggregates.items():
            k = self.names.index(name)
            self.reported[k] = int(a["mean"] * self.scales[k])
            self.has_reported[k] = 1
