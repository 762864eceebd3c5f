"""Ed25519 signature verification (RFC 8032) and SHA-512 in pure MicroPython,
for the signed OTA manifests (docs/ota.md). Verify only: nodes never sign.

    from node.ed25519 import verify, sha512
    verify(public_key, message, signature) -> bool
    sha512(data) -> 64-byte digest       (SHA512 for incremental hashing)

MicroPython's hashlib has no sha512 on the ESP32, hence the one here: 64-bit
words as ints (arbitrary precision), so it is clear rather than fast.

verify() follows RFC 8032 section 5.1.7 with the cofactorless equation, as
the `cryptography` package (OpenSSL) does: the signature is (R, S); S must be
< L; A (the public key) must decode as a point (canonical y < p, x found,
no "negative zero"); h = SHA-512(R || A || M) mod L; then [S]B - [h]A is
computed and its canonical encoding must equal R byte for byte (so a
non-canonical R never matches, as if its decoding had failed).
Wrong types or lengths are False, never an exception (MemoryError is let
through: it means the node is short of RAM, not that the input is bad).

Field elements are ints mod p, reduced after each multiplication; points are
tuples in extended coordinates (X, Y, Z, T) with x = X/Z, y = Y/Z, T = XY/Z.
The double-scalar product walks both scalars in width-5 NAF (Straus): 253
doublings and about 85 additions from two tables of odd multiples [1..15].
Variable time, which is fine: everything verified is public.
"""
import struct

from micropython import const

_P = const(0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFED)  # 2^255 - 19
_L = const(0x1000000000000000000000000000000014DEF9DEA2F79CD65812631A5CF5D3ED)  # group order
_D = const(0x52036CEE2B6FFE738CC740797779E89800700A4D4141D8AB75EB4DCA135978A3)  # -121665/121666
_D2 = const(0x2406D9DC56DFFCE7198E80F2EEF3D13000E0149A8283B156EBD69B9426B2F159)  # 2d
_SQRTM1 = const(0x2B8324804FC1DF0B2B4D00993DFBD7A72F431806AD2FE478C4EE1B274A0EA0B0)  # sqrt(-1)
_BX = const(0x216936D3CD6E53FEC0A4E231FDD6DC5C692CC7609525A7B2C9562D608F25D51A)  # base point
_BY = const(0x6666666666666666666666666666666666666666666666666666666666666658)
_Y_MASK = const((1 << 255) - 1)
_W = const(5)  # NAF width: tables of [1, 3, ..., 15] times a point

# ---------------------------------------------------------------- SHA-512

_M64 = const(0xFFFFFFFFFFFFFFFF)
_DUP = const((1 << 64) + 1)
_H0 = (
    0x6A09E667F3BCC908, 0xBB67AE8584CAA73B, 0x3C6EF372FE94F82B, 0xA54FF53A5F1D36F1,
    0x510E527FADE682D1, 0x9B05688C2B3E6C1F, 0x1F83D9ABFB41BD6B, 0x5BE0CD19137E2179,
)
_K = (
    0x428A2F98D728AE22, 0x7137449123EF65CD, 0xB5C0FBCFEC4D3B2F, 0xE9B5DBA58189DBBC,
    0x3956C25BF348B538, 0x59F111F1B605D019, 0x923F82A4AF194F9B, 0xAB1C5ED5DA6D8118,
    0xD807AA98A3030242, 0x12835B0145706FBE, 0x243185BE4EE4B28C, 0x550C7DC3D5FFB4E2,
    0x72BE5D74F27B896F, 0x80DEB1FE3B1696B1, 0x9BDC06A725C71235, 0xC19BF174CF692694,
    0xE49B69C19EF14AD2, 0xEFBE4786384F25E3, 0x0FC19DC68B8CD5B5, 0x240CA1CC77AC9C65,
    0x2DE92C6F592B0275, 0x4A7484AA6EA6E483, 0x5CB0A9DCBD41FBD4, 0x76F988DA831153B5,
    0x983E5152EE66DFAB, 0xA831C66D2DB43210, 0xB00327C898FB213F, 0xBF597FC7BEEF0EE4,
    0xC6E00BF33DA88FC2, 0xD5A79147930AA725, 0x06CA6351E003826F, 0x142929670A0E6E70,
    0x27B70A8546D22FFC, 0x2E1B21385C26C926, 0x4D2C6DFC5AC42AED, 0x53380D139D95B3DF,
    0x650A73548BAF63DE, 0x766A0ABB3C77B2A8, 0x81C2C92E47EDAEE6, 0x92722C851482353B,
    0xA2BFE8A14CF10364, 0xA81A664BBC423001, 0xC24B8B70D0F89791, 0xC76C51A30654BE30,
    0xD192E819D6EF5218, 0xD69906245565A910, 0xF40E35855771202A, 0x106AA07032BBD1B8,
    0x19A4C116B8D2D0C8, 0x1E376C085141AB53, 0x2748774CDF8EEB99, 0x34B0BCB5E19B48A8,
    0x391C0CB3C5C95A63, 0x4ED8AA4AE3418ACB, 0x5B9CCA4F7763E373, 0x682E6FF3D6B2B8A3,
    0x748F82EE5DEFB2FC, 0x78A5636F43172F60, 0x84C87814A1F0AB72, 0x8CC702081A6439EC,
    0x90BEFFFA23631E28, 0xA4506CEBDE82BDE9, 0xBEF9A3F7B2C67915, 0xC67178F2E372532B,
    0xCA273ECEEA26619C, 0xD186B8C721C0C207, 0xEADA7DD6CDE0EB1E, 0xF57D4F7FEE6ED178,
    0x06F067AA72176FBA, 0x0A637DC5A2C898A6, 0x113F9804BEF90DAE, 0x1B710B35131C471B,
    0x28DB77F523047D84, 0x32CAAB7B40C72493, 0x3C9EBE0A15C9BEBC, 0x431D67C49C100D4C,
    0x4CC5D4BECB3E42B6, 0x597F299CFC657E2A, 0x5FCB6FAB3AD6FAEC, 0x6C44198C4A475817,
)


def _compress(h, block):
    # One 128-byte block into the state list h (FIPS 180-4, 6.4.2).
    # A rotation of a 64-bit x is read off xx = x * _DUP = x | x << 64:
    # bits 0..63 of xx >> n are x rotated right by n, and the three
    # rotations of a sigma share their shifts. Bits above 63 are junk that
    # the & _M64 of every stored word drops (sums carry only upwards).
    w = list(struct.unpack(">16Q", block))
    for t in range(16, 80):
        x = w[t - 15]
        xx = x * _DUP
        y = w[t - 2]
        yy = y * _DUP
        w.append((w[t - 16] + w[t - 7]
                  + ((((xx >> 7) ^ xx) >> 1) ^ (x >> 7))  # rotr 1, 8; shr 7
                  + ((((yy >> 42) ^ yy) >> 19) ^ (y >> 6))) & _M64)  # rotr 19, 61; shr 6
    a, b, c, d, e, f, g, hh = h
    bc = b ^ c
    for t in range(80):
        ee = e * _DUP
        aa = a * _DUP
        ab = a ^ b
        t1 = (hh + (((((ee >> 23) ^ ee) >> 4) ^ ee) >> 14)  # rotr 14, 18, 41
              + (g ^ (e & (f ^ g))) + _K[t] + w[t])  # Ch
        t2 = (((((aa >> 5) ^ aa) >> 6) ^ aa) >> 28) + ((ab & bc) ^ b)  # rotr 28, 34, 39; Maj
        bc = ab
        hh = g
        g = f
        f = e
        e = (d + t1) & _M64
        d = c
        c = b
        b = a
        a = (t1 + t2) & _M64
    for i, v in enumerate((a, b, c, d, e, f, g, hh)):
        h[i] = (h[i] + v) & _M64


class SHA512:
    """Incremental SHA-512 (FIPS 180-4): update(bytes-like), then digest().
    Keeps under 128 bytes of input, so a large message can be fed in pieces."""

    def __init__(self, data=b""):
        self._h = list(_H0)
        self._buf = b""
        self._n = 0
        self.update(data)

    def update(self, data):
        n = len(data)
        self._n += n
        i = 0
        if self._buf:
            i = min(128 - len(self._buf), n)
            self._buf += bytes(data[:i])
            if len(self._buf) < 128:
                return
            _compress(self._h, self._buf)
        mv = memoryview(data)
        while i + 128 <= n:
            _compress(self._h, mv[i:i + 128])
            i += 128
        self._buf = bytes(mv[i:])

    def digest(self):
        """The 64-byte digest of everything fed so far (more may follow)."""
        n = self._n
        tail = self._buf + b"\x80" + bytes((111 - n) % 128) + (n * 8).to_bytes(16, "big")
        h = list(self._h)
        for i in range(0, len(tail), 128):
            _compress(h, tail[i:i + 128])
        return struct.pack(">8Q", *h)


def sha512(data):
    """SHA-512 of a bytes-like object: 64 bytes."""
    return SHA512(data).digest()


# ---------------------------------------------------------------- Ed25519


def _dbl(P):
    # RFC 8032 5.1.4, doubling (a = -1); T of the input is not needed
    X, Y, Z, _ = P
    a = X * X % _P
    b = Y * Y % _P
    c = 2 * Z * Z % _P
    h = a + b
    s = X + Y
    e = h - s * s % _P
    g = a - b
    f = c + g
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _add(P, Q):
    # RFC 8032 5.1.4, addition, with Q cached as (Y+X, Y-X, 2Z, 2dT)
    X, Y, Z, T = P
    a = (Y - X) * Q[1] % _P
    b = (Y + X) * Q[0] % _P
    c = T * Q[3] % _P
    d = Z * Q[2] % _P
    e = b - a
    f = d - c
    g = d + c
    h = b + a
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _sub(P, Q):
    # P - Q, Q cached: -Q = (-X, Y, Z, -T) swaps Y+X with Y-X and negates 2dT
    X, Y, Z, T = P
    a = (Y - X) * Q[0] % _P
    b = (Y + X) * Q[1] % _P
    c = T * Q[3] % _P
    d = Z * Q[2] % _P
    e = b - a
    f = d + c
    g = d - c
    h = b + a
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _cached(P):
    X, Y, Z, T = P
    return ((Y + X) % _P, (Y - X) % _P, 2 * Z % _P, T * _D2 % _P)


def _odd_multiples(P):
    # [P, 3P, 5P, ..., 15P], cached
    P2 = _cached(_dbl(P))
    out = [_cached(P)]
    for _ in range(1, 1 << (_W - 2)):
        P = _add(P, P2)
        out.append(_cached(P))
    return out


def _naf(k):
    # width-W NAF digits of k >= 0, least significant first: each is 0 or odd
    # with |d| < 2^(W-1), and any nonzero digit is followed by W-1 zeros
    out = []
    while k:
        if k & 1:
            d = k & ((1 << _W) - 1)
            if d >= 1 << (_W - 1):
                d -= 1 << _W
            k -= d
        else:
            d = 0
        out.append(d)
        k >>= 1
    return out


def _double_scalar(s, P, k, Q):
    # [s]P + [k]Q (Straus: one chain of doublings for both)
    ns = _naf(s)
    nk = _naf(k)
    tp = _odd_multiples(P)
    tq = _odd_multiples(Q)
    R = (0, 1, 1, 0)
    for i in range(max(len(ns), len(nk)) - 1, -1, -1):
        R = _dbl(R)
        for digits, table in ((ns, tp), (nk, tq)):
            d = digits[i] if i < len(digits) else 0
            if d > 0:
                R = _add(R, table[d >> 1])
            elif d < 0:
                R = _sub(R, table[-d >> 1])
    return R


def _decode(s):
    # RFC 8032 5.1.3: 32 bytes -> extended point, or None if not a valid encoding
    y = int.from_bytes(s, "little")
    sign = y >> 255
    y &= _Y_MASK
    if y >= _P:
        return None
    yy = y * y % _P
    u = (yy - 1) % _P
    v = (_D * yy + 1) % _P
    v3 = v * v % _P * v % _P
    x = u * v3 % _P * pow(u * v3 % _P * v3 % _P * v % _P, (_P - 5) // 8, _P) % _P
    vxx = v * x % _P * x % _P
    if vxx != u:
        if vxx != _P - u:
            return None
        x = x * _SQRTM1 % _P
    if x == 0 and sign:
        return None
    if x & 1 != sign:
        x = _P - x
    return (x, y, 1, x * y % _P)


def _encode(P):
    X, Y, Z, _ = P
    zi = pow(Z, _P - 2, _P)
    x = X * zi % _P
    y = Y * zi % _P
    return (y | (x & 1) << 255).to_bytes(32, "little")


def _is_buffer(b):
    return isinstance(b, (bytes, bytearray, memoryview))


def verify(public_key, message, signature):
    """True if `signature` (64 bytes: R || S) is a valid Ed25519 signature of
    `message` (bytes-like) under `public_key` (32 bytes). False for anything
    else: wrong type or length, S >= L, a key that is not a point, a
    mismatch."""
    if not (_is_buffer(public_key) and _is_buffer(message) and _is_buffer(signature)):
        return False
    if len(public_key) != 32 or len(signature) != 64:
        return False
    r = bytes(signature[:32])
    s = int.from_bytes(bytes(signature[32:]), "little")
    if s >= _L:
        return False
    a = _decode(bytes(public_key))
    if a is None:
        return False
    hsh = SHA512(r)
    hsh.update(public_key)
    hsh.update(message)
    k = int.from_bytes(hsh.digest(), "little") % _L
    neg_a = (_P - a[0], a[1], a[2], _P - a[3])
    return _encode(_double_scalar(s, (_BX, _BY, 1, _BX * _BY % _P), k, neg_a)) == r
