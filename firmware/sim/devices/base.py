"""Base parts: RegisterDevice, an I2C part made of 8-bit registers, and
StreamDevice, a UART part that sends a frame every period by itself.

RegisterDevice: the first byte written sets the register pointer; further
bytes go to consecutive registers (or, with WRITE_PAIRS, to register/value
pairs as on Bosch parts); reads return bytes from the pointer and
auto-increment.
"""
from sim.clock import ticks_diff


class StreamDevice:
    """A UART part that sends one frame every period_ms of the clock
    (PMS5003, LD2410, A02YYUW). Subclasses build the bytes in uart_poll
    after asking _due(now) how many frames are due."""

    BURST = 16  # frames that piled up while nobody read arrive together, at most this many
    GARBAGE = b"\x00\x13\xff"  # what inject_garbage() sends by default

    def __init__(self, clock, period_ms):
        self.clock = clock
        self.period_ms = period_ms
        self.frames_sent = 0
        self.received = []  # what the firmware wrote
        self._next = (clock.ticks_ms() + period_ms) & 0x3FFFFFFF
        self._silent = False
        self._garbage = None
        self._len = 0

    def _set_frame(self, f):
        # BURST copies of the current frame, and views of the first k of them,
        # so an ordinary poll hands out bytes without allocating
        if len(f) != self._len:
            self._len = len(f)
            self._buf = bytearray(len(f) * self.BURST)
            mv = memoryview(self._buf)
            self._views = [mv[:self._len * (i + 1)] for i in range(self.BURST)]
        for k in range(self.BURST):
            self._buf[self._len * k:self._len * (k + 1)] = f

    def _burst(self, k, first=None):
        # k frames: the prepared views, or (a fault pending) garbage, then
        # `first` in place of the first frame, then the rest; faults are one-shot
        if first is None and self._garbage is None:
            return self._views[k - 1]
        L = self._len
        out = (self._garbage or b"") + bytes(self._buf[:L] if first is None else first) \
            + bytes(self._buf[L:L * k])
        self._garbage = None
        return out

    def inject_garbage(self, data=None):
        """Stray bytes before the next frame."""
        self._garbage = bytes(self.GARBAGE if data is None else data)

    def silence(self, on=True):
        """Stop sending (a part that hung or lost power) until silence(False)."""
        self._silent = on

    def uart_tx(self, data):
        self.received.append(bytes(data))

    def _due(self, now_ms):
        # frames due since the last poll (0: none, or silent)
        d = ticks_diff(now_ms, self._next)
        if d < 0:
            return 0
        k = d // self.period_ms + 1
        self._next = (self._next + k * self.period_ms) & 0x3FFFFFFF
        if self._silent:
            return 0
        self.frames_sent += k
        return k if k < self.BURST else self.BURST


class RegisterDevice:
    WRITE_PAIRS = False

    def __init__(self):
        self.regs = bytearray(256)
        self.ptr = 0

    def on_write(self, reg, value):
        """One register written by the host; override for side effects or
        read-only registers."""
        self.regs[reg] = value

    def i2c_write(self, data):
        n = len(data)
        if n == 0:
            return
        self.ptr = data[0]
        if self.WRITE_PAIRS:
            for i in range(0, n - 1, 2):
                self.on_write(data[i], data[i + 1])
                self.ptr = data[i]
            return
        for i in range(1, n):
            self.on_write(self.ptr, data[i])
            self.ptr = (self.ptr + 1) & 0xFF

    def i2c_read_into(self, buf):
        regs = self.regs
        p = self.ptr
        for i in range(len(buf)):
            buf[i] = regs[p]
            p = (p + 1) & 0xFF
        self.ptr = p

    def i2c_read(self, n):
        buf = bytearray(n)
        self.i2c_read_into(buf)
        return bytes(buf)
