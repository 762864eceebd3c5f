"""RegisterDevice: an I2C part made of 8-bit registers.

The first byte written sets the register pointer; further bytes go to
consecutive registers (or, with WRITE_PAIRS, to register/value pairs as on
Bosch parts); reads return bytes from the pointer and auto-increment.
"""


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
