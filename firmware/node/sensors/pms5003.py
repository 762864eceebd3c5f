"""Plantower PMS5003 particulate sensor on a UART (active mode, 1 frame/s).

Frames: 0x42 0x4D, length 28, 13 big-endian words, 16-bit sum of bytes
0..29. The parser takes whatever bytes are waiting, resynchronises on
0x42 0x4D, checks length and checksum, counts bad frames (``bad_frames``,
also in ``errors``) and bytes skipped while hunting for a header
(``skipped``), and reports the newest good frame's atmospheric PM values.
No allocation per read: one chunk buffer and one frame buffer.
"""
from micropython import const
from node.sensors import UARTSensor, OK, WARNING

_LEN = const(32)
_CHUNK = const(64)


class PMS5003(UARTSensor):
    KIND = "pms5003"
    CHANNELS = ("pm1_ugm3", "pm25_ugm3", "pm10_ugm3")
    SCALES = (1, 1, 1)

    def __init__(self, uart):
        self._uart = uart
        self._chunk = bytearray(_CHUNK)
        self._f = bytearray(_LEN)
        self._n = 0
        self._pm1 = self._pm25 = self._pm10 = 0
        self._fresh = False
        self._ready = False
        self.frames = 0
        self.bad_frames = 0
        self.skipped = 0

    def begin(self):
        """Drop whatever is queued (a frame cut by power-up); frames then arrive by themselves."""
        self._drain()
        self._n = 0
        self._fresh = False
        self._ready = True
        self.status = OK

    def read_into(self, out, offset):
        """Fill out[offset:offset+3] with PM1.0, PM2.5, PM10 (ug/m3) from the newest
        good frame since the last call; False when there is none."""
        if not self._ready:
            return False
        bad = self.bad_frames
        if not self._pump():
            return False
        bad = self.bad_frames - bad
        self.errors += bad
        if not self._fresh:
            if bad:
                self.status = WARNING
            return False
        self._fresh = False
        out[offset] = self._pm1
        out[offset + 1] = self._pm25
        out[offset + 2] = self._pm10
        self.status = OK
        return True

    def _feed(self, b):
        f = self._f
        n = self._n
        if n == 0:
            if b == 0x42:
                f[0] = b
                self._n = 1
            else:
                self.skipped += 1
            return
        if n == 1:
            if b == 0x4D:
                f[1] = b
                self._n = 2
            elif b == 0x42:
                self.skipped += 1  # the earlier 0x42 was noise; this one may start a frame
            else:
                self.skipped += 2
                self._n = 0
            return
        f[n] = b
        n += 1
        self._n = n
        if n == 4 and ((f[2] << 8) | f[3]) != 28:
            self._bad()
        elif n == _LEN:
            s = 0
            for i in range(30):
                s += f[i]
            if s == (f[30] << 8) | f[31]:
                self._pm1 = (f[10] << 8) | f[11]
                self._pm25 = (f[12] << 8) | f[13]
                self._pm10 = (f[14] << 8) | f[15]
                self._fresh = True
                self.frames += 1
                self._n = 0
            else:
                self._bad()

    def _bad(self):
        # count the frame, then keep the bytes from the next 0x42 on: a frame
        # cut short is followed by the start of the next one
        self.bad_frames += 1
        f = self._f
        n = self._n
        while True:
            j = 1
            while j < n and f[j] != 0x42:
                j += 1
            for i in range(j, n):
                f[i - j] = f[i]
            n -= j
            if n >= 2 and f[1] != 0x4D:
                continue
            if n >= 4 and ((f[2] << 8) | f[3]) != 28:
                self.bad_frames += 1
                continue
            break
        self._n = n
