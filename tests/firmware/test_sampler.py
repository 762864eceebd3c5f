# The sampling engine in the MicroPython VM: drift-free ticks, overruns,
# ring buffers, window aggregates, deadband, and no allocation per sample.
import gc
import random

from node.sampler import Sampler, Ticker
from sim.clock import SimClock


class Fake:
    KIND = "fake"
    CHANNELS = ("a_c", "b_pct")
    SCALES = (1, 10)

    def __init__(self):
        self.v = 0
        self.fail = False
        self.errors = 0
        self.status = "ok"

    def read_into(self, out, off):
        if self.fail:
            return False
        self.v += 1
        out[off] = self.v
        out[off + 1] = -self.v
        return True


def run_ticks(clock, t, n, jitter_max=0, step=None):
    for _ in range(n):
        w = t.wait_ms()
        if w > 0:
            clock.advance(w + (random.getrandbits(8) % (jitter_max + 1) if jitter_max else 0))
        t.mark()
        if step:
            step()


def test_no_drift_over_10000_ticks_with_jittery_wakeups():
    random.seed(7)
    c = SimClock(start_ms=1000)
    t = Ticker(c, 10)
    start = c.ticks_ms()
    run_ticks(c, t, 10000, jitter_max=4)
    elapsed = c.ticks_diff(c.ticks_ms(), start)
    # the 10000th tick is due at start + 10000 * 10 ms; jitter only delays it
    assert abs(elapsed - 100000) <= 10, elapsed
    assert t.overruns == 0
    assert t.lag_max <= 4


def test_naive_sleep_loop_would_drift():
    # the same jitter with "sleep(period)" accumulates: the test above can fail
    random.seed(7)
    c = SimClock(start_ms=1000)
    start = c.ticks_ms()
    for _ in range(10000):
        c.advance(10 + random.getrandbits(8) % 5)
    assert c.ticks_diff(c.ticks_ms(), start) - 100000 > 1000


def test_overrun_skips_missed_slots_and_keeps_phase():
    c = SimClock(start_ms=0)
    t = Ticker(c, 100)
    run_ticks(c, t, 3)
    assert c.ticks_ms() == 300
    c.advance(t.wait_ms() + 350)  # the loop was stuck for 3.5 periods
    lag = t.mark()
    assert lag == 350
    assert t.overruns == 3
    assert t.wait_ms() == 50  # next due at 800: still on the 100 ms grid
    s = t.stats()
    assert s["overruns"] == 3 and s["lag_max_ms"] == 350 and s["ticks"] == 4
    assert t.stats()["ticks"] == 0  # stats() resets


def test_ticks_wrap_around_is_seamless():
    period = 1 << 30
    c = SimClock(start_ms=period - 555)
    t = Ticker(c, 10)
    start = c.ticks_ms()
    run_ticks(c, t, 200)
    assert c.ticks_ms() < 2000  # wrapped
    assert c.ticks_diff(c.ticks_ms(), start) == 2000
    assert t.overruns == 0 and t.lag_max == 0


def test_ring_keeps_the_latest_samples_in_order():
    f = Fake()
    s = Sampler([(f, 100)], 100, ring_size=4)
    assert s.recent("a_c") == []
    s.step()
    s.step()
    assert s.recent("a_c") == [1.0, 2.0]
    for _ in range(8):
        s.step()
    assert s.recent("a_c") == [7.0, 8.0, 9.0, 10.0]
    assert s.recent("a_c", 2) == [9.0, 10.0]
    assert s.recent("b_pct", 1) == [-1.0]
    s.close_window()
    assert s.recent("a_c", 1) == [10.0]  # the ring outlives the window


def test_samples_fed_from_outside_step_share_the_bookkeeping():
    f = Fake()
    s = Sampler([(f, 100)], 100)
    for v in (5, -3, 9):
        s.add(0, v)
    agg, _ = s.close_window()
    assert agg["a_c"] == {"n": 3, "min": -3.0, "max": 9.0, "mean": 3.6667, "last": 9.0}, agg
    assert "b_pct" not in agg


def test_window_aggregates_per_channel():
    f = Fake()
    s = Sampler([(f, 100)], 100)
    for _ in range(5):
        s.step()
    agg, changed = s.close_window()
    assert changed
    assert agg["a_c"] == {"n": 5, "min": 1.0, "max": 5.0, "mean": 3.0, "last": 5.0}, agg
    assert agg["b_pct"] == {"n": 5, "min": -0.5, "max": -0.1, "mean": -0.3, "last": -0.5}, agg
    agg2, _ = s.close_window()
    assert agg2 == {}  # counters restart; an empty window reports nothing


def test_per_sensor_rates_from_a_common_base_tick():
    fast, slow = Fake(), Fake()
    slow.CHANNELS = ("c_c", "d_c")
    s = Sampler([(fast, 100), (slow, 500)], 100)
    for _ in range(10):
        s.step()
    agg, _ = s.close_window()
    assert agg["a_c"]["n"] == 10 and agg["c_c"]["n"] == 2


def test_failed_reads_are_counted_never_invented():
    f = Fake()
    s = Sampler([(f, 100)], 100)
    s.step()
    f.fail = True
    for _ in range(4):
        s.step()
    agg, _ = s.close_window()
    assert agg["a_c"]["n"] == 1
    assert s.failed_reads == 4
    f.fail = True
    s.step()
    assert s.close_window()[0] == {}


def test_deadband_reports_only_real_changes():
    class Level(Fake):
        CHANNELS = ("lvl_c", "x_pct")

        def read_into(self, out, off):
            out[off] = self.v
            out[off + 1] = 0
            return True

    f = Level()
    s = Sampler([(f, 100)], 100, deadbands={"lvl_c": 5, "x_pct": 1.0})
    f.v = 100
    s.step()
    agg, changed = s.close_window()
    assert changed  # nothing reported yet
    s.mark_reported(agg)
    f.v = 104
    s.step()
    assert s.close_window()[1] is False  # within the deadband of 5
    f.v = 106
    s.step()
    agg, changed = s.close_window()
    assert changed
    s.mark_reported(agg)
    f.v = 102
    s.step()
    assert s.close_window()[1] is False  # 4 below the last report


def test_hot_path_allocates_nothing_per_sample():
    c = SimClock(start_ms=0)
    f = Fake()
    s = Sampler([(f, 10)], 10)
    t = Ticker(c, 10)
    run_ticks(c, t, 50, step=s.step)  # warm up
    gc.collect()
    before = gc.mem_alloc()
    for _ in range(2000):
        w = t.wait_ms()
        if w > 0:
            c.advance(w)
        t.mark()
        s.step()
        s.add(1, 7)
    after = gc.mem_alloc()
    assert s.samples >= 6000
    assert after - before == 0, after - before


def test_a_channel_name_given_twice_is_qualified_with_the_kind():
    a, b, c = Fake(), Fake(), Fake()
    b.KIND = "other"
    c.KIND = "other"
    s = Sampler([(a, 100), (b, 100), (c, 100)], 100)
    assert s.names == ["a_c", "b_pct", "other_a_c", "other_b_pct", "other_a_c_2", "other_b_pct_2"]
    s.step()
    agg, _ = s.close_window()
    assert agg["other_a_c"]["n"] == 1 and agg["other_b_pct_2"]["last"] == -0.1
