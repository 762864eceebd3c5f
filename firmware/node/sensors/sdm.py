"""Eastron SDM120 / SDM630 energy meter over RS-485, Modbus RTU.

Values are input registers (function 0x04), each an IEEE-754 float in two
registers, high word first (Eastron "SDM120 Modbus protocol" and "SDM630
Modbus protocol" register maps):

    register  SDM120                 SDM630
    0x0000    voltage (V)            phase 1 line-to-neutral voltage (V)
    0x0006    current (A)            phase 1 current (A)
    0x000C    active power (W)       phase 1 active power (W)
    0x0034    -                      total system power (W)
    0x0048    import active energy   total import active energy (kWh)

``power_w`` is the meter's power of the whole charger: register 0x000C on the
single-phase SDM120, the total system power 0x0034 on the three-phase SDM630
(phase 1 alone would be a third of a three-phase charger; with a single-phase
charger on L1 the two are the same), so that it agrees with the total import
energy. Voltage and current are phase 1's.

One request reads the block 0x0000..0x0049 (37 floats, within the meters' 40
per request); registers the model lacks read as zero inside a block, as on
the meters. Non-blocking: ``read_into`` takes the answer to the request sent
by the previous call, then sends the next one, so a reading is one read
period old and the loop never waits on the line. An answer that has not
arrived after ``timeout_ms`` is a timeout. Timeouts, CRC errors, exception
responses and out-of-range values are counted, set ``status`` to "warning"
and are never reported. Decoding allocates a few floats per reading (every
few seconds, not in a burst); ``power_w`` and ``energy_kwh`` keep the last
good values (None before the first) for the charging-session tracker.
"""
import struct
from micropython import const
from node.sensors import Sensor, OK, WARNING
from node.sensors.modbus import RTUMaster, ModbusError, READ_INPUT_REGISTERS

_START = const(0x0000)
_COUNT = const(0x004A)  # through the import energy at 0x0048

# model -> registers of (voltage, current, power, import energy)
MODELS = {
    "sdm120": (0x0000, 0x0006, 0x000C, 0x0048),
    "sdm630": (0x0000, 0x0006, 0x0034, 0x0048),
}

# plausible answers; anything else is a bad reading, not a value
_V_MAX = 1000.0
_I_MAX = 10000.0
_P_MAX = 10000000.0
_E_MAX = 2000000.0  # kWh: Wh must fit the channel's int32


class SDMMeter(Sensor):
    KIND = "sdm_meter"
    CHANNELS = ("voltage_v", "current_a", "power_w", "energy_kwh")
    SCALES = (10, 100, 1, 1000)  # 0.1 V, 0.01 A, W, Wh

    def __init__(self, uart, clock, opts):
        self.clock = clock
        self.model = opts.get("model", "sdm120")
        self.address = opts.get("address", 1)
        self._mb = RTUMaster(uart, clock, opts.get("timeout_ms", 200))
        self._regs = MODELS.get(self.model)
        self.voltage_v = None
        self.current_a = None
        self.power_w = None
        self.energy_kwh = None
        self.readings = 0
        self.timeouts = 0
        self.crc_errors = 0
        self.exceptions = 0  # exception responses from the meter
        self.frame_errors = 0
        self.range_errors = 0
        self.last_error = None

    def begin(self):
        """Check the options and send the first request (the answer is read by
        the first read_into); a meter that is not answering yet is a warning."""
        if self._regs is None:
            self._fail("unknown model %r (sdm120, sdm630)" % (self.model,))
        if not 1 <= self.address <= 247:
            self._fail("address %d not in 1..247" % self.address)
        self._ready = True
        self.status = WARNING  # until the first answer
        self._send()

    def _send(self):
        try:
            self._mb.send_read(self.address, READ_INPUT_REGISTERS, _START, _COUNT)
        except OSError as e:
            self._fault("uart", "UART error (OSError %s)" % e.args[0])

    def _fault(self, kind, message):
        if kind == "timeout":
            self.timeouts += 1
        elif kind == "crc":
            self.crc_errors += 1
        elif kind == "exception":
            self.exceptions += 1
        elif kind == "range":
            self.range_errors += 1
        else:
            self.frame_errors += 1
        self.last_error = message
        self._warn()

    def read_into(self, out, offset):
        """Fill voltage, current, power and energy from the answer to the last
        request; False while it is on its way or after a fault."""
        if not self._ready:
            return False
        mb = self._mb
        good = False
        if mb.pending:
            try:
                if not mb.poll():
                    return False  # still on its way, within timeout_ms
                good = self._decode(mb.rx, out, offset)
            except ModbusError as e:
                self._fault(e.kind, str(e))
            except OSError as e:
                self._fault("uart", "UART error (OSError %s)" % e.args[0])
        self._send()
        return good

    def _float(self, rx, reg):
        return struct.unpack_from(">f", rx, 3 + 2 * (reg - _START))[0]

    def _decode(self, rx, out, offset):
        rv, ri, rp, re = self._regs
        v = self._float(rx, rv)
        i = self._float(rx, ri)
        p = self._float(rx, rp)
        e = self._float(rx, re)
        # NaN fails every comparison, so it is caught here too
        if not (0.0 <= v <= _V_MAX and 0.0 <= i <= _I_MAX and -_P_MAX <= p <= _P_MAX
                and 0.0 <= e <= _E_MAX):
            self._fault("range", "out of range: %r V %r A %r W %r kWh" % (v, i, p, e))
            return False
        self.voltage_v = v
        self.current_a = i
        self.power_w = p
        self.energy_kwh = e
        out[offset] = int(round(v * 10))
        out[offset + 1] = int(round(i * 100))
        out[offset + 2] = int(round(p))
        out[offset + 3] = int(round(e * 1000))
        self.readings += 1
        self.status = OK
        return True
