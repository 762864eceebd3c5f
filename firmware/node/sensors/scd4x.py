"""Sensirion SCD40/SCD41 CO2 sensor over I2C (periodic measurement).

Every answer word is checked against its CRC-8; a bad word is counted and
nothing is reported. The part needs 1 ms between a command and reading its
answer and 500 ms after stop_periodic_measurement: pass ``delay_ms`` (e.g.
``time.sleep_ms`` on a board, ``clock.advance`` with a SimClock).
Outputs: ppm, centi-degC, centi-%RH.
"""
from micropython import const
from node.sensors import Sensor, OK

_START = b"\x21\xb1"
_READ = b"\xec\x05"
_STOP = b"\x3f\x86"
_READY = b"\xe4\xb8"
_SERIAL = b"\x36\x82"
_CO2_MAX = const(40000)  # output range of the part, ppm


def _crc8(buf, i):
    # Sensirion CRC-8 (poly 0x31, init 0xFF) of buf[i], buf[i + 1]
    crc = 0xFF
    for j in range(i, i + 2):
        crc ^= buf[j]
        for _ in range(8):
            crc = ((crc << 1) ^ 0x31) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


class SCD4x(Sensor):
    KIND = "scd4x"
    CHANNELS = ("co2_ppm", "temp_c", "rh_pct")
    SCALES = (1, 100, 100)

    def __init__(self, bus, address=0x62, delay_ms=None):
        self._i2c = bus
        self.address = address
        self._delay = delay_ms
        self._b3 = bytearray(3)
        self._b9 = bytearray(9)
        self._ready = False
        self.serial = None

    def _cmd(self, cmd, wait_ms):
        self._i2c.writeto(self.address, cmd)
        if self._delay is not None and wait_ms:
            self._delay(wait_ms)

    def _crc_ok(self, buf):
        for i in range(0, len(buf), 3):
            if _crc8(buf, i) != buf[i + 2]:
                return False
        return True

    def begin(self):
        """Stop any running measurement, read the serial number, start periodic mode
        (first data 5 s later). Blocks ~500 ms through delay_ms."""
        b = self._b9
        try:
            self._cmd(_STOP, 500)
            self._cmd(_SERIAL, 1)
            self._i2c.readfrom_into(self.address, b)
        except OSError as e:
            self._fail("no answer (OSError %s)" % e.args[0])
        if not self._crc_ok(b):
            self._fail("bad CRC in the serial number")
        self.serial = (((b[0] << 8) | b[1]) << 32) | (((b[3] << 8) | b[4]) << 16) | (b[6] << 8) | b[7]
        try:
            self._cmd(_START, 0)
        except OSError as e:
            self._fail("start refused (OSError %s)" % e.args[0])
        self._ready = True
        self.status = OK

    def read_into(self, out, offset):
        """Fill out[offset:offset+3] with CO2, temp, RH when a new measurement is
        ready; False when none is (not a fault) or on a bus/CRC fault (counted)."""
        if not self._ready:
            return False
        a = self.address
        b3 = self._b3
        b = self._b9
        try:
            self._cmd(_READY, 1)
            self._i2c.readfrom_into(a, b3)
            if _crc8(b3, 0) != b3[2]:
                return self._warn()
            if not ((b3[0] << 8) | b3[1]) & 0x07FF:
                return False
            self._cmd(_READ, 1)
            self._i2c.readfrom_into(a, b)
        except OSError:
            return self._warn()
        if not self._crc_ok(b):
            return self._warn()
        co2 = (b[0] << 8) | b[1]
        if co2 > _CO2_MAX:
            return self._warn()
        # T = -45 + 175 * w / 2**16, RH = 100 * w / 2**16 (datasheet divides by
        # 2**16 - 1: at most 0.003 degC / %RH apart), rounded to 1/100
        out[offset] = co2
        out[offset + 1] = ((((b[3] << 8) | b[4]) * 4375 + 8192) >> 14) - 4500
        out[offset + 2] = (((b[6] << 8) | b[7]) * 625 + 2048) >> 12
        self.status = OK
        return True
