"""Simulated tipping-bucket rain gauge: a reed switch pulling a GPIO low.

Each tip closes the switch for ``closed_ms`` with contact chatter at both
ends (falling edges at 0, 2 and 5 ms, and one more 1 ms after release), so
a driver without debounce counts four tips per tip. ``rain(mm_per_h,
for_ms)`` tips at the matching rate for the given time (the first tip one
interval from now); ``tip()`` tips once now. Edges happen at their exact
virtual time (a clock listener), through ``machine.pin(n).drive()``; the
firmware's pin needs its pull-up, as on the pole.
"""
from sim.clock import ticks_diff

# (ms after the tip starts, level): 0 = switch closed; None = released (pull-up)
def _edges(closed_ms):
    return ((0, 0), (1, None), (2, 0), (4, None), (5, 0),
            (closed_ms, None), (closed_ms + 1, 0), (closed_ms + 3, None))


class RainGaugeDevice:
    def __init__(self, machine, pin_no, mm_per_tip=0.5, closed_ms=60):
        self.machine = machine
        self.clock = machine.clock
        self.mm_per_tip = mm_per_tip
        self._pin = machine.pin(pin_no)
        self._edges = _edges(closed_ms)
        self.tips_sent = 0
        self._tip_t = None  # start of the tip in progress
        self._ei = 0
        self._manual = []  # tip start times asked for with tip()
        self._rain_t0 = 0
        self._rain_k = 0  # tips of the current rain so far
        self._rain_interval = 0.0
        self._rain_end = None
        self._listener = self._tick

    def rain(self, mm_per_h, for_ms):
        """Tip at mm_per_h for for_ms from now (0 stops)."""
        now = self.clock.ticks_ms()
        self._rain_t0 = now
        self._rain_k = 0
        self._rain_end = None
        if mm_per_h > 0:
            self._rain_interval = 3600000.0 * self.mm_per_tip / mm_per_h
            self._rain_end = (now + int(for_ms)) & 0x3FFFFFFF
        self._schedule(now)

    def tip(self):
        """One tip, starting now."""
        now = self.clock.ticks_ms()
        self._manual.append(now)
        self._schedule(now)

    def _next_rain_start(self):
        if self._rain_end is None:
            return None
        t = (self._rain_t0 + int((self._rain_k + 1) * self._rain_interval + 0.5)) & 0x3FFFFFFF
        if ticks_diff(t, self._rain_end) > 0:
            self._rain_end = None
            return None
        return t

    def _next_edge(self):
        if self._tip_t is None:
            m = self._manual[0] if self._manual else None
            r = self._next_rain_start()
            if m is None and r is None:
                return None
            if r is None or (m is not None and ticks_diff(m, r) <= 0):
                self._manual.pop(0)
                self._tip_t = m
            else:
                self._rain_k += 1
                self._tip_t = r
            self._ei = 0
        return (self._tip_t + self._edges[self._ei][0]) & 0x3FFFFFFF

    def _tick(self, now):
        while True:
            t = self._next_edge()
            if t is None:
                return None
            d = ticks_diff(t, now)
            if d > 0:
                return d
            if self._ei == 0:
                self.tips_sent += 1
            self._pin.drive(self._edges[self._ei][1])
            self._ei += 1
            if self._ei == len(self._edges):
                self._tip_t = None

    def _schedule(self, now):
        # (re)register so the next edge is called at its exact time
        self.clock.remove_listener(self._listener)
        self.clock.add_listener(self._listener, self._tick(now))
