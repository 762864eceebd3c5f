"""The firmware's Ed25519 verify and SHA-512 (firmware/node/ed25519.py) under
CPython, checked against the `cryptography` package and hashlib; the
constants the VM test (tests/firmware/test_ed25519.py) embeds, checked to be
what RFC 8032's secret keys and cryptography produce; and `vm_figures()`,
the time and memory of one verify of a ~2 KB manifest in the MicroPython VM
(docs/ota.md, "Manifest signatures on the node", says how to read them)."""
from __future__ import annotations

import ast
import hashlib
import json
import random
import sys
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tools.mpvm import run_script, vm_available

REPO = Path(__file__).resolve().parents[1]
VM_TEST = REPO / "tests" / "firmware" / "test_ed25519.py"


def firmware_ed25519():
    fw = str(REPO / "firmware")
    if fw not in sys.path:
        sys.path.insert(0, fw)
    import sim.cpython
    sim.cpython.install()  # micropython.const under CPython
    from node import ed25519
    return ed25519


@pytest.fixture(scope="module")
def ed():
    return firmware_ed25519()


def raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def cryptography_verify(public: bytes, message: bytes, signature: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
        return True
    except (InvalidSignature, ValueError):
        return False


def message(n: int) -> bytes:
    """The messages of the VM test's CRYPTOGRAPHY vectors."""
    return bytes((i * 73 + 41) % 251 for i in range(n))


def flip(b: bytes, bit: int) -> bytes:
    out = bytearray(b)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def vm_test_constant(name: str):
    """A literal tuple assigned at the top of the VM test module."""
    tree = ast.parse(VM_TEST.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise LookupError(f"{name} not in {VM_TEST}")


def test_curve_constants(ed):
    p = 2**255 - 19
    d = -121665 * pow(121666, p - 2, p) % p
    assert ed._P == p and ed._L == 2**252 + 27742317777372353535851937790883648493
    assert ed._D == d and ed._D2 == 2 * d % p
    assert ed._SQRTM1 ** 2 % p == p - 1
    x, y = ed._BX, ed._BY
    assert y == 4 * pow(5, p - 2, p) % p and x % 2 == 0  # RFC 8032 5.1: B = (x, 4/5), x even
    assert (-x * x + y * y - 1 - d * x * x * y * y) % p == 0
    assert ed._decode(bytes.fromhex("58" + "66" * 31)) == (x, y, 1, x * y % p)


def test_sha512_matches_hashlib(ed):
    rng = random.Random(512)
    for n in list(range(0, 260)) + [1023, 2000, 5000]:
        data = rng.randbytes(n)
        assert ed.sha512(data) == hashlib.sha512(data).digest(), n
    data = rng.randbytes(3000)
    h = ed.SHA512()
    i = 0
    while i < len(data):
        step = rng.randrange(0, 300)
        h.update(memoryview(data)[i:i + step])
        i += step
    assert h.digest() == hashlib.sha512(data).digest()


def test_verify_agrees_with_cryptography_on_50_random_keys_and_messages(ed):
    rng = random.Random(8032)
    for i in range(50):
        key = Ed25519PrivateKey.from_private_bytes(rng.randbytes(32))
        public = raw_public(key)
        msg = rng.randbytes(rng.choice([0, 1, rng.randrange(2, 300), rng.randrange(300, 3000)]))
        sig = key.sign(msg)
        assert ed.verify(public, msg, sig), i
        tampered = [(public, msg, flip(sig, rng.randrange(512))), (flip(public, rng.randrange(256)), msg, sig),
                    (public, msg + b"\x00", sig)]
        if msg:
            tampered.append((public, flip(msg, rng.randrange(len(msg) * 8)), sig))
        for t in tampered:
            assert ed.verify(*t) is False, i
            assert cryptography_verify(*t) is False, i


def test_rfc8032_constants_in_the_vm_test_are_the_rfc_keys_signatures(ed):
    vectors = vm_test_constant("RFC8032")
    assert len(vectors) == 4
    for secret, public, msg, sig in vectors:
        key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(secret))
        assert raw_public(key).hex() == public
        assert key.sign(bytes.fromhex(msg)).hex() == sig  # Ed25519 signing is deterministic
        assert ed.verify(bytes.fromhex(public), bytes.fromhex(msg), bytes.fromhex(sig))


def test_cryptography_constants_in_the_vm_test_are_what_cryptography_makes():
    vectors = vm_test_constant("CRYPTOGRAPHY")
    assert [n for _, _, n, _ in vectors] == [0, 1, 200, 2000]
    for i, (seed, public, n, sig) in enumerate(vectors):
        assert seed == hashlib.sha256(b"iwaki ota test key %d" % i).hexdigest()
        key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed))
        assert raw_public(key).hex() == public
        assert key.sign(message(n)).hex() == sig


IDENTITY = bytes.fromhex("01" + "00" * 31)
IDENTITY_P1 = bytes.fromhex("ee" + "ff" * 30 + "7f")  # y = p + 1
X0_NEGATIVE = bytes.fromhex("01" + "00" * 30 + "80")  # x = 0 with the sign bit set


def test_edge_cases_agree_with_cryptography_except_non_canonical_keys(ed):
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    public, msg = raw_public(key), b"manifest"
    sig = key.sign(msg)
    s = int.from_bytes(sig[32:], "little")
    L = 2**252 + 27742317777372353535851937790883648493
    same = {
        "valid": (public, msg, sig),
        "S + L": (public, msg, sig[:32] + (s + L).to_bytes(32, "little")),
        "R not canonical": (public, msg, IDENTITY_P1 + sig[32:]),
        "key not on the curve": (b"\x02" * 32, msg, sig),
        "identity key (small order), R = identity, S = 0": (IDENTITY, msg, IDENTITY + bytes(32)),
        "identity key, R = identity not canonical": (IDENTITY, msg, IDENTITY_P1 + bytes(32)),
        "order-4 key y = 0": (bytes(32), msg, IDENTITY + bytes(32)),
    }
    for name, case in same.items():
        assert ed.verify(*case) == cryptography_verify(*case), name
    # RFC 8032 5.1.3 refuses these key encodings; OpenSSL reduces them mod p
    for name, public in (("y = p + 1", IDENTITY_P1), ("x = 0, sign bit set", X0_NEGATIVE)):
        case = (public, msg, IDENTITY + bytes(32))
        assert cryptography_verify(*case) is True, name
        assert ed.verify(*case) is False, name


# ---------------------------------------------------------------- VM figures

VM_BENCH_SCRIPT = r"""
import asyncio, gc, time
from binascii import unhexlify

PUB, SIG, MSG, RUNS = unhexlify(%(pub)r), unhexlify(%(sig)r), unhexlify(%(msg)r), %(runs)d
P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493


async def live():
    # The VM (webassembly port) collects only when control is back in JS:
    # gc.collect() inside Python just asks for it. So: ask, yield to JS,
    # read; a yield can be served without going back to JS, so the least of
    # a few readings.
    least = None
    for _ in range(4):
        gc.collect()
        await asyncio.sleep_ms(5)
        m = gc.mem_alloc()
        least = m if least is None else min(least, m)
    return least


async def main():
    base = await live()
    from node import ed25519 as e
    module = await live() - base

    before = await live()
    a0 = gc.mem_alloc()
    ok = e.verify(PUB, MSG, SIG)
    allocated = gc.mem_alloc() - a0  # nothing is freed until we yield
    retained = await live() - before

    # What verify holds at once at its deepest point (inside the double-scalar
    # product), built with the module's own steps and measured while alive
    r, s = SIG[:32], int.from_bytes(SIG[32:], "little")
    a = e._decode(PUB)
    h = e.SHA512(r)
    h.update(PUB)
    h.update(MSG)
    k = int.from_bytes(h.digest(), "little") %% L
    neg_a = (P - a[0], a[1], a[2], P - a[3])
    held = [r, s, a, h, k, neg_a, e._naf(s), e._naf(k),
            e._odd_multiples(e._decode(unhexlify("58" + "66" * 31))), e._odd_multiples(neg_a),
            e._dbl(e._dbl(neg_a))]
    working_set = await live() - before
    held = None

    def timed(f, *args):
        t0 = time.ticks_us()
        f(*args)
        return time.ticks_diff(time.ticks_us(), t0) / 1000

    e.verify(PUB, MSG, SIG)  # warm-up: Node compiles the VM's hot paths on first use
    verify_ms, sha512_ms = [], []
    for _ in range(RUNS):
        await asyncio.sleep_ms(1)  # let the VM collect between runs
        verify_ms.append(timed(e.verify, PUB, MSG, SIG))
        sha512_ms.append(timed(e.sha512, MSG))
    ok = ok and e.verify(PUB, MSG, SIG)
    print("RESULT", {"ok": ok, "message_bytes": len(MSG), "verify_ms": verify_ms, "sha512_ms": sha512_ms,
                     "module_bytes": module, "allocated_bytes": allocated,
                     "retained_bytes": retained, "working_set_bytes": working_set})
"""


def sample_manifest(target: int = 2000) -> bytes:
    """A bundle manifest as docs/ota.md defines it, about `target` bytes."""
    names = ["boot.py", "main.py", "node/__init__.mpy", "node/_version.mpy", "node/app.mpy", "node/bootinfo.mpy",
             "node/clock.mpy", "node/config.mpy", "node/ed25519.mpy", "node/health.mpy", "node/mqtt.mpy",
             "node/outbox.mpy", "node/sampler.mpy", "node/uplink.mpy", "node/sensors/__init__.mpy",
             "node/sensors/bme280.mpy", "node/sensors/jma.mpy", "node/sensors/pms5003.mpy",
             "node/sensors/rain.mpy", "node/sensors/river.mpy", "node/sensors/scd4x.mpy"]
    files = []
    doc = {}
    for i, name in enumerate(names):
        files.append({"path": name, "size": 900 + 211 * i, "sha256": hashlib.sha256(name.encode()).hexdigest()})
        doc = {"v": 1, "kind": "bundle", "version": "1.2.0", "boards": ["env-station", "river-gauge"],
               "min_version": "1.0.0", "created_at": "2026-11-23T12:00:00Z", "key_id": "0123456789abcdef",
               "files": sorted(files, key=lambda f: f["path"]), "total_size": sum(f["size"] for f in files),
               "source_bytes": 3 * sum(f["size"] for f in files)}
        text = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
        if len(text) >= target:
            return text
    return text


def vm_figures(message: bytes | None = None, runs: int = 7) -> dict:
    """Verify a signed ~2 KB manifest in the MicroPython VM; return
    {"ok", "message_bytes", "verify_ms", "sha512_ms" (one per run, after a warm-up),
    "module_bytes", "allocated_bytes", "retained_bytes", "working_set_bytes"}.
    Raises tools.mpvm.VMError when the VM cannot run."""
    message = sample_manifest() if message is None else message
    key = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"iwaki ota bench key").digest())
    script = VM_BENCH_SCRIPT % {"pub": raw_public(key).hex(), "sig": key.sign(message).hex(),
                                "msg": message.hex(), "runs": runs}
    out = run_script(script, timeout=120)
    line = next(l for l in out.splitlines() if l.startswith("RESULT "))
    return ast.literal_eval(line[len("RESULT "):])


@pytest.mark.vm
def test_vm_figures_for_a_2kb_manifest(record_property):
    why = vm_available()
    if why:
        pytest.fail(why, pytrace=False)
    fig = vm_figures()
    for name, value in fig.items():
        record_property(name, value)
    print(json.dumps(fig))
    assert fig["ok"] is True
    assert 1900 <= fig["message_bytes"] <= 2300
    assert min(fig["verify_ms"]) < 1000
    # a verify keeps nothing, and works in a few KB beside its message
    assert fig["retained_bytes"] < 1024
    assert 0 < fig["working_set_bytes"] < 16 * 1024
    assert fig["allocated_bytes"] > fig["working_set_bytes"]
