"""Benchmarks. Each prints figures, JSON on its last line; none is a test.

    python -m tools.bench sampler [--samples N]
    python -m tools.bench sensors [--reads N]
    python -m tools.bench relay [--seconds S] [--nodes N] [--workers W]   (tools/bench_relay.py)
    python -m tools.bench ota [--nodes N]                                   (tools/bench_ota.py)
"""
from __future__ import annotations

import argparse
import json
import sys

from fleet.mosquitto import BrokerError
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


SENSORS_SCRIPT = r"""
import gc, math, time
from array import array
from node.sensors.ev import CTClamp
from node.sensors.seismic import ADXL345, jma_intensity
from sim.clock import SimClock
from sim.devices.adxl345 import ADXL345Device, sine
from sim.devices.evse import EVSE
from sim.machine import Machine

READS = %(reads)d
out = array("i", [0, 0, 0, 0])
a0 = t0 = 0  # every global exists before measuring

# EV: the CT clamp burst (4 kHz, 10 whole 50 Hz cycles = 800 samples a read)
c = SimClock()
m = Machine(c)
evse = EVSE(m, c, 34, 35)
evse.plug()
evse.charge(16.0)
ct = CTClamp(m.ADC(m.Pin(35)), c, {"amps_per_count": 0.0025, "burst_hz": 4000, "cycles": 10})
ct.begin()
for _ in range(3):
    ct.read_into(out, 0)
ct_us = ct_alloc = ct_virtual_us = v0 = 0
for _ in range(READS):
    gc.collect()
    a0 = gc.mem_alloc()
    v0 = c.ticks_us()
    t0 = time.ticks_us()
    ct.read_into(out, 0)
    ct_us += time.ticks_diff(time.ticks_us(), t0)
    ct_virtual_us += c.ticks_diff(c.ticks_us(), v0)
    ct_alloc += gc.mem_alloc() - a0
ct_n = READS * 800
ct_amps = out[0] / 100

# seismic: ADXL345 FIFO drained every 250 ms (25 samples x 3 axes a read)
c2 = SimClock()
m2 = Machine(c2)
m2.i2c_bus(0).attach(0x53, ADXL345Device(c2, sine(3.0, 2.0), noise_lsb=0))
acc = ADXL345(m2.I2C(0), c2, {})
acc.begin()
for _ in range(8):
    c2.advance(250)
    acc.read_into(out, 0)
n0 = acc.samples
acc_us = 0
acc_alloc = 0
for _ in range(READS):
    c2.advance(250)  # the part fills its FIFO: not the driver's time
    gc.collect()
    a0 = gc.mem_alloc()
    t0 = time.ticks_us()
    acc.read_into(out, 0)
    acc_us += time.ticks_diff(time.ticks_us(), t0)
    acc_alloc += gc.mem_alloc() - a0
acc_n = acc.samples - n0

# one JMA intensity over a 60 s window at 100 Hz, three axes
N = 6000
ax = [80.0 * math.sin(2 * math.pi * 2.0 * i / 100) for i in range(N)]
ay = [40.0 * math.sin(2 * math.pi * 1.3 * i / 100) for i in range(N)]
az = [10.0 * math.sin(2 * math.pi * 3.1 * i / 100) for i in range(N)]
gc.collect()
t0 = time.ticks_ms()
inten = jma_intensity(ax, ay, az, 100)
jma_ms = time.ticks_diff(time.ticks_ms(), t0)
print("@@%%d %%d %%d %%d %%d %%d %%d %%s %%s %%d" %% (ct_n, ct_us, ct_alloc, acc_n, acc_us, acc_alloc, jma_ms, ct_amps, inten, ct_virtual_us))
"""


def bench_sensors(reads: int = 50) -> dict:
    """The EV CT burst and the accelerometer FIFO path in the MicroPython
    VM: samples per second and allocation per sample of the driver with its
    simulated bus and part; and the time of one JMA intensity over 60 s."""
    out = run_script(SENSORS_SCRIPT % {"reads": reads})
    line = [l for l in out.splitlines() if l.startswith("@@")][-1]
    f = line[2:].split()
    ct_n, ct_us, ct_alloc, acc_n, acc_us, acc_alloc, jma_ms = (int(x) for x in f[:7])
    return {"runtime": "micropython",
            # the burst is paced by the board's microsecond ticks: its rate is
            # measured on the simulated clock; the VM's own time per sample
            # includes the spinning between samples, as on a board
            "ct_burst": {"samples": ct_n, "samples_per_s": round(ct_n / (int(f[9]) / 1e6)),
                         "vm_us_per_sample": round(ct_us / ct_n, 1),
                         "alloc_bytes_per_sample": ct_alloc / ct_n, "rms_a": float(f[7])},
            "accel_fifo": {"samples": acc_n, "samples_per_s": round(acc_n / (acc_us / 1e6)),
                           "alloc_bytes_per_sample": acc_alloc / acc_n},
            "jma_intensity_60s_ms": jma_ms, "jma_intensity": round(float(f[8]), 3)}


COMMANDS = {
    "sampler": (bench_sampler, "sampling engine in the MicroPython VM"),
    "sensors": (bench_sensors, "EV CT burst, accelerometer FIFO and JMA intensity in the VM"),
    "relay": (None, "the fleet's relay (store + deliver upstream) against a bare subscriber, real brokers"),
    "ota": (None, "a rollout in waves to many virtual nodes with faults injected"),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tools.bench", description="benchmarks; JSON on the last line")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("sampler", help=COMMANDS["sampler"][1])
    sp.add_argument("--samples", type=int, default=20000)
    sp = sub.add_parser("sensors", help=COMMANDS["sensors"][1])
    sp.add_argument("--reads", type=int, default=50, help="driver reads to time (default 50)")
    sp = sub.add_parser("relay", help=COMMANDS["relay"][1])
    sp.add_argument("--seconds", type=float, default=10.0, help="how long to publish (default 10)")
    sp.add_argument("--nodes", type=int, default=200, help="simulated node ids (default 200)")
    sp.add_argument("--workers", type=int, default=1, help="fleet serve processes in a share group (default 1)")
    sp = sub.add_parser("ota", help=COMMANDS["ota"][1])
    sp.add_argument("--nodes", type=int, default=100, help="virtual nodes (default 100)")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "ota":
            if args.nodes < 10:
                ap.error("--nodes must be at least 10")
            from tools.bench_ota import run as run_ota
            result = run_ota(args.nodes)
        elif args.cmd == "relay":
            if args.seconds <= 0 or args.nodes < 1 or args.workers < 1:
                ap.error("--seconds must be positive, --nodes and --workers at least 1")
            from tools.bench_relay import run
            result = run(args.seconds, args.nodes, args.workers)
        elif args.cmd == "sampler":
            if args.samples < 100:
                ap.error("--samples must be at least 100")
            result = bench_sampler(args.samples)
        else:
            if args.reads < 1:
                ap.error("--reads must be at least 1")
            result = bench_sensors(args.reads)
    except (VMError, RuntimeError, OSError, BrokerError) as exc:
        print(f"tools.bench: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
