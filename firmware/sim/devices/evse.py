"""Simulated EV charging point: the control pilot and a CT clamp as ADC waveforms.

The pilot (through the node's level shifter: ``cp_volts_per_count``,
``cp_zero_count``) is a 1 kHz PWM between the state's positive level and
-12 V at the offered current's duty, or a DC level: +12 V in state A, 0 V in
E, -12 V in F, the state's level alone with the PWM off. The CT clamp (a burden
biased to ``ct_offset_count``) is a 50 Hz sine of the charging current's RMS.
Both are evaluated at the simulated ADC's microsecond ticks from integer
tables, so sampling them allocates nothing. A conversion takes ``conv_us``
(7 us: like a real ADC's timing it does not divide the PWM period, so the
samples do not sit at the same phases period after period); ``ct_conv_us``,
if given, is the CT clamp's (the virtual nodes take a slower ADC there).

    evse = EVSE(machine, clock, cp_pin=34, ct_pin=35, offered_a=16)
    evse.plug()         # B: vehicle connected, PWM offering 16 A
    evse.charge(13.5)   # C: the car draws 13.5 A RMS
    evse.unplug()       # A
    evse.fault()        # F (fault("E") for a shorted pilot)
"""
import math
from array import array

_LEVEL_V = {"A": 12.0, "B": 9.0, "C": 6.0, "D": 3.0, "E": 0.0, "F": -12.0}
_RES_US = 10  # CT table step


def duty_for_amps(amps):
    """The PWM duty (%) an EVSE sends to offer amps (IEC 61851-1: 6..51 A as
    amps / 0.6, 51..80 A as amps / 2.5 + 64)."""
    if amps <= 51:
        return amps / 0.6
    return amps / 2.5 + 64


class EVSE:
    def __init__(self, machine, clock, cp_pin, ct_pin, offered_a=16.0,
                 cp_volts_per_count=13.5 / 32767, cp_zero_count=32768,
                 ct_amps_per_count=0.0025, ct_offset_count=32768,
                 mains_hz=50, pwm_hz=1000, phase_us=0, conv_us=7, ct_conv_us=None):
        self.clock = clock
        self.cp_volts_per_count = cp_volts_per_count
        self.cp_zero_count = cp_zero_count
        self.ct_amps_per_count = ct_amps_per_count
        self.ct_offset_count = ct_offset_count
        self.mains_hz = mains_hz
        self.period_us = 1000000 // pwm_hz
        self.phase_us = phase_us
        self.state = "A"
        self.pwm = False
        self.duty_pct = 100.0
        self.amps = 0.0
        self._lo = self._counts(-12.0)
        self._hi = self._counts(12.0)
        self._high_us = self.period_us
        self._tab = array("H", [ct_offset_count])
        self._tlen = 1
        self.offer(offered_a)
        self._set("A", False)
        machine.adc_waveform(cp_pin, self._cp, conv_us)
        machine.adc_waveform(ct_pin, self._ct, conv_us if ct_conv_us is None else ct_conv_us)

    # -- what happens at the charging point
    def plug(self):
        """A vehicle is connected: state B, PWM on, no current."""
        self._set("B", True, 0.0)

    def charge(self, amps, ventilation=False):
        """The vehicle charges drawing amps RMS: state C (D with ventilation)."""
        self._set("D" if ventilation else "C", True, amps)

    def stop(self):
        """The vehicle stops charging but stays connected: back to B."""
        self._set("B", True, 0.0)

    def unplug(self):
        self._set("A", False, 0.0)

    def fault(self, state="F"):
        """F: EVSE not available (-12 V DC); E: pilot shorted (0 V)."""
        if state not in ("E", "F"):
            raise ValueError("fault state is E or F")
        self._set(state, False, 0.0)

    def offer(self, amps):
        """The current offered by PWM from now on."""
        self.set_duty(duty_for_amps(amps))

    def set_duty(self, pct):
        """Any PWM duty in % (5: digital communication; 100: PWM off)."""
        self.duty_pct = pct
        self._update()

    def pwm_off(self):
        """The EVSE is not ready: the state's level as DC (B1, C1)."""
        self.pwm = False
        self._update()

    def set_level(self, volts):
        """Force the pilot's positive level (a degraded vehicle resistor)."""
        self._hi = self._counts(volts)

    def set_current(self, amps):
        self.amps = amps
        self._make_ct()

    # -- inside
    def _counts(self, volts):
        c = int(round(self.cp_zero_count + volts / self.cp_volts_per_count))
        return 0 if c < 0 else (65535 if c > 65535 else c)

    def _set(self, state, pwm, amps=None):
        self.state = state
        self.pwm = pwm
        self._hi = self._counts(_LEVEL_V[state])
        self._update()
        if amps is not None:
            self.set_current(amps)

    def _update(self):
        if not self.pwm or self.state in ("A", "E", "F"):
            self._high_us = self.period_us  # DC at the state's level
            if self.state == "F":
                self._high_us = 0
            return
        self._high_us = int(round(self.duty_pct * self.period_us / 100))

    def _make_ct(self):
        if not self.amps:
            self._tab = array("H", [self.ct_offset_count])
            self._tlen = 1
            return
        # one table over the shortest whole number of mains cycles that is a
        # whole number of table steps (1 cycle at 50 Hz, 3 at 60 Hz)
        k = 1
        while (k * 1000000) % (self.mains_hz * _RES_US):
            k += 1
        n = k * 1000000 // (self.mains_hz * _RES_US)
        amp = self.amps * math.sqrt(2) / self.ct_amps_per_count
        tab = array("H", bytes(2 * n))
        w = 2 * math.pi * k / n
        for i in range(n):
            c = int(round(self.ct_offset_count + amp * math.sin(w * i)))
            tab[i] = 0 if c < 0 else (65535 if c > 65535 else c)
        self._tab = tab
        self._tlen = n

    def _cp(self, us):
        h = self._high_us
        if h >= self.period_us:
            return self._hi
        if h <= 0:
            return self._lo
        return self._hi if (us + self.phase_us) % self.period_us < h else self._lo

    def _ct(self, us):
        return self._tab[(us // _RES_US) % self._tlen]
