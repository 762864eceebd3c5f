"""A simulated doorway with two break-beams (or two PIR sensors).

``BeamGate(machine, pin_a, pin_b, clock, active_low=True)`` drives the two
GPIO lines (``machine.pin(n).drive(level)``) at the right virtual times: a
beam "broken" is low for break-beams and high for PIR (active_low=False).
Every scheduling method takes ``at_ms``, the time from now (the clock's
current ticks) at which the person reaches the first beam, so a test can
queue several people and then ``clock.advance()``. A beam is broken while
anyone is in it: two bodies overlapping in one beam make one long break,
as on a real doorway.

- ``walk_in(at_ms, speed_ms=300, block_ms=None, chatter=0)``: A is broken
  at at_ms, B speed_ms later; each beam stays broken block_ms (default
  speed_ms + 100: the body spans both beams for a moment). ``chatter``
  adds that many short returns to the old level, 2 ms apart, at every
  edge (a bouncing contact); the last level is the real one.
- ``walk_out(...)``: the same from B to A.
- ``abort(at_ms, dwell_ms=300, side="a")``: one beam broken for dwell_ms,
  then released without reaching the other (someone looks in, turns back).
- ``bounce(at_ms, side="a", toggles=4, gap_ms=3)``: contact chatter alone,
  ending where it began (nobody there).
- ``hold(at_ms, side="a")`` / ``release(at_ms, side="a")``: a beam broken
  until released (a stuck beam, a parked trolley).
"""
from sim.clock import ticks_diff

_BODY = 0  # someone enters (+1) or leaves (-1) a beam: broken while anyone is in it
_RAW = 1  # a level driven as is (contact chatter, a glitch)
_SETTLE = 2  # back to the level the bodies give


class BeamGate:
    def __init__(self, machine, pin_a, pin_b, clock, active_low=True):
        self.clock = clock
        self.active_low = active_low
        self._pins = {"a": machine.pin(pin_a), "b": machine.pin(pin_b)}
        self._bodies = {"a": 0, "b": 0}  # people in each beam right now
        self._events = []  # [due ticks, side, kind, value], in time order
        self._listener = self._tick
        self._listening = False
        self._in_tick = False
        self.edges = 0  # levels driven so far
        for p in self._pins.values():
            p.drive(self._level(False))

    def _level(self, broken):
        return (0 if broken else 1) if self.active_low else (1 if broken else 0)

    # -- scheduling
    def _add(self, at_ms, side, kind, value):
        if side not in self._pins:
            raise ValueError("side is 'a' or 'b'")
        due = (self.clock.ticks_ms() + max(int(at_ms), 0)) & 0x3FFFFFFF
        ev = self._events
        i = len(ev)
        while i > 0 and ticks_diff(ev[i - 1][0], due) > 0:
            i -= 1
        ev.insert(i, [due, side, kind, value])
        self._schedule()

    def at(self, at_ms, side, broken):
        """Drive beam "a" or "b" broken (True) or clear (False) at_ms from now,
        whoever is in it (a raw level, as a glitch would)."""
        self._add(at_ms, side, _RAW, broken)

    def _body(self, t, side, delta, chatter):
        # a body enters (+1) or leaves (-1) the beam; `chatter` short returns
        # to the old level, 2 ms apart, before the level settles
        new = delta > 0
        for k in range(2 * chatter):
            self._add(t + 2 * k, side, _RAW, new if k % 2 == 0 else not new)
        self._add(t + 4 * chatter, side, _BODY, delta)

    def _cross(self, first, second, at_ms, speed_ms, block_ms, chatter):
        if block_ms is None:
            block_ms = speed_ms + 100
        self._body(at_ms, first, 1, chatter)
        self._body(at_ms + block_ms, first, -1, chatter)
        self._body(at_ms + speed_ms, second, 1, chatter)
        self._body(at_ms + speed_ms + block_ms, second, -1, chatter)

    def walk_in(self, at_ms, speed_ms=300, block_ms=None, chatter=0):
        self._cross("a", "b", at_ms, speed_ms, block_ms, chatter)

    def walk_out(self, at_ms, speed_ms=300, block_ms=None, chatter=0):
        self._cross("b", "a", at_ms, speed_ms, block_ms, chatter)

    def abort(self, at_ms, dwell_ms=300, side="a"):
        self._body(at_ms, side, 1, 0)
        self._body(at_ms + dwell_ms, side, -1, 0)

    def bounce(self, at_ms, side="a", toggles=4, gap_ms=3):
        for k in range(toggles):
            self._add(at_ms + k * gap_ms, side, _RAW, k % 2 == 0)
        self._add(at_ms + toggles * gap_ms, side, _SETTLE, None)

    def hold(self, at_ms, side="a"):
        self._body(at_ms, side, 1, 0)

    def release(self, at_ms, side="a"):
        self._body(at_ms, side, -1, 0)

    def pending(self):
        return len(self._events)

    # -- driving the lines from the clock
    def _schedule(self):
        if self._in_tick:
            return  # _tick returns the next due time itself
        if self._listening:
            self.clock.remove_listener(self._listener)
            self._listening = False
        if self._events:
            d = ticks_diff(self._events[0][0], self.clock.ticks_ms())
            if d <= 0:
                self._tick(self.clock.ticks_ms())
                if not self._events:
                    return
                d = ticks_diff(self._events[0][0], self.clock.ticks_ms())
            self.clock.add_listener(self._listener, d)
            self._listening = True

    def _tick(self, now):
        self._in_tick = True
        try:
            ev = self._events
            while ev and ticks_diff(ev[0][0], now) <= 0:
                _, side, kind, value = ev.pop(0)
                if kind == _RAW:
                    broken = value
                else:
                    if kind == _BODY:
                        self._bodies[side] = max(0, self._bodies[side] + value)
                    broken = self._bodies[side] > 0
                self._pins[side].drive(self._level(broken))
                self.edges += 1
        finally:
            self._in_tick = False
        if not self._events:
            return None
        return ticks_diff(self._events[0][0], now)
