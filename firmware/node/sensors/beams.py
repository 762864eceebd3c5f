"""Directional people counting from two break-beams (or two PIR sensors).

Beam A is on the outside, beam B on the inside: A then B is one person in,
B then A one person out. The pin interrupts only timestamp: each edge puts
(pin, level) and ticks_ms into a preallocated ring and bumps an index.
read_into does the rest, allocating nothing:

- debounce: a level counts once it has held for ``debounce_ms`` (a glitch
  shorter than that is dropped whole, chatter around a real edge collapses
  into that edge); an edge still settling waits for the next read;
- pairing: when a beam is broken and a crossing started on the other beam
  is pending, that crossing completes (the oldest first, so two people
  close together are two crossings); otherwise a crossing starts on this
  beam. A crossing whose beam was released more than ``max_cross_ms`` ago
  without reaching the other beam is dropped and counted in ``aborted``
  (someone looked in and turned back);
- occupancy = ins - outs, never below 0 (each clamp counted in ``clamped``);
- a beam broken for longer than 10 s (60 s for PIR, which stay on while
  people move about) is stuck: status "warning", errors += 1 once, reads
  return False until it clears (the counts wait for the next good read);
- a full edge ring drops the newest edges (``lost``, errors += 1 per read
  that saw losses) and the beam states are taken from the pins again.

Channels per read: people entering and leaving since the last read
(counters: the window reports their sum) and the current occupancy.
"""
from array import array
from micropython import const
from node.sensors import SensorError, OK, WARNING, FAILED

_RING = const(128)  # edges between two reads; a power of two
_RMASK = const(127)
_IMASK = const(0xFFFF)  # ring indices run modulo 2**16
_PEND = const(8)  # crossings under way at once
_STUCK_MS = const(10000)
_PIR_STUCK_MS = const(60000)
_A = const(0)
_B = const(1)


class BeamPair:
    KIND = "beam_pair"
    CHANNELS = ("people_in", "people_out", "occupancy")
    SCALES = (1, 1, 1)
    COUNTERS = (True, True, False)

    def __init__(self, pins, clock, opts):
        self._pins = pins
        self._clock = clock
        opts = opts or {}
        self.debounce_ms = opts.get("debounce_ms", 30)
        self.max_cross_ms = opts.get("max_cross_ms", 1500)
        self.active_low = opts.get("active_low", True)
        self.stuck_ms = _STUCK_MS if self.active_low else _PIR_STUCK_MS
        # edge ring, written by the interrupt handlers only
        self._ts = array("i", bytes(4 * _RING))
        self._ev = bytearray(_RING)  # pin * 2 + level
        self._ctl = array("i", [0, 0, 0])  # write index, read index, edges lost
        # debounced beam state, when it last went on / off
        self._on = bytearray(2)
        self._on_t = array("i", [0, 0])
        # crossings under way, oldest first; all started on the same beam
        # (a crossing from the other side completes one instead)
        self._p_rel = array("i", bytes(4 * _PEND))  # when its beam was released
        self._p_in = bytearray(_PEND)  # 1 while its beam is still broken
        self._p_head = 0
        self._p_n = 0
        self._p_beam = 0
        self._lost_seen = 0
        self._stuck = 0  # bit per beam
        self._irqs = None
        self._ready = False
        self._in = 0
        self._out = 0
        self.occupancy = 0
        self.entered = 0  # totals since begin()
        self.left = 0
        self.aborted = 0
        self.clamped = 0
        self.lost = 0
        self.errors = 0
        self.status = WARNING  # not set up yet

    def _make_irq(self, pid, pin):
        # one closure per pin: stores the edge, touches nothing else. It
        # closes over three names only: MicroPython calls a closure with
        # more than five cells + arguments through a heap-allocated array,
        # which a hard interrupt (heap locked) cannot have.
        code = pid << 1

        def irq(p):
            ctl = self._ctl
            w = ctl[0]
            if ((w - ctl[1]) & _IMASK) >= _RING:
                ctl[2] += 1
                return
            i = w & _RMASK
            self._ts[i] = self._clock.ticks_ms()
            self._ev[i] = code | pin.value()
            ctl[0] = (w + 1) & _IMASK

        return irq

    def begin(self):
        """Take the beams' present state and start the edge interrupts."""
        pins = self._pins
        try:
            pa = pins["a"]
            pb = pins["b"]
        except (KeyError, TypeError):
            self.status = FAILED
            raise SensorError("beam_pair: needs pins a (outside) and b (inside)")
        if self._irqs is None:
            self._irqs = (self._make_irq(_A, pa), self._make_irq(_B, pb))
        now = self._clock.ticks_ms()
        ctl = self._ctl
        try:
            for pid in range(2):
                p = pa if pid == _A else pb
                trig = p.IRQ_FALLING | p.IRQ_RISING
                try:
                    p.irq(self._irqs[pid], trigger=trig, hard=True)
                except TypeError:  # a port without hard interrupts
                    p.irq(self._irqs[pid], trigger=trig)
                self._on[pid] = self._active(p.value())
                self._on_t[pid] = now
        except OSError as e:
            self.status = FAILED
            raise SensorError("beam_pair: cannot set the pin interrupts (OSError %s)" % e.args[0])
        ctl[1] = ctl[0]
        self._lost_seen = ctl[2]
        self._p_n = 0
        self._stuck = 0
        self._in = self._out = 0
        self._ready = True
        self.status = OK

    def stop(self):
        """Detach the interrupts (begin() starts again)."""
        for k in ("a", "b"):
            p = self._pins.get(k)
            if p is not None:
                p.irq(None)
        self._ready = False

    def reset_occupancy(self, n=0):
        """Set the occupancy (e.g. 0 at closing time, when the place is known empty)."""
        self.occupancy = n if n > 0 else 0

    def _active(self, level):
        return (level ^ 1) if self.active_low else level

    # -- processing (read_into only)

    def _expire(self, t):
        # drop crossings whose beam was released too long ago
        mx = self.max_cross_ms
        rel = self._p_rel
        inb = self._p_in
        diff = self._clock.ticks_diff
        while self._p_n:
            h = self._p_head
            if inb[h] or diff(t, rel[h]) <= mx:
                return
            self._p_head = (h + 1) % _PEND
            self._p_n -= 1
            self.aborted += 1

    def _beam(self, pid, on, t):
        if self._on[pid] == on:
            return
        self._on[pid] = on
        if not on:
            # release: the crossing this beam started (if still pending) starts its clock
            if self._p_n and self._p_beam == pid:
                i = (self._p_head + self._p_n - 1) % _PEND
                if self._p_in[i]:
                    self._p_in[i] = 0
                    self._p_rel[i] = t
            return
        self._on_t[pid] = t
        self._expire(t)
        if self._p_n and self._p_beam != pid:
            # completes the oldest crossing started on the other beam
            self._p_head = (self._p_head + 1) % _PEND
            self._p_n -= 1
            if pid == _B:
                self._in += 1
                self.entered += 1
                self.occupancy += 1
            else:
                self._out += 1
                self.left += 1
                if self.occupancy > 0:
                    self.occupancy -= 1
                else:
                    self.clamped += 1
            return
        if self._p_n == _PEND:  # more crossings under way than anyone could make
            self._p_head = (self._p_head + 1) % _PEND
            self._p_n -= 1
            self.aborted += 1
        i = (self._p_head + self._p_n) % _PEND
        self._p_in[i] = 1
        self._p_rel[i] = t
        self._p_n += 1
        self._p_beam = pid

    def _drain(self, now):
        # apply the settled edges in order; returns True when all were used
        ts = self._ts
        ev = self._ev
        ctl = self._ctl
        db = self.debounce_ms
        diff = self._clock.ticks_diff
        inv = 1 if self.active_low else 0
        r = ctl[1]
        w = ctl[0]
        while r != w:
            i = r & _RMASK
            code = ev[i]
            pid = code >> 1
            t = ts[i]
            # the level holds until the next edge on the same pin
            j = (r + 1) & _IMASK
            while j != w:
                k = j & _RMASK
                if ev[k] >> 1 == pid:
                    held = diff(ts[k], t)
                    break
                j = (j + 1) & _IMASK
            else:
                held = diff(now, t)
                if held < db:
                    return False  # still settling: the next read decides
            if held >= db:
                self._beam(pid, (code & 1) ^ inv, t)
            r = (r + 1) & _IMASK
            ctl[1] = r
        return True

    def read_into(self, out, offset):
        """Fill out[offset:offset+3] with people in and out since the last read
        and the occupancy; False while a beam is stuck."""
        if not self._ready:
            return False
        clock = self._clock
        now = clock.ticks_ms()
        done = self._drain(now)
        warn = False
        lost = self._ctl[2]
        if lost != self._lost_seen:
            self.lost += (lost - self._lost_seen) & 0x3FFFFFFF
            self._lost_seen = lost
            self.errors += 1
            warn = True
            if done:  # edges went missing: believe the pins
                inv = 1 if self.active_low else 0
                self._beam(_A, self._pins["a"].value() ^ inv, now)
                self._beam(_B, self._pins["b"].value() ^ inv, now)
        if done:
            self._expire(now)
        else:
            self._expire(self._ts[self._ctl[1] & _RMASK])
        stuck = 0
        for pid in range(2):
            if self._on[pid] and clock.ticks_diff(now, self._on_t[pid]) > self.stuck_ms:
                stuck |= 1 << pid
        if stuck:
            new = stuck & ~self._stuck
            if new:
                self.errors += 1
                # the crossing the stuck beam started cannot complete
                if self._p_n and new & (1 << self._p_beam):
                    i = (self._p_head + self._p_n - 1) % _PEND
                    if self._p_in[i]:
                        self._p_n -= 1
                        self.aborted += 1
            self._stuck = stuck
            self.status = WARNING
            return False
        self._stuck = 0
        out[offset] = self._in
        out[offset + 1] = self._out
        out[offset + 2] = self.occupancy
        self._in = 0
        self._out = 0
        self.status = WARNING if warn else OK
        return True
