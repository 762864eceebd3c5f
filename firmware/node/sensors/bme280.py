"""Bosch BME280 (temperature, humidity, pressure) over I2C.

Integer compensation from the datasheet (BME280_compensate_T_int32,
BME280_compensate_P_int32, bme280_compensate_H_int32), rearranged so every
intermediate stays a small int (< 2**30) over the operating range without
changing a single result. Outputs: centi-degC, centi-%RH and Pa.
The part runs in normal mode (x1 oversampling, 1 s standby); a read is one
8-byte burst into a preallocated buffer and allocates nothing.
"""
import struct
from micropython import const
from node.sensors import I2CSensor, OK

_CHIP_ID = const(0x60)
_REG_CALIB_TP = const(0x88)  # 26 bytes: dig_T1..dig_P9, dig_H1 at 0xA1
_REG_ID = const(0xD0)
_REG_RESET = const(0xE0)
_REG_CALIB_H = const(0xE1)  # 7 bytes: dig_H2..dig_H6
_REG_CTRL_HUM = const(0xF2)
_REG_STATUS = const(0xF3)
_REG_CTRL_MEAS = const(0xF4)
_REG_CONFIG = const(0xF5)
_REG_DATA = const(0xF7)  # press[3] temp[3] hum[2]
_SKIPPED = const(0x80000)
# operating range (-40..85 degC, 300..1100 hPa) plus 1 degC / 10 hPa for
# readings at its edges; anything further out is a bad answer
_T_MIN = const(-4100)  # centi-degC
_T_MAX = const(8600)
_P_MIN = const(29000)  # Pa
_P_MAX = const(111000)
_M18 = const(0x3FFFF)


def _mulshr(a, b, s):
    # (a * b) >> s, exact, intermediates < 2**30 for |a| < 2**21, |b| <= 2**16, s >= 8
    return (a * (b >> 8) + ((a * (b & 0xFF)) >> 8)) >> (s - 8)


def _s8(v):
    return v - 256 if v > 127 else v


class BME280(I2CSensor):
    KIND = "bme280"
    CHANNELS = ("temp_c", "rh_pct", "pressure_hpa")
    SCALES = (100, 100, 100)  # centi-degC, centi-%RH, Pa

    def __init__(self, bus, address=0x76):
        self._i2c = bus
        self.address = address
        self._buf = bytearray(8)
        self._b1 = bytearray(1)
        self._ready = False
        self._tf = 0

    def _configure(self):
        self._write(_REG_CTRL_HUM, 0x01)  # osrs_h x1; latched by the ctrl_meas write
        self._write(_REG_CONFIG, 0xA0)  # t_sb 1000 ms, filter off (written in sleep mode)
        self._write(_REG_CTRL_MEAS, 0x27)  # osrs_t x1, osrs_p x1, normal mode

    def begin(self):
        """Probe the chip id, soft-reset, load calibration, start normal mode."""
        try:
            chip = self._reg(_REG_ID)
            if chip != _CHIP_ID:
                self._fail("chip id 0x%02x, expected 0x%02x" % (chip, _CHIP_ID))
            self._write(_REG_RESET, 0xB6)
            for _ in range(50):  # NVM copy takes ~2 ms; each poll is a bus transaction
                if not self._reg(_REG_STATUS) & 0x01:
                    break
            else:
                self._fail("calibration copy did not finish after reset")
            c = self._i2c.readfrom_mem(self.address, _REG_CALIB_TP, 26)
            h = self._i2c.readfrom_mem(self.address, _REG_CALIB_H, 7)
        except OSError as e:
            self._fail("no answer (OSError %s)" % e.args[0])
        (self._t1, self._t2, self._t3, self._p1, self._p2, self._p3, self._p4, self._p5,
         self._p6, self._p7, self._p8, self._p9) = struct.unpack_from("<HhhHhhhhhhhh", c, 0)
        self._h1 = c[25]
        self._h2 = struct.unpack_from("<h", h, 0)[0]
        self._h3 = h[2]
        self._h4 = (_s8(h[3]) << 4) | (h[4] & 0x0F)
        self._h5 = (_s8(h[5]) << 4) | (h[4] >> 4)
        self._h6 = _s8(h[6])
        if self._t1 == 0 or self._p1 == 0:
            self._fail("calibration data is blank")
        try:
            self._configure()
        except OSError as e:
            self._fail("no answer (OSError %s)" % e.args[0])
        self._ready = True
        self.status = OK

    def read_into(self, out, offset):
        """Fill out[offset:offset+3] with temp, RH, pressure; False on no data or a fault."""
        if not self._ready:
            return False
        b = self._buf
        try:
            self._i2c.readfrom_mem_into(self.address, _REG_DATA, b)
        except OSError:
            return self._warn()
        adc_p = (b[0] << 12) | (b[1] << 4) | (b[2] >> 4)
        adc_t = (b[3] << 12) | (b[4] << 4) | (b[5] >> 4)
        if adc_t == _SKIPPED and adc_p == _SKIPPED:
            # reset values: the part lost power or its settings; set it up again
            try:
                self._configure()
            except OSError:
                pass
            return self._warn()
        t = self.compensate_t(adc_t)
        p = self.compensate_p(adc_p)
        if t < _T_MIN or t > _T_MAX or p < _P_MIN or p > _P_MAX:
            return self._warn()
        out[offset] = t
        out[offset + 1] = self.compensate_h((b[6] << 8) | b[7])
        out[offset + 2] = p
        self.status = OK
        return True

    def compensate_t(self, adc_t):
        """centi-degC; sets t_fine for the other two."""
        t1 = self._t1
        v1 = _mulshr((adc_t >> 3) - (t1 << 1), self._t2, 11)
        d = (adc_t >> 4) - t1
        v2 = _mulshr(_mulshr(d, d, 12), self._t3, 14)
        self._tf = v1 + v2
        return (self._tf * 5 + 128) >> 8

    def compensate_p(self, adc_p):
        """Pa (the datasheet's 32-bit variant), 0 when it cannot be computed."""
        v1 = (self._tf >> 1) - 64000
        q = v1 >> 2
        sq11 = _mulshr(q, q, 11)  # ((v1>>2) * (v1>>2)) >> 11
        v2 = sq11 * self._p6
        v2 += (v1 * self._p5) << 1
        v2 = (v2 >> 2) + (self._p4 << 16)
        a = (self._p3 * (sq11 >> 2)) >> 3
        p2 = self._p2
        b = p2 * (v1 >> 1) + ((p2 * (v1 & 1)) >> 1)  # (p2 * v1) >> 1
        v1 = (a >> 18) + (b >> 18) + (((a & _M18) + (b & _M18)) >> 18)  # (a + b) >> 18
        v1 = _mulshr(32768 + v1, self._p1, 15)
        n = 1048576 - adc_p - (v2 >> 12)
        if v1 <= 0 or n < 0:
            return 0
        # p = n * 3125 (up to 2**32): (p << 1) // v1 if p < 2**31 else (p // v1) * 2
        k = 6250 if n < 687195 else 3125
        p = (n // v1) * k + ((n % v1) * k) // v1
        if k == 3125:
            p <<= 1
        q = p >> 3
        v1 = _mulshr(_mulshr(q, q, 13), self._p9, 12)
        v2 = _mulshr(p >> 2, self._p8, 13)
        return p + ((v1 + v2 + self._p7) >> 4)

    def compensate_h(self, adc_h):
        """centi-%RH from the datasheet's Q22.10 result, rounded."""
        v = self._tf - 76800
        # ((adc_h << 14) - (h4 << 20) - h5 * v + 16384) >> 15
        x = (adc_h >> 1) - (self._h4 << 5) + ((((adc_h & 1) << 14) + 16384 - self._h5 * v) >> 15)
        y = _mulshr((v * self._h6) >> 10, ((v * self._h3) >> 11) + 32768, 10) + 2097152
        h2 = self._h2
        f = (y >> 14) * h2 + (((y & 0x3FFF) * h2 + 8192) >> 14)  # (y * h2 + 8192) >> 14
        x *= f
        q = x >> 15
        x -= (((q * q) >> 7) * self._h1) >> 4
        if x < 0:
            x = 0
        elif x > 419430400:
            x = 419430400
        return ((x >> 12) * 100 + 512) >> 10
