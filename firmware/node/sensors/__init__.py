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
