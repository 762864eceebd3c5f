"""The JMA instrumental seismic intensity (計測震度) and PGA: pure functions
and the JMA engine that the ADXL345 driver (node.sensors.seismic) runs.

The JMA method (気象庁, 計測震度の算出方法): Fourier transform of each
component, the JMA filter (period effect sqrt(1/f), high cut
(1 + 0.694x^2 + 0.241x^4 + 0.0557x^6 + 0.009664x^8 + 0.00134x^10
+ 0.000155x^12)^-1/2 with x = f/10 Hz, low cut sqrt(1 - exp(-(f/0.5)^3))),
inverse transform, vector sum of the three filtered components, the value a
such that |vector| >= a for 0.3 s in total (at 100 Hz: the 30th largest
sample), I = 2 log10(a) + 0.94. Conventions here: each component's mean is
removed and the record zero-padded to a power of two before the transform
(without the mean removal the padding would turn gravity into a step); the
returned I is unrounded. JMA publishes I rounded to two decimals and then
cut to one (jma_published), and the scale (震度階級) from that (jma_scale).

Memory: the transform needs two float32 arrays of the padded length (2 x 32
KB for 60 s at 100 Hz): x and y go through one complex FFT (the filter is
real and even, so the real part comes back as filtered x and the imaginary
part as filtered y), z through a half-length complex FFT of its even and odd
samples. Allocation is fine here (floats, once per window); the per-sample
path of the driver is ints in preallocated arrays.
"""
import math
from array import array

G_GAL = 980.665
SCALES_JMA = ("0", "1", "2", "3", "4", "5-", "5+", "6-", "6+", "7")
_SCALE_BOUNDS = (0.5, 1.5, 2.5, 3.5, 4.5, 5.0, 5.5, 6.0, 6.5)


def jma_gain(f):
    """The JMA filter's gain at f Hz (0 at f <= 0)."""
    if f <= 0:
        return 0.0
    x = f * 0.1
    x2 = x * x
    hc = 1.0 + x2 * (0.694 + x2 * (0.241 + x2 * (0.0557 + x2 * (0.009664 + x2 * (0.00134 + x2 * 0.000155)))))
    y = f * 2.0
    return math.sqrt((1.0 - math.exp(-y * y * y)) / (f * hc))


def jma_published(i):
    """I as JMA publishes it: rounded at the 3rd decimal, then cut to one decimal."""
    if i != i or i in (math.inf, -math.inf):
        return i
    c = math.floor(i * 100 + 0.5)  # hundredths
    return math.floor(c / 10 + 1e-9) / 10


def jma_scale(i):
    """震度階級 of an intensity: "0".."4", "5-", "5+", "6-", "6+", "7"
    (from the published value, as JMA does)."""
    p = jma_published(i)
    k = 0
    for b in _SCALE_BOUNDS:
        if p < b - 1e-6:
            break
        k += 1
    return SCALES_JMA[k]


def scale_index(i):
    return SCALES_JMA.index(jma_scale(i))


def pga(ax, ay, az):
    """Peak of the vector acceleration (same unit as the input, e.g. gal).
    Remove gravity and offsets before calling."""
    m = 0.0
    for i in range(len(ax)):
        v = ax[i] * ax[i] + ay[i] * ay[i] + az[i] * az[i]
        if v > m:
            m = v
    return math.sqrt(m)


def _fft(re, im, n, sign, poll):
    # in place, radix 2, unnormalised; n a power of two; sign -1 forward, +1 inverse
    j = 0
    for i in range(1, n - 1):
        bit = n >> 1
        while j & bit:
            j ^= bit
            bit >>= 1
        j |= bit
        if i < j:
            t = re[i]
            re[i] = re[j]
            re[j] = t
            t = im[i]
            im[i] = im[j]
            im[j] = t
    for i in range(0, n, 2):  # size 2: twiddle 1
        a = re[i]
        b = re[i + 1]
        re[i] = a + b
        re[i + 1] = a - b
        a = im[i]
        b = im[i + 1]
        im[i] = a + b
        im[i + 1] = a - b
    size = 4
    cos = math.cos
    sin = math.sin
    while size <= n:
        half = size >> 1
        step = sign * 2 * math.pi / size
        for k in range(half):
            wr = cos(step * k)
            wi = sin(step * k)
            for i in range(k, n, size):
                j = i + half
                xr = re[j]
                xi = im[j]
                tr = wr * xr - wi * xi
                ti = wr * xi + wi * xr
                ur = re[i]
                ui = im[i]
                re[j] = ur - tr
                im[j] = ui - ti
                re[i] = ur + tr
                im[i] = ui + ti
        if poll is not None:
            poll()
        size <<= 1


def _pow2(n):
    p = 1
    while p < n:
        p <<= 1
    return p


class JMA:
    """The intensity computation with its scratch allocated once, for records
    of up to n_max samples. ``intensity`` reads the three components from
    sequences (or ring buffers: start, ring length) and scales them by
    ``scale`` (e.g. gal per LSB); ``poll`` is called between stages so a
    driver can drain its FIFO during a long computation."""

    def __init__(self, n_max):
        self.size = _pow2(max(n_max, 2))
        self._re = array("f", bytes(4 * self.size))
        self._im = array("f", bytes(4 * self.size))

    def intensity(self, ax, ay, az, n, rate_hz=100, start=0, ring=0, scale=1.0, poll=None):
        """The unrounded JMA intensity of samples [start, start + n) (modulo
        ring, when given); -inf for a record shorter than 0.3 s or all still."""
        k30 = int(0.3 * rate_hz + 0.5)
        if n < max(k30, 2) or n > self.size:
            if n > self.size:
                raise ValueError("record longer than the JMA scratch")
            return -math.inf
        ring = ring or (start + n)
        big = _pow2(n)
        re = self._re
        im = self._im
        df = rate_hz / big
        # x + iy through one complex FFT
        mx = self._mean(ax, n, start, ring)
        my = self._mean(ay, n, start, ring)
        p = start
        for i in range(n):
            re[i] = (ax[p] - mx) * scale
            im[i] = (ay[p] - my) * scale
            p += 1
            if p == ring:
                p = 0
        for i in range(n, big):
            re[i] = 0.0
            im[i] = 0.0
        _fft(re, im, big, -1, poll)
        re[0] = im[0] = 0.0
        half = big >> 1
        for k in range(1, half + 1):
            g = jma_gain(k * df) / big
            re[k] *= g
            im[k] *= g
            if k != half:
                re[big - k] *= g
                im[big - k] *= g
        if poll is not None:
            poll()
        _fft(re, im, big, 1, poll)
        for i in range(n):
            re[i] = re[i] * re[i] + im[i] * im[i]
        # z: its even and odd samples as one complex sequence of half the length
        mz = self._mean(az, n, start, ring)
        buf = memoryview(im)
        cr = buf[0:half]
        ci = buf[half:big]
        p = start
        for m in range(half):
            i = m + m
            if i < n:
                cr[m] = (az[p] - mz) * scale
                p += 1
                if p == ring:
                    p = 0
            else:
                cr[m] = 0.0
            if i + 1 < n:
                ci[m] = (az[p] - mz) * scale
                p += 1
                if p == ring:
                    p = 0
            else:
                ci[m] = 0.0
        _fft(cr, ci, half, -1, poll)
        self._filter_packed(cr, ci, half, df)
        if poll is not None:
            poll()
        _fft(cr, ci, half, 1, poll)
        for m in range(half):
            i = m + m
            if i < n:
                re[i] += cr[m] * cr[m]
            if i + 1 < n:
                re[i + 1] += ci[m] * ci[m]
        a2 = self._kth_largest(re, n, k30)
        if a2 <= 0:
            return -math.inf
        return math.log10(a2) + 0.94  # 2 log10(a) with a^2 at hand

    @staticmethod
    def _mean(a, n, start, ring):
        s = 0
        p = start
        for _ in range(n):
            s += a[p]
            p += 1
            if p == ring:
                p = 0
        return s / n

    @staticmethod
    def _filter_packed(cr, ci, m, df):
        # C = FFT_m(z[2j] + i z[2j+1]). For each pair (k, m-k): split into the
        # spectra of the even and odd samples, form Z[k] and Z[k+m] of the
        # length-2m transform, apply the gain, and pack back, so that the
        # inverse FFT_m gives the filtered even/odd samples (1/m folded in).
        pi_m = math.pi / m
        for k in range(m // 2 + 1):
            k2 = m - k if k else 0
            ar = cr[k]
            ai = ci[k]
            br = cr[k2]
            bi = -ci[k2]  # conj(C[m-k])
            er = (ar + br) * 0.5  # even-sample spectrum E[k]
            ei = (ai + bi) * 0.5
            orr = (ai - bi) * 0.5  # odd-sample spectrum O[k] = (A - B) / 2i
            oi = -(ar - br) * 0.5
            c = math.cos(pi_m * k)
            s = -math.sin(pi_m * k)  # W^k = exp(-i pi k / m)
            pr = c * orr - s * oi
            pim = c * oi + s * orr
            g1 = jma_gain(k * df) / m
            g2 = jma_gain((m - k) * df) / m  # bin k+m is the frequency -(m-k)
            y1r = g1 * (er + pr)
            y1i = g1 * (ei + pim)
            y2r = g2 * (er - pr)
            y2i = g2 * (ei - pim)
            er = (y1r + y2r) * 0.5
            ei = (y1i + y2i) * 0.5
            dr = (y1r - y2r) * 0.5
            di = (y1i - y2i) * 0.5
            orr = c * dr + s * di  # times conj(W^k)
            oi = c * di - s * dr
            cr[k] = er - oi  # E' + i O'
            ci[k] = ei + orr
            if k and k2 != k:
                cr[k2] = er + oi  # conj(E') + i conj(O')
                ci[k2] = orr - ei

    @staticmethod
    def _kth_largest(v, n, k):
        top = array("f", bytes(4 * k))
        filled = 0
        for i in range(n):
            x = v[i]
            if filled < k:
                j = filled
                filled += 1
            elif x > top[k - 1]:
                j = k - 1
            else:
                continue
            while j > 0 and top[j - 1] < x:
                top[j] = top[j - 1]
                j -= 1
            top[j] = x
        return top[k - 1]


def jma_intensity(ax, ay, az, rate_hz=100):
    """JMA instrumental seismic intensity of three acceleration records in gal
    (unrounded; see jma_published and jma_scale)."""
    n = len(ax)
    if len(ay) != n or len(az) != n:
        raise ValueError("components differ in length")
    return JMA(n).intensity(ax, ay, az, n, rate_hz)
