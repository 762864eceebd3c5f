"""Sensor drivers, one module per family.

Each driver is handed its bus, has KIND, CHANNELS, SCALES, begin(),
read_into(out, offset) -> bool, ``errors`` and ``status`` (see
docs/architecture.md). SensorError is the layer's one exception.
"""

OK = "ok"  # answering with good data
WARNING = "warning"  # transient fault or not set up yet; reads are retried
FAILED = "failed"  # permanent (wrong part, bad calibration): begin() again to retry


class SensorError(Exception):
    """begin() could not set the part up; the message says why."""


class Sensor:
    """What every driver shares: the error count, the status, and the two
    ways a reading goes wrong. `where` names the part in messages
    ("bme280 at 0x76")."""

    errors = 0
    status = WARNING  # not set up yet
    _ready = False

    def _fail(self, reason):
        # permanent: begin() could not set the part up
        self._ready = False
        self.status = FAILED
        raise SensorError("%s: %s" % (self.where(), reason))

    def _warn(self):
        # transient: counted, retried at the next reading; never a made-up value
        self.errors += 1
        self.status = WARNING
        return False

    def where(self):
        a = getattr(self, "address", None)
        return self.KIND if a is None else "%s at 0x%02x" % (self.KIND, a)


class I2CSensor(Sensor):
    """A part made of 8-bit registers on I2C: subclasses set _i2c, address
    and a one-byte _b1 buffer."""

    def _reg(self, reg):
        self._i2c.readfrom_mem_into(self.address, reg, self._b1)
        return self._b1[0]

    def _write(self, reg, value):
        self._b1[0] = value
        self._i2c.writeto_mem(self.address, reg, self._b1)


class EventSource:
    """A driver that raises events (river stages, earthquakes, EV sessions):
    a bounded queue the app drains every tick with take_events()."""

    MAX_EVENTS = 16
    dropped_events = 0

    def _emit(self, name, severity, data):
        q = self._events
        if len(q) >= self.MAX_EVENTS:
            q.pop(0)
            self.dropped_events += 1
        q.append((name, severity, data))

    def take_events(self):
        """Events since the last call, oldest first, or None."""
        q = self._events
        if not q:
            return None
        self._events = []
        return q


def isqrt(v):
    """Integer square root of a non-negative int (0 for v <= 0)."""
    if v <= 0:
        return 0
    x = v
    y = (x + 1) >> 1
    while y < x:
        x = y
        y = (x + v // x) >> 1
    return x


class UARTSensor(Sensor):
    """A part that streams frames on a UART by itself (PMS5003, LD2410,
    A02YYUW): subclasses set _uart and a preallocated _chunk, and parse one
    byte at a time in _feed(b)."""

    MAX_CHUNKS = 8  # chunks taken per call: the RX FIFO twice over

    def _drain(self):
        # at begin(): drop whatever is queued (a frame cut by power-up)
        try:
            for _ in range(self.MAX_CHUNKS):
                if not self._uart.readinto(self._chunk):
                    break
        except OSError as e:
            self._fail("UART error (OSError %s)" % e.args[0])

    def _pump(self):
        # feed every waiting byte to _feed(); False on a UART error (counted)
        u = self._uart
        c = self._chunk
        try:
            for _ in range(self.MAX_CHUNKS):
                n = u.readinto(c)
                if not n:
                    break
                for i in range(n):
                    self._feed(c[i])  # a bound-method local would allocate
        except OSError:
            return self._warn()
        return True
