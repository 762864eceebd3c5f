"""Benchmarks. Each prints figures, JSON on its last line; none is a test.

    python -m tools.bench sampler [--samples N]
"""
from __future__ import annotations

import argparse
import json
import sys

from tools.mpvm import VMError, run_script

SAMPLER_SCRIPT = r"""
import gc, time
from array import array
from node.clock import Clock
from node.sampler import Sampler, Ticker
from sim.clock import SimClock
from sim.machine import Machine

N = %(samples)d


class ADCLevel:
    # one ADC channel, as a 4-20 mA level sensor reads it
    KIND = "adc"
    CHANNELS = ("level_counts",)
    SCALES = (1,)

    def __init__(self, adc):
        self.adc = adc
        self.errors = 0
        self.status = "ok"

    def read_into(self, out, off):
        out[off] = self.adc.read_u16()
        return True


clock = SimClock(start_ms=0)
m = Machine(clock)
m.adc_source(4, 31000)
adc = m.ADC(m.Pin(4))
drv = ADCLevel(adc)



def bare_loop():
    # the same channel read N times through the same driver, nothing else:
    # what a plain "while True: read" program would do
    out = array("i", [0])
    t0 = time.ticks_us()
    for _ in range(N):
        drv.read_into(out, 0)
    return time.ticks_diff(time.ticks_us(), t0)


# the engine: ticker bookkeeping + sampler step (read, ring, aggregates).
# The ticker runs on the board's own ticks (node.clock.Clock), flat out: the
# period is 1 ms and the loop never sleeps, so this is the engine's ceiling.
s = Sampler([(drv, 1)], 1)
t = Ticker(Clock(), 1)
for _ in range(100):  # warm up
    t.mark()
    s.step()
s.close_window()


def engine_loop():
    t0 = time.ticks_us()
    for _ in range(N):
        t.mark()
        s.step()
    return time.ticks_diff(time.ticks_us(), t0)


# best of 3 of each, interleaved, so a busy host skews both alike
bare_us = eng_us = 1 << 29
a0 = 0  # every global exists before measuring: a new global grows the dict
alloc = 0
for _ in range(3):
    gc.collect()
    bare_us = min(bare_us, bare_loop())
    gc.collect()
    a0 = gc.mem_alloc()
    eng_us = min(eng_us, engine_loop())
    alloc += gc.mem_alloc() - a0
    agg, _ = s.close_window()
    assert agg["level_counts"]["n"] == N
print("@@" + str(3 * N) + " " + str(alloc) + " " + str(eng_us * 3) + " " + str(bare_us * 3))
"""


def bench_sampler(samples: int = 20000) -> dict:
    """Run the sampling engine in the MicroPython VM against a simulated ADC
    channel and compare with a bare loop reading the same channel."""
    out = run_script(SAMPLER_SCRIPT % {"samples": samples})
    line = [l for l in out.splitlines() if l.startswith("@@")][-1]
    n, alloc, eng_us, bare_us = (int(x) for x in line[2:].split())
    eng_rate = n / (eng_us / 1e6)
    bare_rate = n / (bare_us / 1e6)
    return {"runtime": "micropython", "samples": n,
            "alloc_bytes_per_sample": alloc / n,
            "samples_per_s": round(eng_rate),
            "bare_loop_samples_per_s": round(bare_rate),
            "overhead_ratio": round(bare_rate / eng_rate, 2)}


COMMANDS = {
    "sampler": (bench_sampler, "sampling engine in the MicroPython VM"),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tools.bench", description="benchmarks; JSON on the last line")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("sampler", help=COMMANDS["sampler"][1])
    sp.add_argument("--samples", type=int, default=20000)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "sampler":
            if args.samples < 100:
                ap.error("--samples must be at least 100")
            result = bench_sampler(args.samples)
    except VMError as exc:
        print(f"tools.bench: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
