"""EV charger: control pilot state and offered current (IEC 61851-1), and the
charging current from a CT clamp, both sampled in bursts on an ADC.

Pilot states (IEC 61851-1 Annex A) from the positive plateau of the pilot,
each band the nominal level +-1 V, the range the EVSE detects a state in;
readings between bands are not a state (the gaps, as e.g. Vector's VC-EVCC
manual treats them):

    state  nominal  band (V)       meaning                        cp_state
    A      +12      11 .. 13       no vehicle                     1
    B      +9       8 .. 10        vehicle connected              2
    C      +6       5 .. 7         charging                       3
    D      +3       2 .. 4         charging, ventilation needed   4
    E      0        -1 .. 1        pilot shorted / no mains       5
    F      -12      -13 .. -11     EVSE not available (fault)     6

Offered current from the PWM duty (IEC 61851-1 Annex A, the duty cycle the
EVSE sends, as tabulated in e.g. the Fluke FEV300 manual): duty < 3 %: no
charging; 3..7 %: digital communication (5 % nominal, ISO 15118); 7..8 %: no
charging; 8..10 %: 6 A; 10..85 %: duty x 0.6 A; 85..96 %: (duty - 64) x
2.5 A; 96..97 %: 80 A; > 97 %: no charging (100 %, no PWM: states x1, EVSE
not ready). offered_a is 0 wherever no current is offered; ``digital`` says
when the EVSE asks for digital communication instead.

Accuracy of the duty: a burst of 200 samples (4 PWM periods) holds it within
about 1 % at 1 kHz +-2 % (0.6 A below 51 A, 2.5 A above); burst_n 800 within
about 0.6 %. An ADC that cannot keep the 20 us pace only spaces the samples
further: the duty comes from whole periods between edges either way.

Charging sessions (``take_events``): a session starts when the state enters C
or D and ends when it leaves them for A, B, E or F (a glitch between bands
changes nothing), with the energy from ``meter`` (its import energy at the
end minus at the start, one meter reading old at either end), the peak of
its power seen during the session and the duration. A session already under
way when the node started, or whose meter answered only later, is marked
``partial``. Every state change is an ``ev.state`` event; E and F are also an
``ev.fault`` warning.

The bursts run with small ints into preallocated arrays and allocate
nothing; samples are paced with clock.ticks_us and the wait between samples
keeps the ADC converting (the CPU spins either way; the simulated ADC's
conversions are what move its microsecond clock).
"""
from array import array
from micropython import const
from node.sensors import EventSource, Sensor, isqrt, OK

STATES = "ABCDEF"  # cp_state 1..6
INVALID = "?"
DIGITAL = "digital"

_BANDS = ((11.0, 13.0), (8.0, 10.0), (5.0, 7.0), (2.0, 4.0), (-1.0, 1.0), (-13.0, -11.0))
_SPLIT_V = -6.0  # pilot above this is the high part of the PWM, below it the -12 V part
_CP_US = const(20)  # target pilot sample interval
# what the integer duty path gives instead of a current
NO_PWM = const(-1)  # DC pilot: 0 % or 100 %
NO_CHARGING = const(-2)  # a duty that allows no charging
DIGITAL_COMM = const(-3)  # 3..7 %: digital communication


def pilot_state(volts):
    """"A".."F" for a pilot plateau voltage, or "?" between the bands."""
    for i in range(6):
        lo, hi = _BANDS[i]
        if lo <= volts <= hi:
            return STATES[i]
    return INVALID


def duty_to_amps(duty_pct):
    """Offered current (A) for a PWM duty in %, DIGITAL for 3..7 % (digital
    communication), None where the duty allows no charging."""
    if duty_pct < 3 or duty_pct > 97:
        return None
    if duty_pct <= 7:
        return DIGITAL
    if duty_pct < 8:
        return None
    if duty_pct < 10:
        return 6.0
    if duty_pct <= 85:
        return duty_pct * 0.6
    if duty_pct <= 96:
        return (duty_pct - 64) * 2.5
    return 80.0


def _amps10(duty10):
    # duty_to_amps in small ints: duty in 0.1 %, current in 0.1 A or a reason (< 0)
    if duty10 <= 0 or duty10 >= 1000:
        return NO_PWM
    if duty10 < 30 or duty10 > 970:
        return NO_CHARGING
    if duty10 <= 70:
        return DIGITAL_COMM
    if duty10 < 80:
        return NO_CHARGING
    if duty10 < 100:
        return 60
    if duty10 <= 850:
        return (duty10 * 6 + 5) // 10
    if duty10 <= 960:
        return ((duty10 - 640) * 5 + 1) // 2
    return 800


def rms(buf, n, offset):
    """RMS of buf[0:n] minus offset, as a float (the reference the integer path is checked against)."""
    s = 0.0
    for i in range(n):
        d = buf[i] - offset
        s += d * d
    return (s / n) ** 0.5 if n else 0.0


def _ceil(x):
    i = int(x)
    return i + 1 if i < x else i


def _floor(x):
    i = int(x)
    return i - 1 if i > x else i


def _burst(read, tus, diff, add, buf, n, num, den):
    # n samples into buf, sample i at t0 + i * num / den us (exactly, by
    # carrying the remainder); returns the us the burst took
    q = num // den
    r = num % den
    err = 0
    t0 = due = tus()
    for i in range(n):
        while diff(tus(), due) < 0:
            read()  # keep converting while waiting (see the module's docstring)
        buf[i] = read()
        due = add(due, q)
        err += r
        if err >= den:
            err -= den
            due = add(due, 1)
    return diff(tus(), t0)


class _ADCDriver(Sensor):
    # what both burst drivers share: the ADC, the burst, begin()
    def __init__(self, adc, clock):
        self._adc = adc
        self._read = adc.read_u16
        self.clock = clock
        # bound once: a bound method made per burst would be an allocation
        self._tus = clock.ticks_us
        self._diff = clock.ticks_diff
        self._add = clock.ticks_add
        self._bad = None  # why the options cannot work, raised by begin()
        self.burst_us = 0

    def begin(self):
        if self._bad:
            self._fail(self._bad)
        try:
            self._read()
        except OSError as e:
            self._fail("ADC error (OSError %s)" % e.args[0])
        self._ready = True
        self.status = OK

    def _sample(self, num, den):
        try:
            self.burst_us = _burst(self._read, self._tus, self._diff, self._add, self._buf, self._n,
                                   num, den)
        except OSError:
            return self._warn()
        return True


class CPPilot(_ADCDriver, EventSource):
    """Control pilot through a divider/level shifter on an ADC.

    opts: volts_per_count (pilot volts per ADC count), zero_count (count at
    0 V), burst_n (samples per reading, default 200). A reading is a burst of
    burst_n samples about 20 us apart over whole 1 kHz PWM periods (200
    samples: 4 periods); the mean of the high samples is the plateau, the
    share of high samples between the first and last edge of each kind is
    the duty. ``meter`` (an SDM meter driver, set by the app) gives the
    charging sessions their energy and peak power.
    """
    KIND = "cp_pilot"
    CHANNELS = ("cp_state", "offered_a")
    SCALES = (1, 10)  # A=1 B=2 C=3 D=4 E=5 F=6; 0.1 A

    def __init__(self, adc, clock, opts):
        super().__init__(adc, clock)
        self.meter = None
        n = opts.get("burst_n", 200)
        vpc = opts.get("volts_per_count", 0)
        zero = opts.get("zero_count", 32768)
        if not 2 <= n <= 20000:
            self._bad = "burst_n %d not in 2..20000" % n
            n = 2
        if not vpc or vpc <= 0:
            self._bad = "volts_per_count must be > 0"
            vpc = 1.0
        self._n = n
        self._buf = array("H", bytes(2 * n))
        periods = max(1, n * _CP_US // 1000)
        # the burst spans whole PWM periods plus one sample interval, so the
        # sample phase creeps through the period (finer duty than one sample)
        self._span = periods * 1000 + periods * 1000 // n
        self._split = _ceil(zero + _SPLIT_V / vpc)
        self._bands = array("i", [0] * 12)
        for i in range(6):
            lo, hi = _BANDS[i]
            self._bands[2 * i] = _ceil(zero + lo / vpc)
            self._bands[2 * i + 1] = _floor(zero + hi / vpc)
        self.state = None  # "A".."F" once seen
        self.duty10 = 0  # PWM duty in 0.1 % (0 or 1000 without PWM)
        self.offered10 = 0  # offered current in 0.1 A
        self.digital = False  # 3..7 %: digital communication asked for
        self.plateau_count = 0
        self.invalid = 0  # readings between the bands
        self._events = []
        self._session = False
        self._partial = False
        self._sess_ms = 0
        self._last_ms = 0
        self._e0 = None
        self._peak = None

    def read_into(self, out, offset):
        """Fill cp_state (1..6) and offered_a (0.1 A, 0 when none is offered)."""
        if not self._ready:
            return False
        if not self._sample(self._span, self._n):
            return False
        buf = self._buf
        n = self._n
        split = self._split
        nh = 0  # high samples so far
        sh = 0
        sl = 0
        r0 = r1 = f0 = f1 = -1  # first/last rising and falling edge
        hr0 = hr1 = hf0 = hf1 = 0  # high samples before them
        prev = buf[0] >= split
        for i in range(n):
            v = buf[i]
            h = v >= split
            if h != prev:
                if h:
                    if r0 < 0:
                        r0 = i
                        hr0 = nh
                    r1 = i
                    hr1 = nh
                else:
                    if f0 < 0:
                        f0 = i
                        hf0 = nh
                    f1 = i
                    hf1 = nh
                prev = h
            if h:
                nh += 1
                sh += v
            else:
                sl += v
        m = sh // nh if nh else sl // n
        self.plateau_count = m
        code = 0
        b = self._bands
        for i in range(6):
            if b[2 * i] <= m <= b[2 * i + 1]:
                code = i + 1
                break
        if code == 0:
            self.invalid += 1
            return self._warn()
        # duty over whole PWM periods: between the first and last rising edge
        # plus between the first and last falling edge
        span = 0
        high = 0
        if r1 > r0:
            span += r1 - r0
            high += hr1 - hr0
        if f1 > f0:
            span += f1 - f0
            high += hf1 - hf0
        if span:
            duty10 = (high * 1000 + span // 2) // span
        elif r0 < 0 and f0 < 0:
            duty10 = 1000 if nh else 0  # no edge: DC, no PWM
        else:
            duty10 = (nh * 1000 + n // 2) // n  # less than a period seen
        a = _amps10(duty10)
        self.duty10 = duty10
        self.digital = a == DIGITAL_COMM
        self.offered10 = a if a > 0 else 0
        out[offset] = code
        out[offset + 1] = self.offered10
        self.status = OK
        self._track(STATES[code - 1])
        return True

    # -- charging sessions and events

    def _energy(self):
        m = self.meter
        return None if m is None else getattr(m, "energy_kwh", None)

    def _power(self):
        m = self.meter
        return None if m is None else getattr(m, "power_w", None)

    def _track(self, s):
        prev = self.state
        now = self.clock.ticks_ms()
        if self._session:
            self._sess_ms += self.clock.ticks_diff(now, self._last_ms)
            self._last_ms = now
            if self._e0 is None:
                e = self._energy()
                if e is not None:
                    self._e0 = e  # the meter answered only after the start
                    self._partial = True
            p = self._power()
            if p is not None and (self._peak is None or p > self._peak):
                self._peak = p
        if s == prev:
            return
        self.state = s
        self._emit("ev.state", "info", {"from": prev, "to": s})
        if s == "E" or s == "F":
            self._emit("ev.fault", "warning", {
                "state": s, "from": prev,
                "reason": "pilot shorted or no mains" if s == "E" else "EVSE not available"})
        charging = s == "C" or s == "D"
        if charging and not self._session:
            self._start(prev, now)
        elif self._session and not charging:
            self._end(s)

    def _start(self, prev, now):
        e = self._energy()
        p = self._power()
        self._session = True
        self._partial = prev is None  # the node started while the car was charging
        self._sess_ms = 0
        self._last_ms = now
        self._e0 = e
        self._peak = p
        data = {"state": self.state, "offered_a": self.offered10 / 10,
                "meter_kwh": None if e is None else round(e, 3)}
        if self._partial:
            data["partial"] = True
        self._emit("ev.session_start", "info", data)

    def _end(self, to):
        e = self._energy()
        p = self._power()
        if p is not None and (self._peak is None or p > self._peak):
            self._peak = p
        energy = None
        if e is not None and self._e0 is not None:
            energy = round(e - self._e0, 3)
        data = {"energy_kwh": energy,
                "peak_w": None if self._peak is None else round(self._peak, 1),
                "duration_s": self._sess_ms // 1000, "to": to,
                "meter_kwh": None if e is None else round(e, 3)}
        if self._partial:
            data["partial"] = True
        self._session = False
        self._emit("ev.session_end", "info", data)


class CTClamp(_ADCDriver):
    """Charging current from a CT clamp (burden, mid-rail bias) on an ADC.

    opts: amps_per_count, burst_hz (>= 2000, default 4000), cycles (default
    10), mains_hz (50: Iwaki is on the 50 Hz grid). A reading is a burst of
    n = burst_hz * cycles // mains_hz samples spread evenly over exactly
    ``cycles`` mains periods, the DC offset (the burst's mean) removed and the
    RMS taken with integer sums: current_a in 0.01 A. A burst that clipped at
    a rail or fell behind its timing by more than a sample is not reported.
    A reading blocks for the burst: 200 ms with the defaults.
    """
    KIND = "ct_clamp"
    CHANNELS = ("current_a",)
    SCALES = (100,)  # 0.01 A

    def __init__(self, adc, clock, opts):
        super().__init__(adc, clock)
        apc = opts.get("amps_per_count", 0)
        hz = opts.get("burst_hz", 4000)
        cycles = opts.get("cycles", 10)
        mains = opts.get("mains_hz", 50)
        if not apc or apc <= 0:
            self._bad = "amps_per_count must be > 0"
            apc = 1.0
        if hz < 2000 or not 1 <= cycles <= 50 or mains not in (50, 60):
            self._bad = "burst of %d Hz over %d cycles of %d Hz" % (hz, cycles, mains)
            hz, cycles, mains = 4000, 10, 50
        n = hz * cycles // mains
        self._n = n
        self._buf = array("H", bytes(2 * n))
        self._num = 1000000 * cycles  # burst length in us is num / mains
        self._den = mains * n  # per sample: num / den us
        self._late_us = self._num // self._den + 1
        # centi-amps = rms_counts * apc * 100 as (R * K) >> shift, K < 2**15
        f = apc * 100
        s = 0
        while f * 2 < 32768 and s < 40:
            f *= 2
            s += 1
        self._k = int(f + 0.5)
        self._shift = s
        self.offset = 0  # the burst's mean (counts)
        self.rms_counts = 0
        self.clipped = 0
        self.overruns = 0

    def read_into(self, out, offset):
        """Fill current_a (0.01 A RMS) from one burst over whole mains cycles."""
        if not self._ready:
            return False
        if not self._sample(self._num, self._den):
            return False
        n = self._n
        if self._late():
            self.overruns += 1
            return self._warn()
        buf = self._buf
        hi = lo = 0
        mn = 65535
        mx = 0
        for i in range(n):
            v = buf[i]
            hi += v >> 8
            lo += v & 0xFF
            if v < mn:
                mn = v
            if v > mx:
                mx = v
        if mn == 0 or mx == 65535:
            self.clipped += 1
            return self._warn()
        mean = (hi // n << 8) + ((hi % n << 8) + lo) // n
        # sum of squares kept below 2**30: low 15 bits in acc, the rest in top
        acc = top = 0
        for i in range(n):
            d = buf[i] - mean
            acc += d * d
            top += acc >> 15
            acc &= 0x7FFF
        ms = (top // n << 15) + ((top % n << 15) + acc) // n
        # sqrt with up to 8 extra bits of precision for small signals
        s = 0
        while ms < 0x4000000 and s < 8:
            ms <<= 2
            s += 1
        r = isqrt(ms)
        if ms - r * r > r:
            r += 1  # round to nearest
        sh = self._shift + s
        ca = ((r * self._k >> (sh - 1)) + 1) >> 1 if sh > 0 else r * self._k
        self.offset = mean
        self.rms_counts = r >> s
        out[offset] = ca
        self.status = OK
        return True

    def _late(self):
        # the last sample was due (n - 1) intervals after the first; more than
        # one interval beyond that and the burst no longer spans whole cycles
        n = self._n
        due_last = (self._num // self._den) * (n - 1)
        return self.burst_us > due_last + 2 * self._late_us
