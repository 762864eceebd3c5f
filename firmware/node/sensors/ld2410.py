"""HLK-LD2410 24 GHz mmWave presence radar on a UART (256000 baud).

The radar reports by itself, about ten frames a second:

    F4 F3 F2 F1  len(u16 LE)  data[len]  F8 F7 F6 F5
    data: type (0x02 basic, 0x01 engineering), 0xAA,
          target state (0 none, 1 moving, 2 static, 3 both),
          moving distance cm (u16 LE), moving energy (u8),
          static distance cm (u16 LE), static energy (u8),
          detection distance cm (u16 LE),
          [engineering: max gates, energy per gate, extra bytes],
          0x55, 0x00

A basic frame has len 13; an engineering frame is longer (35 with the
default 8 gates). The parser takes whatever bytes are waiting, hunts for the
header (bytes skipped: ``skipped``), checks length, head, tail, check byte
and footer, and counts every bad frame in ``bad_frames`` (also in
``errors``); after a bad frame it starts again at the next F4 inside it, so
a frame cut short loses nothing that follows. No allocation per read.

Channels from the newest good frame since the last read: presence 0/1, and
the moving and static target distances in cm (0 when that kind of target
is absent). No frame for more than 2 s: status "warning", errors += 1 once,
reads False until frames come back.
"""
from micropython import const
from node.sensors import UARTSensor, OK, WARNING

_CHUNK = const(64)
_MAX_CHUNKS = const(8)  # per read_into: 512 bytes, 20 basic frames
_MIN_LEN = const(13)
_MAX_LEN = const(64)  # data bytes; engineering frames with 8 gates have 35
_BUF = const(74)  # 4 + 2 + _MAX_LEN + 4
_SILENCE_MS = const(2000)
_MAX_CM = const(1000)  # the part sees 6 m (8 gates x 0.75 m); past 10 m is a bad answer
_HDR = b"\xf4\xf3\xf2\xf1"
_FTR = b"\xf8\xf7\xf6\xf5"


class LD2410(UARTSensor):
    KIND = "ld2410"
    CHANNELS = ("presence", "moving_cm", "static_cm")
    SCALES = (1, 1, 1)

    def __init__(self, uart, clock, opts=None):
        self._uart = uart
        self._clock = clock
        self._chunk = bytearray(_CHUNK)
        self._f = bytearray(_BUF)  # the frame being assembled
        self._n = 0
        self._back = bytearray(_BUF)  # bytes of a bad frame to parse again
        self._bpos = 0
        self._bn = 0
        self._fresh = False
        self._last = 0  # ticks of the last good frame
        self._silent = False
        self._ready = False
        # the newest good frame
        self.state = 0
        self.moving_cm = 0
        self.moving_energy = 0
        self.static_cm = 0
        self.static_energy = 0
        self.detect_cm = 0
        self.engineering = False  # the newest frame was an engineering one
        self.frames = 0
        self.bad_frames = 0
        self.skipped = 0
        self.errors = 0
        self.status = WARNING  # not set up yet

    def begin(self):
        """Drop whatever is queued (a frame cut by power-up); frames then arrive by themselves."""
        self._drain()
        self._n = 0
        self._bpos = self._bn = 0
        self._fresh = False
        self._silent = False
        self._last = self._clock.ticks_ms()  # 2 s of grace from now
        self._ready = True
        self.status = OK

    def read_into(self, out, offset):
        """Fill out[offset:offset+3] with presence, moving and static distance
        from the newest good frame since the last call; False when there is none."""
        if not self._ready:
            return False
        bad = self.bad_frames
        u = self._uart
        c = self._chunk
        try:
            for _ in range(_MAX_CHUNKS):
                n = u.readinto(c)
                if not n:
                    break
                for i in range(n):
                    self._feed(c[i])
                    while self._bpos < self._bn:
                        b = self._back[self._bpos]
                        self._bpos += 1
                        self._feed(b)
        except OSError:
            self.errors += 1
            self.status = WARNING
            return False
        bad = self.bad_frames - bad
        self.errors += bad
        now = self._clock.ticks_ms()
        if not self._fresh:
            if self._clock.ticks_diff(now, self._last) > _SILENCE_MS:
                if not self._silent:
                    self._silent = True
                    self.errors += 1
                self.status = WARNING
            elif bad:
                self.status = WARNING
            return False
        self._fresh = False
        self._silent = False
        self._last = now
        s = self.state
        out[offset] = 1 if s else 0
        out[offset + 1] = self.moving_cm if s & 1 else 0
        out[offset + 2] = self.static_cm if s & 2 else 0
        self.status = OK
        return True

    def _feed(self, b):
        f = self._f
        n = self._n
        if n < 4:
            if b == _HDR[n]:
                f[n] = b
                self._n = n + 1
            elif b == 0xF4:
                self.skipped += n
                f[0] = b
                self._n = 1
            else:
                self.skipped += n + 1
                self._n = 0
            return
        f[n] = b
        n += 1
        self._n = n
        if n == 6:
            ln = f[4] | (f[5] << 8)
            if ln < _MIN_LEN or ln > _MAX_LEN:
                self._bad()
            return
        if n == 8:
            if (f[6] != 0x01 and f[6] != 0x02) or f[7] != 0xAA:
                self._bad()
            return
        ln = f[4] | (f[5] << 8)
        if n == 10 + ln:
            self._frame(ln)

    def _frame(self, ln):
        f = self._f
        e = 6 + ln
        if (f[e - 2] != 0x55 or f[e - 1] != 0x00 or f[e] != 0xF8 or f[e + 1] != 0xF7
                or f[e + 2] != 0xF6 or f[e + 3] != 0xF5 or (f[6] == 0x02 and ln != _MIN_LEN)):
            self._bad()
            return
        state = f[8]
        md = f[9] | (f[10] << 8)
        sd = f[12] | (f[13] << 8)
        if state > 3 or md > _MAX_CM or sd > _MAX_CM:
            self._bad()
            return
        self.state = state
        self.moving_cm = md
        self.moving_energy = f[11]
        self.static_cm = sd
        self.static_energy = f[14]
        self.detect_cm = f[15] | (f[16] << 8)
        self.engineering = f[6] == 0x01
        self.frames += 1
        self._fresh = True
        self._n = 0

    def _bad(self):
        # count the frame, then parse its bytes after the first again (ahead
        # of any bytes already waiting there): the next header may be inside
        self.bad_frames += 1
        f = self._f
        back = self._back
        m = self._n - 1
        pos = self._bpos
        rest = self._bn - pos
        # a frame assembled from re-parsed bytes is shorter than pos, so the
        # waiting bytes only ever move down
        for i in range(rest):
            back[m + i] = back[pos + i]
        for i in range(m):
            back[i] = f[i + 1]
        self._bpos = 0
        self._bn = m + rest
        self._n = 0
