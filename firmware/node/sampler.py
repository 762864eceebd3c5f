# Sampling engine: a drift-free ticker, per-channel ring buffers and window
# aggregates in preallocated int arrays. The per-sample path (Ticker.wait_ms,
# Ticker.mark, Sampler.step, Sampler.add) allocates nothing: values are fixed-point small
# ints and every buffer is made in __init__.
from array import array
from micropython import const

_BIG = const(0x3FFFFFFF)


class Ticker:
    """Fixed-rate schedule: due times are start + k * period, never now + period,
    so lateness never accumulates. A tick later than a whole period is an
    overrun: the missed slots are skipped, keeping the phase.

    wait_ms() -> ms until the next tick is due (<= 0: due now); mark(), once
    per tick after waiting, books the tick and returns its lag in ms. Both are
    closures over one int array: no allocation, no attribute lookups."""

    def __init__(self, clock, period_ms, start=None):
        self.clock = clock
        self.period = period_ms
        now = clock.ticks_ms() if start is None else start
        # st: due, ticks, overruns, lag_max, lag_sum
        st = self.st = array("i", [clock.ticks_add(now, period_ms), 0, 0, 0, 0])
        ticks_ms, ticks_diff, ticks_add = clock.ticks_ms, clock.ticks_diff, clock.ticks_add
        p = period_ms

        def wait_ms():
            return ticks_diff(st[0], ticks_ms())

        def mark():
            lag = ticks_diff(ticks_ms(), st[0])
            if lag < 0:
                lag = 0
            st[1] += 1
            if lag > st[3]:
                st[3] = lag
            st[4] += lag
            if lag >= p:
                skipped = lag // p
                st[2] += skipped
                st[0] = ticks_add(st[0], skipped * p)
            st[0] = ticks_add(st[0], p)
            return lag

        self.wait_ms = wait_ms
        self.mark = mark

    @property
    def due(self):
        return self.st[0]

    @property
    def ticks(self):
        return self.st[1]

    @property
    def overruns(self):
        return self.st[2]

    @property
    def lag_max(self):
        return self.st[3]

    def stats(self, reset=True):
        st = self.st
        n = st[1]
        s = {"lag_max_ms": st[3], "lag_mean_ms": (st[4] / n) if n else 0.0,
             "overruns": st[2], "ticks": n}
        if reset:
            st[1] = st[2] = st[3] = st[4] = 0
        return s


class Sampler:
    """Reads each sensor at its own period (a multiple of the base tick) into
    per-channel rings and window aggregates.

    sensors: list of (driver, period_ms); a driver has KIND, CHANNELS, SCALES
    and read_into(out, offset) -> bool. A channel name already given by an
    earlier sensor is qualified with the kind: scd4x_temp_c.
    deadbands: {channel: value in the channel's unit}.

    Fixed-point sums are small ints: |value| * samples per window must stay
    below 2**30 (e.g. 1 Hz x 1 h of a value up to 290 000).
    """

    def __init__(self, sensors, base_ms, ring_size=64, deadbands=None):
        drivers = [d for d, _ in sensors]
        names, scales, owner, counter = [], [], [], []
        offsets, ends = [], []
        for d in drivers:
            offsets.append(len(names))
            counts = getattr(d, "COUNTERS", ())
            for j, name in enumerate(d.CHANNELS):
                counter.append(j < len(counts) and counts[j])
                if name in names:  # e.g. the SCD4x's temp_c after a BME280's
                    base = d.KIND + "_" + name
                    name, i = base, 2
                    while name in names:
                        name = "%s_%d" % (base, i)
                        i += 1
                names.append(name)
                scales.append(d.SCALES[j])
                owner.append(d.KIND)
            ends.append(len(names))
        n = len(names)
        self.drivers = drivers
        self.names = names
        self.scales = scales
        self.owner = owner
        self.counter = counter  # channels whose window "sum" is reported too
        self.base_ms = base_ms
        self.ring_size = ring_size
        # counts[0]: samples taken, counts[1]: failed reads
        self.counts = array("i", [0, 0])
        self.vals = array("i", [0] * n)
        self.cnt = array("i", [0] * n)
        self.mn = array("i", [_BIG] * n)
        self.mx = array("i", [-_BIG] * n)
        self.sm = array("i", [0] * n)
        # the last ring_size samples of every channel, in one flat array;
        # head[k] is the absolute index of channel k's newest sample
        self.ring = array("i", bytes(4 * n * ring_size))
        self.head = array("i", [k * ring_size + ring_size - 1 for k in range(n)])
        self.filled = array("i", [0] * n)
        # report-by-exception: deadband in fixed point, last reported mean
        self.band = array("i", [0] * n)
        self.reported = array("i", [0] * n)
        self.has_reported = array("b", [0] * n)
        for name, v in (deadbands or {}).items():
            if name in names:
                k = names.index(name)
                self.band[k] = int(v * scales[k] + 0.5)
        self.step = self._make_step(drivers, offsets, ends,
                                    [max(1, p // base_ms) for _, p in sensors])

    @property
    def samples(self):
        return self.counts[0]

    @property
    def failed_reads(self):
        return self.counts[1]

    def _make_step(self, drivers, offsets, ends, every):
        # The hot path as a closure over preallocated arrays: no attribute
        # lookups and no allocation per tick or per sample.
        vals, cnt, mn, mx, sm = self.vals, self.cnt, self.mn, self.mx, self.sm
        ring, head, size, counts = self.ring, self.head, self.ring_size, self.counts
        nsens = len(drivers)
        offsets = array("i", offsets)
        ends = array("i", ends)
        every = array("i", every)
        countdown = array("i", [1] * nsens)

        def step():
            """One base tick: read the sensors that are due."""
            for i in range(nsens):
                c = countdown[i] - 1
                if c:
                    countdown[i] = c
                    continue
                countdown[i] = every[i]
                off = offsets[i]
                if not drivers[i].read_into(vals, off):
                    counts[1] += 1
                    continue
                end = ends[i]
                for k in range(off, end):
                    v = vals[k]
                    cnt[k] += 1
                    sm[k] += v
                    if v < mn[k]:
                        mn[k] = v
                    if v > mx[k]:
                        mx[k] = v
                    h = head[k] + 1
                    if h % size == 0:
                        h -= size
                    ring[h] = v
                    head[k] = h
                counts[0] += end - off

        return step

    def add(self, k, v):
        """One sample of channel k (fixed point) fed from outside step()
        (interrupt counters, bursts): the same bookkeeping, no allocation."""
        self.cnt[k] += 1
        self.sm[k] += v
        if v < self.mn[k]:
            self.mn[k] = v
        if v > self.mx[k]:
            self.mx[k] = v
        h = self.head[k] + 1
        if h % self.ring_size == 0:
            h -= self.ring_size
        self.ring[h] = v
        self.head[k] = h
        self.counts[0] += 1

    def last(self, k):
        return self.ring[self.head[k]]

    def recent(self, name, k=None):
        """Oldest-first list of up to k recent samples of a channel, in its
        unit (allocates: for commands and diagnostics, not the hot path)."""
        c = self.names.index(name)
        size = self.ring_size
        have = min(size, self.filled[c] + self.cnt[c])
        k = have if k is None or k > have else k
        base = c * size
        h = self.head[c] - base
        sc = self.scales[c]
        return [self.ring[base + (h - k + 1 + j) % size] / sc for j in range(k)]

    def close_window(self, force=False):
        """End the window: (aggregates, changed). aggregates maps each channel
        that had samples to {n, min, max, mean, last} in its unit; changed is
        True when a channel's mean moved past its deadband since it was last
        reported (or force, or no deadband set). Counters restart."""
        out = {}
        changed = force
        size = self.ring_size
        for k in range(len(self.names)):
            n = self.cnt[k]
            if not n:
                continue
            sc = self.scales[k]
            mean_fx = self.sm[k] // n
            a = out[self.names[k]] = {"n": n, "min": self.mn[k] / sc, "max": self.mx[k] / sc,
                                      "mean": round(self.sm[k] / n / sc, 4), "last": self.last(k) / sc}
            if self.counter[k]:
                a["sum"] = self.sm[k] / sc
            if not self.has_reported[k] or self.band[k] == 0 \
                    or abs(mean_fx - self.reported[k]) > self.band[k]:
                changed = True
            self.filled[k] = min(size, self.filled[k] + n)
            self.cnt[k] = 0
            self.sm[k] = 0
            self.mn[k] = _BIG
            self.mx[k] = -_BIG
        return out, changed

    def mark_reported(self, aggregates):
        # remember what was sent, as the reference for the deadband
        for name, a in aggregates.items():
            if name not in self.names:
                continue  # a driver's window summary, not a sampled channel
            k = self.names.index(name)
            self.reported[k] = int(a["mean"] * self.scales[k])
            self.has_reported[k] = 1
