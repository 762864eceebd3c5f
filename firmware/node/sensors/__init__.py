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
