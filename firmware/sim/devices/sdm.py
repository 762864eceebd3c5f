"""Simulated Eastron SDM120 / SDM630 energy meter on an RS-485 UART (Modbus RTU).

Answers "read input registers" (0x04) with IEEE-754 big-endian floats, two
registers each, from the model's register map. A read must start at a
parameter the model has and stay within its map (gaps inside a block read as
zero, as the meters do), with an even count of at most 80 registers (40
parameters); otherwise exception 2 (illegal data address) or 3 (illegal data
value). Other functions: exception 1. Requests with a bad CRC or for another
slave address are ignored, as on a shared bus. Energy integrates the power
over virtual time. Answers arrive ``latency_ms`` after the request.

Fault switches: ``silent`` (no answers, also drops one in flight),
``bad_crc`` (answers delivered with a broken CRC), ``busy`` (exception 6,
server device busy, for requests from now on), ``garbage`` (bytes before the
next answer delivered).
"""
import struct
from sim.clock import ticks_diff

# the parameters each model has (start registers); SDM120 from its protocol
# sheet, SDM630 from the SDM630 Modbus protocol (phase values x3, system values)
SDM120_MAP = (0x0000, 0x0006, 0x000C, 0x0012, 0x0018, 0x001E, 0x0024, 0x0046, 0x0048, 0x004A,
              0x004C, 0x004E, 0x0156, 0x0158)
SDM630_MAP = tuple(range(0x0000, 0x002A, 2)) + (
    0x002A, 0x002E, 0x0030, 0x0034, 0x0038, 0x003C, 0x003E, 0x0042, 0x0046, 0x0048, 0x004A,
    0x004C, 0x004E, 0x0050, 0x0052, 0x0054, 0x0056, 0x0064, 0x0066, 0x0068, 0x006A,
    0x00C8, 0x00CA, 0x00CC, 0x00CE, 0x00E0, 0x00EA, 0x00EC, 0x00EE, 0x00F0, 0x00F2, 0x00F4,
    0x00F8, 0x00FA, 0x0156, 0x0158) + tuple(range(0x015A, 0x0180, 2))
MAPS = {"sdm120": SDM120_MAP, "sdm630": SDM630_MAP}


def crc16(data):
    crc = 0xFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def with_crc(body):
    c = crc16(body)
    return bytes(body) + bytes((c & 0xFF, c >> 8))


class SDMDevice:
    def __init__(self, clock, model="sdm120", address=1, latency_ms=30):
        if model not in MAPS:
            raise ValueError("model")
        self.clock = clock
        self.model = model
        self.address = address
        self.latency_ms = latency_ms
        self.params = set(MAPS[model])
        self.end = max(self.params) + 2
        self.voltage_v = 230.0
        self.current_a = 0.0
        self.pf = 1.0
        self.import_kwh = 0.0
        self.export_kwh = 0.0
        self.hz = 50.0
        self.silent = False
        self.bad_crc = False
        self.busy = False
        self.garbage = None
        self.requests = 0  # well-formed requests addressed to this meter
        self.ignored = 0  # bad CRC or another address
        self.answers = 0
        self.received = []
        self._t = clock.ticks_ms()
        self._out = None
        self._due = 0

    # -- the load
    @property
    def power_w(self):
        return self.voltage_v * self.current_a * self.pf

    def set(self, voltage_v=None, current_a=None, pf=None, import_kwh=None):
        self._integrate()
        if voltage_v is not None:
            self.voltage_v = float(voltage_v)
        if current_a is not None:
            self.current_a = float(current_a)
        if pf is not None:
            self.pf = float(pf)
        if import_kwh is not None:
            self.import_kwh = float(import_kwh)

    def _integrate(self):
        now = self.clock.ticks_ms()
        dt = ticks_diff(now, self._t)
        self._t = now
        if dt > 0:
            p = self.power_w
            if p >= 0:
                self.import_kwh += p * dt / 3600000000.0
            else:
                self.export_kwh -= p * dt / 3600000000.0

    def value(self, reg):
        """The float a parameter register holds now (0.0 for gaps)."""
        return float(self._table().get(reg, 0.0))

    def _table(self):
        self._integrate()
        p = self.power_w
        va = self.voltage_v * self.current_a
        q = (max(va * va - p * p, 0.0)) ** 0.5
        if self.model == "sdm120":
            table = {0x0000: self.voltage_v, 0x0006: self.current_a, 0x000C: p, 0x0012: va,
                     0x0018: q, 0x001E: self.pf, 0x0046: self.hz, 0x0048: self.import_kwh,
                     0x004A: self.export_kwh, 0x0156: self.import_kwh + self.export_kwh}
        else:
            # the charger on L1; L2, L3 idle at the same voltage
            v = self.voltage_v
            table = {0x0000: v, 0x0002: v, 0x0004: v, 0x0006: self.current_a, 0x000C: p,
                     0x0012: va, 0x0018: q, 0x001E: self.pf, 0x0020: 1.0, 0x0022: 1.0,
                     0x002A: v, 0x002E: self.current_a / 3, 0x0030: self.current_a,
                     0x0034: p, 0x0038: va, 0x003C: q, 0x003E: self.pf, 0x0046: self.hz,
                     0x0048: self.import_kwh, 0x004A: self.export_kwh,
                     0x0156: self.import_kwh + self.export_kwh, 0x015A: self.import_kwh}
        return table

    # -- the line
    def uart_tx(self, data):
        data = bytes(data)
        self.received.append(data)
        if len(data) < 4 or crc16(data[:-2]) != data[-2] | (data[-1] << 8):
            self.ignored += 1
            return
        if data[0] != self.address:
            self.ignored += 1
            return
        self.requests += 1
        if self.silent:
            return
        self._out = self.answer(data)
        self._due = (self.clock.ticks_ms() + self.latency_ms) & 0x3FFFFFFF

    def answer(self, req):
        """The answer frame to a request frame (CRC already checked)."""
        addr, fn = req[0], req[1]
        if self.busy:
            return self._exception(addr, fn, 6)
        if fn != 0x04 or len(req) != 8:
            return self._exception(addr, fn, 1)
        reg = (req[2] << 8) | req[3]
        count = (req[4] << 8) | req[5]
        if count == 0 or count > 80 or count % 2:
            return self._exception(addr, fn, 3)
        if reg not in self.params or reg + count > self.end:
            return self._exception(addr, fn, 2)
        body = bytearray((addr, fn, 2 * count))
        table = self._table()
        for r in range(reg, reg + count, 2):
            body += struct.pack(">f", float(table.get(r, 0.0)))
        return with_crc(body)

    def _exception(self, addr, fn, code):
        return with_crc(bytes((addr, fn | 0x80, code)))

    def uart_poll(self, now_ms):
        if self._out is None or ticks_diff(now_ms, self._due) < 0:
            return None
        out = self._out
        self._out = None
        if self.silent:
            return None  # lost on the way (the meter went quiet meanwhile)
        self.answers += 1
        if self.bad_crc:
            out = out[:-1] + bytes((out[-1] ^ 0x5A,))
        if self.garbage:
            out = self.garbage + out
            self.garbage = None
        return out
