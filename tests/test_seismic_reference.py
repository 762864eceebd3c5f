"""Known-answer tests of the JMA instrumental seismic intensity (計測震度) in
firmware/node/sensors/seismic.py: against an independent numpy implementation
of the JMA method, under CPython and inside the MicroPython VM.

Conventions of both implementations: each component's mean removed, the
record zero-padded to the next power of two, the JMA filter applied to the
spectrum, the 0.3 s value taken as the 30th largest vector sample at 100 Hz.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tools.mpvm import run_script, vm_available

REPO = Path(__file__).resolve().parents[1]
RATE = 100
N = 60 * RATE
SINES = [(f, a) for f in (1.0, 5.0) for a in (10.0, 50.0, 200.0)]
RECORDS = [(seed, pga) for seed, pga in ((11, 20.0), (12, 120.0), (13, 500.0))]


def seismic():
    fw = str(REPO / "firmware")
    if fw not in sys.path:
        sys.path.insert(0, fw)
    import sim.cpython
    sim.cpython.install()  # micropython.const and friends under CPython
    from node.sensors import seismic as mod
    return mod


def jma_filter(f: np.ndarray) -> np.ndarray:
    """The JMA filter from its definition (period effect x high cut x low cut)."""
    f = np.abs(f)
    out = np.zeros_like(f)
    m = f > 0
    x = f[m] / 10.0
    high_cut = 1 + 0.694 * x**2 + 0.241 * x**4 + 0.0557 * x**6 + 0.009664 * x**8 + 0.00134 * x**10 + 0.000155 * x**12
    out[m] = np.sqrt(1 / f[m]) * high_cut**-0.5 * np.sqrt(1 - np.exp(-(f[m] / 0.5) ** 3))
    return out


def reference_intensity(ax, ay, az, rate=RATE, pad=True) -> float:
    n = len(ax)
    size = 1 << (n - 1).bit_length() if pad else n
    g = jma_filter(np.fft.rfftfreq(size, 1 / rate))
    total = np.zeros(n)
    for a in (ax, ay, az):
        a = np.asarray(a, dtype=float)
        y = np.fft.irfft(np.fft.rfft(a - a.mean(), size) * g, size)[:n]
        total += y * y
    v = np.sort(np.sqrt(total))[::-1]
    a03 = v[int(round(0.3 * rate)) - 1]  # |v| >= a for 0.3 s in total
    return 2 * math.log10(a03) + 0.94


def sine_case(freq, amp):
    t = np.arange(N) / RATE
    w = 2 * np.pi * freq * t
    # three components, different phases and amplitudes, gravity on z
    return (np.round(amp * np.sin(w), 6), np.round(0.7 * amp * np.sin(w + 1.0), 6),
            np.round(0.4 * amp * np.sin(w + 2.0) + 980.665, 6))


def record_case(seed, pga):
    """A recorded-style synthetic waveform: seeded noise band-limited to about
    0.3-8 Hz under a build-up-and-decay envelope, scaled to a target PGA."""
    rng = np.random.default_rng(seed)
    t = np.arange(N) / RATE
    env = (t / 12.0) ** 2 * np.exp(2 * (1 - t / 12.0))
    f = np.fft.rfftfreq(N, 1 / RATE)
    band = np.clip((f - 0.2) / 0.2, 0, 1) * np.clip((10.0 - f) / 4.0, 0, 1)
    comps = []
    for k, share in enumerate((1.0, 0.8, 0.5)):
        x = np.fft.irfft(np.fft.rfft(rng.standard_normal(N)) * band, N) * env
        comps.append(x)
    vec = np.sqrt(sum(c * c for c in comps))
    s = pga / vec.max()
    return tuple(np.round(c * s * share, 4) for c, share in zip(comps, (1.0, 0.8, 0.5)))


CASES = {f"sine_{f:g}hz_{a:g}gal": sine_case(f, a) for f, a in SINES}
CASES.update({f"record_seed{s}_pga{p:g}": record_case(s, p) for s, p in RECORDS})


@pytest.fixture(scope="module")
def references():
    return {name: reference_intensity(*c) for name, c in CASES.items()}


def test_filter_gain_is_the_jma_definition():
    mod = seismic()
    f = np.array([0.05, 0.1, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0])
    want = jma_filter(f)
    got = np.array([mod.jma_gain(x) for x in f])
    assert np.allclose(got, want, rtol=1e-12, atol=0), (got, want)
    assert mod.jma_gain(0.0) == 0.0


@pytest.mark.parametrize("name", list(CASES))
def test_cpython_matches_numpy_reference(name, references):
    mod = seismic()
    ax, ay, az = CASES[name]
    got = mod.jma_intensity(ax.tolist(), ay.tolist(), az.tolist(), RATE)
    assert abs(got - references[name]) < 0.01, (name, got, references[name])


@pytest.mark.parametrize("amp", [10.0, 50.0, 200.0])
def test_textbook_relation_for_a_1hz_sine(amp):
    # one axis, A sin(2 pi t): the filtered signal is a sine of A * gain(1 Hz),
    # held at its peak long enough, so I = 2 log10(A * gain(1 Hz)) + 0.94
    mod = seismic()
    t = np.arange(N) / RATE
    x = (amp * np.sin(2 * np.pi * t)).tolist()
    zero = [0.0] * N
    gain_1hz = float(jma_filter(np.array([1.0]))[0])
    assert abs(gain_1hz - 0.9964) < 1e-4
    want = 2 * math.log10(amp * gain_1hz) + 0.94
    assert abs(mod.jma_intensity(x, zero, zero, RATE) - want) < 0.01
    assert abs(reference_intensity(x, zero, zero) - want) < 0.01


def test_padding_convention_is_immaterial_for_these_records(references):
    # the circular (unpadded) transform differs only by edge effects
    for name, c in CASES.items():
        assert abs(reference_intensity(*c, pad=False) - references[name]) < 0.02, name


def test_published_scale_of_the_records(references):
    mod = seismic()
    scales = {name: mod.jma_scale(references[name]) for name in CASES if name.startswith("record")}
    assert list(scales.values()) == sorted(scales.values(), key=mod.SCALES_JMA.index)
    assert len(set(scales.values())) == 3, scales


VM_SCRIPT = """
import gc, json, time
from node.sensors.seismic import jma_intensity
out = {}
ms = []
for name in NAMES:
    with open("/lib/seismic_cases/" + name + ".json") as f:
        c = json.load(f)
    gc.collect()
    t0 = time.ticks_ms()
    out[name] = jma_intensity(c[0], c[1], c[2], 100)
    ms.append(time.ticks_diff(time.ticks_ms(), t0))
    c = None
print("RESULT " + json.dumps({"intensity": out, "ms": ms}))
"""


def test_micropython_vm_matches_numpy_reference(references, tmp_path, record_property):
    why = vm_available()
    if why:
        pytest.fail(why, pytrace=False)
    data = tmp_path / "seismic_cases"
    data.mkdir()
    for name, c in CASES.items():
        (data / f"{name}.json").write_text(json.dumps([np.asarray(x).tolist() for x in c]))
    script = f"NAMES = {list(CASES)!r}\n" + VM_SCRIPT
    t0 = time.monotonic()
    out = run_script(script, lib_dirs=[tmp_path], timeout=280)
    line = next(l for l in out.splitlines() if l.startswith("RESULT "))
    res = json.loads(line[len("RESULT "):])
    for name in CASES:
        got = res["intensity"][name]
        assert abs(got - references[name]) < 0.02, (name, got, references[name])
    per_window = sorted(res["ms"])[len(res["ms"]) // 2]
    record_property("vm_ms_per_60s_window", per_window)
    print(f"jma_intensity in the MicroPython VM: {per_window} ms per 60 s x 3 axes at 100 Hz "
          f"(median of {len(res['ms'])}; {time.monotonic() - t0:.1f} s for the run)")
