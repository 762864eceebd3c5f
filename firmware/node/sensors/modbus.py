"""Modbus RTU master for one half-duplex RS-485 line (a UART).

Frames: address, function, data, CRC-16 (polynomial 0xA001 reflected, initial
0xFFFF, low byte first on the wire). A read of input registers (function
0x04) is ``addr 04 reg_hi reg_lo count_hi count_lo crc_lo crc_hi``; the answer
is ``addr 04 nbytes data... crc`` or, when the device refuses, the exception
response ``addr 84 code crc``.

``RTUMaster`` never blocks: ``send_read()`` writes a request, ``poll()``
collects whatever bytes have arrived and answers None while the answer is
still on its way. Every fault is a ``ModbusError`` whose ``kind`` says which:
"timeout" (no complete answer within timeout_ms), "crc", "exception" (``code``
is the device's exception code, the message has its name) or "frame" (wrong
address, function or length). Frame ends are found by the length in the
header, not by line silence, so the caller decides how long to wait.
"""
from micropython import const

READ_HOLDING_REGISTERS = const(0x03)
READ_INPUT_REGISTERS = const(0x04)

# Modbus Application Protocol v1.1b3, section 7
EXCEPTIONS = {
    1: "ILLEGAL FUNCTION",
    2: "ILLEGAL DATA ADDRESS",
    3: "ILLEGAL DATA VALUE",
    4: "SERVER DEVICE FAILURE",
    5: "ACKNOWLEDGE",
    6: "SERVER DEVICE BUSY",
    8: "MEMORY PARITY ERROR",
    10: "GATEWAY PATH UNAVAILABLE",
    11: "GATEWAY TARGET DEVICE FAILED TO RESPOND",
}

_MAX_REGS = const(125)  # per read request (the protocol's limit)
_CHUNK = const(32)


class ModbusError(Exception):
    """A failed transaction. kind: "timeout", "crc", "exception" or "frame";
    code: the device's exception code for kind "exception", else None."""

    def __init__(self, kind, message, code=None):
        super().__init__(message)
        self.kind = kind
        self.code = code


def exception_name(code):
    return EXCEPTIONS.get(code, "UNKNOWN EXCEPTION")


def crc16(data, n=None):
    """Modbus CRC-16 of data[0:n] (all of it by default). Sent low byte first."""
    if n is None:
        n = len(data)
    crc = 0xFFFF
    for i in range(n):
        crc ^= data[i]
        for _ in range(8):
            if crc & 1:
                crc = (crc >> 1) ^ 0xA001
            else:
                crc >>= 1
    return crc


def request_into(buf, addr, function, reg, count):
    """Write the 8-byte read request (function 0x03 or 0x04) into buf; no allocation."""
    if not 1 <= addr <= 247:
        raise ValueError("modbus address %d not in 1..247" % addr)
    if not 0 <= reg <= 0xFFFF or not 1 <= count <= _MAX_REGS or reg + count > 0x10000:
        raise ValueError("modbus read of %d registers from 0x%04x" % (count, reg))
    buf[0] = addr
    buf[1] = function
    buf[2] = reg >> 8
    buf[3] = reg & 0xFF
    buf[4] = count >> 8
    buf[5] = count & 0xFF
    c = crc16(buf, 6)
    buf[6] = c & 0xFF
    buf[7] = c >> 8
    return buf


def read_input_registers_request(addr, reg, count):
    """The request frame (bytes, CRC included) reading count input registers from reg."""
    return bytes(request_into(bytearray(8), addr, READ_INPUT_REGISTERS, reg, count))


def answer_length(buf, n, function):
    """How many bytes the answer whose first n bytes are in buf will have, or 0
    while its header has not arrived yet."""
    if n < 2:
        return 0
    if buf[1] == function | 0x80:
        return 5
    if n < 3:
        return 0
    return buf[2] + 5


def check_answer(buf, n, addr, function, count):
    """Check a complete read answer in buf[0:n]; return the offset of the
    register data (3). Raises ModbusError."""
    if n < 5:
        raise ModbusError("frame", "answer of %d bytes" % n)
    c = crc16(buf, n - 2)
    if buf[n - 2] != c & 0xFF or buf[n - 1] != c >> 8:
        raise ModbusError("crc", "bad CRC from address %d" % addr)
    if buf[0] != addr:
        raise ModbusError("frame", "answer from address %d, asked %d" % (buf[0], addr))
    if buf[1] == function | 0x80:
        code = buf[2]
        raise ModbusError("exception", "exception %d (%s) from address %d"
                          % (code, exception_name(code), addr), code)
    if buf[1] != function:
        raise ModbusError("frame", "function 0x%02x in answer to 0x%02x" % (buf[1], function))
    if buf[2] != 2 * count or n != 2 * count + 5:
        raise ModbusError("frame", "%d data bytes for %d registers" % (buf[2], count))
    return 3


class RTUMaster:
    """One outstanding request at a time on a UART. ``rx`` holds the answer;
    its register data start at offset 3 once ``poll()`` returned True."""

    def __init__(self, uart, clock, timeout_ms=200, rxsize=256):
        self._uart = uart
        self.clock = clock
        self.timeout_ms = timeout_ms
        self.rx = bytearray(rxsize)
        self._chunk = bytearray(_CHUNK)
        self._tx = bytearray(8)
        self._n = 0
        self._addr = 0
        self._fn = 0
        self._count = 0
        self._sent = 0
        self.pending = False

    def send_read(self, addr, function, reg, count):
        """Drop whatever is waiting (a late answer to an earlier request) and
        send a read request. OSError from the UART goes to the caller."""
        if 2 * count + 5 > len(self.rx):
            raise ValueError("answer of %d registers does not fit rx" % count)
        request_into(self._tx, addr, function, reg, count)
        self._drain()
        self._uart.write(self._tx)
        self._addr = addr
        self._fn = function
        self._count = count
        self._n = 0
        self._sent = self.clock.ticks_ms()
        self.pending = True

    def _drain(self):
        u = self._uart
        c = self._chunk
        for _ in range(64):
            if not u.readinto(c):
                break

    def poll(self):
        """True when the answer is complete and good (data in rx from offset 3),
        False while it is on its way; ModbusError on a fault (the request is
        then no longer pending)."""
        if not self.pending:
            return False
        u = self._uart
        c = self._chunk
        rx = self.rx
        size = len(rx)
        n = self._n
        want = answer_length(rx, n, self._fn)
        while want == 0 or n < want:
            k = u.readinto(c)
            if not k:
                break
            for i in range(k):
                if n < size:
                    rx[n] = c[i]
                    n += 1
            want = answer_length(rx, n, self._fn)
        self._n = n
        if want and n >= want:
            self.pending = False
            check_answer(rx, want, self._addr, self._fn, self._count)
            return True
        if self.clock.ticks_diff(self.clock.ticks_ms(), self._sent) >= self.timeout_ms:
            self.pending = False
            if n:
                raise ModbusError("frame", "answer cut short after %d bytes" % n)
            raise ModbusError("timeout", "no answer from address %d in %d ms" % (self._addr, self.timeout_ms))
        return False
