"""River level: the four Japanese river stages and two level sensors.

Stages (国土交通省 / prefectural 指定河川): 水防団待機水位 "standby",
氾濫注意水位 "caution", 避難判断水位 "evacuation", 氾濫危険水位 "danger";
"normal" below standby. A rising level enters a stage at its threshold; a
falling one leaves it only below threshold - hysteresis, so waves and
sensor noise at a threshold do not flap. Levels are fixed-point mm.

Drivers: ``A02YYUW`` (DFRobot A02YYUW / JSN-SR04T mode-UART ultrasonic
ranger looking down at the water) and ``Level420`` (submersible pressure
transducer, 4-20 mA through a shunt into an ADC). Both report ``level_m``
in mm (scale 1000), raise ("river.stage", severity, {"stage", "from",
"level_m"}) on every stage change ("warning" rising to standby/caution,
"critical" rising to evacuation/danger, "info" falling back) and hold
``alert`` while the stage is caution or above.
"""
from array import array
from micropython import const
from node.sensors import EventSource, SensorError, UARTSensor, OK, WARNING, FAILED

STAGE_NAMES = ("normal", "standby", "caution", "evacuation", "danger")
CAUTION = const(2)
EVACUATION = const(3)
_UNSET = const(0x3FFFFFFF)  # a stage the river does not define: never reached


def _mm(m):
    return int(m * 1000 + (0.5 if m >= 0 else -0.5))


class Stages:
    """Stage tracking in mm. thresholds_m: {"standby": m, "caution": m,
    "evacuation": m, "danger": m} (a river may leave some out) or four
    rising values; hysteresis_m applies on the way down."""

    def __init__(self, thresholds_m, hysteresis_m=0.05):
        th = array("i", [_UNSET] * 5)
        if isinstance(thresholds_m, dict):
            for name, v in thresholds_m.items():
                if name not in STAGE_NAMES or name == "normal":
                    raise SensorError("unknown river stage %r (expected %s)"
                                      % (name, ", ".join(STAGE_NAMES[1:])))
                th[STAGE_NAMES.index(name)] = _mm(v)
        else:
            if len(thresholds_m) != 4:
                raise SensorError("river stages: four thresholds, standby to danger")
            for i in range(4):
                th[i + 1] = _mm(thresholds_m[i])
        last = None
        for i in range(1, 5):
            if th[i] != _UNSET:
                if last is not None and th[i] <= th[last]:
                    raise SensorError("river stage %s (%.2f m) must be above %s (%.2f m)"
                                      % (STAGE_NAMES[i], th[i] / 1000, STAGE_NAMES[last], th[last] / 1000))
                last = i
        if hysteresis_m < 0:
            raise SensorError("river stages: hysteresis_m must not be negative")
        self._th = th
        self._hyst = _mm(hysteresis_m)
        self.stage = 0

    @property
    def name(self):
        return STAGE_NAMES[self.stage]

    def threshold_mm(self, stage):
        t = self._th[stage]
        return None if t == _UNSET else t

    def update(self, level_m):
        """-> None, or (old, new) stage indexes when the stage changed."""
        return self.update_mm(_mm(level_m))

    def update_mm(self, level):
        """update() for a level in mm; allocates only on a change."""
        th = self._th
        s = self.stage
        new = s
        i = 4
        while i > s:
            if level >= th[i]:
                new = i
                break
            i -= 1
        if new == s:
            h = self._hyst
            while new > 0 and level < th[new] - h:
                new -= 1
                while new > 0 and th[new] == _UNSET:
                    new -= 1
        if new == s:
            return None
        self.stage = new
        return (s, new)


class RiverLevel(EventSource):
    """Stage tracking, events and alert shared by the river level drivers."""

    def __init__(self, opts):
        self.stages = Stages(opts.get("stages") or {}, opts.get("hysteresis_m", 0.05))
        self.alert = False
        self._events = []

    @property
    def stage(self):
        return self.stages.name

    def _level(self, mm):
        ch = self.stages.update_mm(mm)
        if ch is None:
            return
        old, new = ch
        if new < old:
            sev = "info"
        else:
            sev = "critical" if new >= EVACUATION else "warning"
        self._emit("river.stage", sev, {"stage": STAGE_NAMES[new], "from": STAGE_NAMES[old],
                                        "level_m": mm / 1000})
        self.alert = new >= CAUTION


# -- A02YYUW ultrasonic ranger (UART 9600 8N1, ~10 frames/s) ---------------
_HDR = const(0xFF)
_MIN_MM = const(30)  # blind zone
_MAX_MM = const(4500)
_CHUNK = const(32)
_MEDIAN = const(5)  # frames the reported distance is the median of
_STALE_MS = const(2000)


class A02YYUW(RiverLevel, UARTSensor):
    """Frames 0xFF, H, L, SUM with SUM = (0xFF + H + L) & 0xFF and distance
    H*256+L mm. Bad frames are counted (``bad_frames``) and skipped, bytes
    outside frames counted in ``skipped``, readings outside 30..4500 mm
    counted in ``out_of_range`` and not reported. The reported distance is
    the median of the last five good frames (half a second), so one echo
    off a bird or a raindrop cannot raise a stage. level = mount - distance.

    opts: "mount_m" (the sensor face above the datum, required), "stages",
    "hysteresis_m" (0.05)."""

    KIND = "a02yyuw"
    CHANNELS = ("level_m", "distance_mm")
    SCALES = (1000, 1)

    def __init__(self, uart, clock, opts):
        if "mount_m" not in opts:
            raise SensorError("a02yyuw: option mount_m (sensor face above the datum) is required")
        RiverLevel.__init__(self, opts)
        self._uart = uart
        self._clock = clock
        self._mount = _mm(opts["mount_m"])
        self._chunk = bytearray(_CHUNK)
        self._f = bytearray(4)
        self._n = 0
        self._recent = array("i", [0] * _MEDIAN)
        self._sorted = array("i", [0] * _MEDIAN)
        self._nrecent = 0
        self._irecent = 0
        self._fresh = False
        self._t_good = 0
        self._stale = False
        self._ready = False
        self.frames = 0
        self.bad_frames = 0
        self.out_of_range = 0
        self.skipped = 0
        self.errors = 0
        self.status = WARNING

    def begin(self):
        """Drop whatever is queued (a frame cut by power-up)."""
        self._drain()
        self._n = 0
        self._nrecent = 0
        self._fresh = False
        self._t_good = self._clock.ticks_ms()
        self._ready = True
        self.status = OK

    def read_into(self, out, offset):
        """out[offset] = level (mm above the datum), out[offset + 1] = distance
        (mm); False when no good frame came since the last call."""
        if not self._ready:
            return False
        bad = self.bad_frames + self.out_of_range
        if not self._pump():
            return False
        bad = self.bad_frames + self.out_of_range - bad
        self.errors += bad
        now = self._clock.ticks_ms()
        if not self._fresh:
            if bad:
                self.status = WARNING
            elif not self._stale and self._clock.ticks_diff(now, self._t_good) > _STALE_MS:
                self._stale = True  # silent: wiring, power, or nothing in range
                self.errors += 1
                self.status = WARNING
            return False
        self._fresh = False
        self._t_good = now
        self._stale = False
        d = self._median()
        level = self._mount - d
        out[offset] = level
        out[offset + 1] = d
        self._level(level)
        self.status = OK
        return True

    def _median(self):
        k = self._nrecent
        s = self._sorted
        r = self._recent
        for i in range(k):
            v = r[i]
            j = i
            while j > 0 and s[j - 1] > v:
                s[j] = s[j - 1]
                j -= 1
            s[j] = v
        return s[(k - 1) >> 1]

    def _feed(self, b):
        f = self._f
        n = self._n
        if n == 0:
            if b == _HDR:
                f[0] = b
                self._n = 1
            else:
                self.skipped += 1
            return
        f[n] = b
        n += 1
        if n < 4:
            self._n = n
            return
        if (f[0] + f[1] + f[2]) & 0xFF == f[3]:
            self._n = 0
            self.frames += 1
            d = (f[1] << 8) | f[2]
            if d < _MIN_MM or d > _MAX_MM:
                self.out_of_range += 1
                return
            self._recent[self._irecent] = d
            self._irecent = (self._irecent + 1) % _MEDIAN
            if self._nrecent < _MEDIAN:
                self._nrecent += 1
            self._fresh = True
            return
        # bad checksum: count it, resynchronise on the next 0xFF inside it
        self.bad_frames += 1
        j = 1
        while j < 4 and f[j] != _HDR:
            j += 1
        self.skipped += j - 1
        for i in range(j, 4):
            f[i - j] = f[i]
        self._n = 4 - j


# -- 4-20 mA pressure transducer through a shunt into an ADC ---------------
_UA_OPEN = const(3800)  # below: broken loop (NAMUR NE 43)
_UA_SHORT = const(20500)  # above: short or transducer fault
_UA_ZERO = const(4000)
_UA_SPAN = const(16000)


class Level420(RiverLevel):
    """Submersible pressure transducer, 4 mA at its zero and 20 mA at
    "range_m" of water column. The loop current is read as the voltage over
    the shunt (``adc.read_uv()``, or ``read_u16() * uv_per_count`` when the
    option is given: then a saturated ADC is a fault too), averaged over
    "oversample" reads. Below 3.8 mA (broken wire) or above 20.5 mA (short)
    is a fault: counted in ``faults`` and ``errors``, status "warning",
    nothing reported. level = datum_m + (I - 4 mA) / 16 mA * range_m.

    opts: "range_m" (required), "datum_m" (0: the transducer's level above
    the datum), "shunt_ohm" (100: 20.5 mA stays inside the ESP32's
    calibrated 11 dB input range of about 2.45 V; 150 ohm would put 20 mA at
    3.0 V, where the ADC saturates and a short reads as a plausible 16 mA),
    "uv_per_count", "oversample" (8), "stages", "hysteresis_m"."""

    KIND = "level_4_20ma"
    CHANNELS = ("level_m",)
    SCALES = (1000,)

    def __init__(self, adc, clock, opts):
        if "range_m" not in opts:
            raise SensorError("level_4_20ma: option range_m (water column at 20 mA) is required")
        RiverLevel.__init__(self, opts)
        self._adc = adc
        self._clock = clock
        self._range = _mm(opts["range_m"])
        self._datum = _mm(opts.get("datum_m", 0))
        shunt = opts.get("shunt_ohm", 100)
        if not 10 <= shunt <= 500:
            raise SensorError("level_4_20ma: shunt_ohm %s is outside 10..500" % shunt)
        self._shunt_c = int(shunt * 100 + 0.5)  # centi-ohm
        upc = opts.get("uv_per_count")
        self._upc_c = None if upc is None else int(upc * 100 + 0.5)  # centi-uV per count
        self._over = max(1, int(opts.get("oversample", 8)))
        self._ready = False
        self.current_ua = 0
        self.fault = None  # None, "open" or "short"
        self.faults = 0
        self.errors = 0
        self.status = WARNING

    def begin(self):
        """Select the ADC's widest input range and take one reading."""
        try:
            if hasattr(self._adc, "atten") and hasattr(self._adc, "ATTN_11DB"):
                self._adc.atten(self._adc.ATTN_11DB)
            self._uv()
        except OSError as e:
            self._ready = False
            self.status = FAILED
            raise SensorError("level_4_20ma: ADC error (OSError %s)" % e.args[0])
        self._ready = True
        self.status = OK

    def _uv(self):
        # mean shunt voltage in uV, or -1 when the ADC is saturated
        adc = self._adc
        k = self._over
        s = 0
        c = self._upc_c
        if c is None:
            for _ in range(k):
                s += adc.read_uv()
            return s // k
        for _ in range(k):
            r = adc.read_u16()
            if r >= 65535:
                return -1
            s += r
        s //= k
        return s * (c // 100) + (s * (c % 100)) // 100

    def _fault(self, kind):
        self.fault = kind
        self.faults += 1
        self.errors += 1
        self.status = WARNING
        return False

    def read_into(self, out, offset):
        """out[offset] = level (mm above the datum); False on a loop fault."""
        if not self._ready:
            return False
        try:
            uv = self._uv()
        except OSError:
            self.errors += 1
            self.status = WARNING
            return False
        if uv < 0:
            return self._fault("short")
        ua = (uv * 100) // self._shunt_c
        self.current_ua = ua
        if ua < _UA_OPEN:
            return self._fault("open")
        if ua > _UA_SHORT:
            return self._fault("short")
        self.fault = None
        d = ua - _UA_ZERO  # may be slightly negative (3.8..4 mA)
        r = self._range
        q = r // _UA_SPAN
        level = self._datum + d * q + (d * (r - q * _UA_SPAN)) // _UA_SPAN
        out[offset] = level
        self._level(level)
        self.status = OK
        return True
