"""Simulated Bosch BME280 at register level.

Calibration sits at 0x88..0xA1 and 0xE1..0xE7 as in the datasheet (H4/H5
share 0xE5's nibbles). ``set(temp_c=, pressure_pa=, rh_pct=)`` finds the raw
ADC values by inverting the datasheet's double-precision compensation
(section 8.1) with bisection, so the driver's integer code is checked
against an independent implementation. Data registers hold the reset value
0x80000 until ctrl_meas selects forced or normal mode.
"""
import struct
from sim.devices.base import RegisterDevice

# BMP280 datasheet worked example (T, P) and typical humidity trimming.
DEFAULT_CALIB = {
    "T1": 27504, "T2": 26435, "T3": -1000,
    "P1": 36477, "P2": -10685, "P3": 3024, "P4": 2855, "P5": 140,
    "P6": -7, "P7": 15500, "P8": -14600, "P9": 6000,
    "H1": 75, "H2": 362, "H3": 0, "H4": 324, "H5": 50, "H6": 30,
}

_SKIPPED = 0x80000


def compensate_t(c, adc_t):
    """Datasheet double formula: (degC, t_fine)."""
    v1 = (adc_t / 16384.0 - c["T1"] / 1024.0) * c["T2"]
    d = adc_t / 131072.0 - c["T1"] / 8192.0
    v2 = d * d * c["T3"]
    return (v1 + v2) / 5120.0, int(v1 + v2)


def compensate_p(c, adc_p, t_fine):
    """Datasheet double formula: Pa."""
    v1 = t_fine / 2.0 - 64000.0
    v2 = v1 * v1 * c["P6"] / 32768.0
    v2 = v2 + v1 * c["P5"] * 2.0
    v2 = v2 / 4.0 + c["P4"] * 65536.0
    v1 = (c["P3"] * v1 * v1 / 524288.0 + c["P2"] * v1) / 524288.0
    v1 = (1.0 + v1 / 32768.0) * c["P1"]
    if v1 == 0.0:
        return 0.0
    p = 1048576.0 - adc_p
    p = (p - v2 / 4096.0) * 6250.0 / v1
    v1 = c["P9"] * p * p / 2147483648.0
    v2 = p * c["P8"] / 32768.0
    return p + (v1 + v2 + c["P7"]) / 16.0


def compensate_h(c, adc_h, t_fine):
    """Datasheet double formula: %RH, clamped to 0..100."""
    h = t_fine - 76800.0
    h = (adc_h - (c["H4"] * 64.0 + c["H5"] / 16384.0 * h)) * (
        c["H2"] / 65536.0 * (1.0 + c["H6"] / 67108864.0 * h * (1.0 + c["H3"] / 67108864.0 * h)))
    h = h * (1.0 - c["H1"] * h / 524288.0)
    return 100.0 if h > 100.0 else (0.0 if h < 0.0 else h)


def _invert(f, target, lo, hi):
    # integer x in [lo, hi] with increasing f(x) closest to target
    a, b = lo, hi
    while a < b:
        m = (a + b) // 2
        if f(m) < target:
            a = m + 1
        else:
            b = m
    if a > lo and abs(f(a - 1) - target) <= abs(f(a) - target):
        return a - 1
    return a


class BME280Device(RegisterDevice):
    WRITE_PAIRS = True  # Bosch parts take register/value pairs

    def __init__(self, chip_id=0x60, **calib):
        super().__init__()
        c = dict(DEFAULT_CALIB)
        c.update(calib)
        self.calib = c
        self.chip_id = chip_id
        self.adc_t = self.adc_p = _SKIPPED
        self.adc_h = 0x8000
        self.measurements = 0
        self._osrs_h = 0
        self._load_nvm()
        self._reset()
        self.set(25.0, 101325.0, 50.0)

    def _load_nvm(self):
        c = self.calib
        r = self.regs
        struct.pack_into("<HhhHhhhhhhhh", r, 0x88, c["T1"], c["T2"], c["T3"], c["P1"], c["P2"],
                         c["P3"], c["P4"], c["P5"], c["P6"], c["P7"], c["P8"], c["P9"])
        r[0xA1] = c["H1"]
        struct.pack_into("<h", r, 0xE1, c["H2"])
        r[0xE3] = c["H3"]
        h4, h5 = c["H4"], c["H5"]
        r[0xE4] = (h4 >> 4) & 0xFF
        r[0xE5] = (h4 & 0x0F) | ((h5 & 0x0F) << 4)
        r[0xE6] = (h5 >> 4) & 0xFF
        r[0xE7] = c["H6"] & 0xFF

    def _reset(self):
        r = self.regs
        r[0xD0] = self.chip_id
        for reg in (0xF2, 0xF3, 0xF4, 0xF5, 0xF8, 0xF9, 0xFB, 0xFC, 0xFE):
            r[reg] = 0
        r[0xF7] = r[0xFA] = r[0xFD] = 0x80
        self._osrs_h = 0

    def on_write(self, reg, value):
        r = self.regs
        if reg == 0xE0:
            if value == 0xB6:
                self._reset()
        elif reg == 0xF2:
            r[reg] = value & 0x07
        elif reg == 0xF5:
            r[reg] = value & 0xFD
        elif reg == 0xF4:
            r[reg] = value
            self._osrs_h = r[0xF2] & 0x07  # ctrl_hum takes effect on this write
            mode = value & 0x03
            if mode:
                self._measure()
                if mode != 0x03:
                    r[reg] = value & 0xFC  # forced: back to sleep
        # other registers are read-only

    def _measure(self):
        r = self.regs
        meas = r[0xF4]
        t = self.adc_t if meas >> 5 else _SKIPPED
        p = self.adc_p if (meas >> 2) & 0x07 else _SKIPPED
        h = self.adc_h if self._osrs_h else 0x8000
        r[0xF7], r[0xF8], r[0xF9] = p >> 12, (p >> 4) & 0xFF, (p & 0x0F) << 4
        r[0xFA], r[0xFB], r[0xFC] = t >> 12, (t >> 4) & 0xFF, (t & 0x0F) << 4
        r[0xFD], r[0xFE] = h >> 8, h & 0xFF
        self.measurements += 1

    def _normal(self):
        if self.regs[0xF4] & 0x03 == 0x03:
            self._measure()

    def set(self, temp_c=None, pressure_pa=None, rh_pct=None):
        """Physical values; the raw ADC words follow from the calibration."""
        if temp_c is not None:
            self.temp_c = temp_c
        if pressure_pa is not None:
            self.pressure_pa = pressure_pa
        if rh_pct is not None:
            self.rh_pct = rh_pct
        c = self.calib
        self.adc_t = _invert(lambda x: compensate_t(c, x)[0], self.temp_c, 0, 0xFFFFF)
        tf = compensate_t(c, self.adc_t)[1]
        self.adc_p = _invert(lambda x: -compensate_p(c, x, tf), -self.pressure_pa, 0, 0xFFFFF)
        self.adc_h = _invert(lambda x: compensate_h(c, x, tf), self.rh_pct, 0, 0xFFFF)
        self._normal()

    def set_raw(self, adc_t=None, adc_p=None, adc_h=None):
        if adc_t is not None:
            self.adc_t = adc_t
        if adc_p is not None:
            self.adc_p = adc_p
        if adc_h is not None:
            self.adc_h = adc_h
        self._normal()
