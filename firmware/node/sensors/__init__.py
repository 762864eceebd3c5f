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
