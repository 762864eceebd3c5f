"""Simulated HLK-LD2410 mmWave presence radar on a UART (256000 baud).

Emits a report frame every period_ms of the clock (about 10 Hz, as the
part does): basic frames by default, engineering frames after
``engineering(True)``. Frames that pile up while nobody reads arrive
together (at most StreamDevice.BURST of them). ``set()`` changes the target; the fault
switches apply to the next frame, ``silence()`` until called with False.
"""
import struct
from sim.devices.base import StreamDevice

_HDR = b"\xf4\xf3\xf2\xf1"
_FTR = b"\xf8\xf7\xf6\xf5"

NONE = 0
MOVING = 1
STATIC = 2
BOTH = 3


def frame(state=0, moving_cm=0, moving_energy=0, static_cm=0, static_energy=0, detect_cm=0,
          gates=None):
    """One report frame as bytes. gates: None for a basic frame, or
    (moving energies, static energies), one per gate, for an engineering frame."""
    body = struct.pack("<BHBHBH", state, moving_cm, moving_energy, static_cm, static_energy,
                       detect_cm)
    if gates is None:
        data = b"\x02\xaa" + body
    else:
        mv, st = gates
        data = (b"\x01\xaa" + body + bytes([len(mv) - 1, len(st) - 1]) + bytes(mv) + bytes(st)
                + b"\x00\x00")  # light sensor value and OUT pin, as on the LD2410B/C
    data += b"\x55\x00"
    return _HDR + struct.pack("<H", len(data)) + data + _FTR


class LD2410Device(StreamDevice):
    GARBAGE = b"\x00\xf4\xf3\x13\xaa\xf8"  # with a half header in it

    def __init__(self, clock, period_ms=100):
        StreamDevice.__init__(self, clock, period_ms)
        self._eng = False
        self._fault = None
        self._truncate = 0
        self.state = NONE
        self.moving_cm = self.moving_energy = 0
        self.static_cm = self.static_energy = 0
        self.detect_cm = 0
        self._rebuild()

    def set(self, state=None, moving_cm=None, moving_energy=None, static_cm=None,
            static_energy=None, detect_cm=None):
        """The target the radar sees, for the frames from now on."""
        for name, v in (("state", state), ("moving_cm", moving_cm),
                        ("moving_energy", moving_energy), ("static_cm", static_cm),
                        ("static_energy", static_energy), ("detect_cm", detect_cm)):
            if v is not None:
                setattr(self, name, v)
        self._rebuild()

    def engineering(self, on=True):
        """Engineering frames (per-gate energies) instead of basic ones."""
        self._eng = bool(on)
        self._rebuild()

    def frame(self):
        gates = None
        if self._eng:
            gates = ([min(100, self.moving_energy + g) for g in range(9)],
                     [min(100, self.static_energy + g) for g in range(9)])
        return frame(self.state, self.moving_cm, self.moving_energy, self.static_cm,
                     self.static_energy, self.detect_cm, gates)

    def _rebuild(self):
        self._set_frame(self.frame())

    # fault switches, each for the next frame
    def corrupt_footer(self):
        self._fault = "footer"

    def corrupt_tail(self):
        self._fault = "tail"

    def bad_length(self):
        self._fault = "length"

    def truncate_next(self, n=12):
        self._truncate = n

    def uart_poll(self, now_ms):
        k = self._due(now_ms)
        if not k:
            return None
        if self._fault is None and not self._truncate:
            return self._burst(k)
        L = self._len
        first = bytearray(self._buf[:L])
        if self._fault == "footer":
            first[L - 1] ^= 0x5A
        elif self._fault == "tail":
            first[L - 6] = 0x56
        elif self._fault == "length":
            first[4] = 0xFF
        if self._truncate:
            first = first[:self._truncate]
        self._fault = None
        self._truncate = 0
        return self._burst(k, first)
