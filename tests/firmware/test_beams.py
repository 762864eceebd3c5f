# Directional people counting (two break-beams or two PIR) against the
# simulated doorway driving real pin edges, in the VM.
import gc
import micropython
from array import array
from sim.clock import SimClock, TICKS_PERIOD
from sim.machine import Machine
from sim.devices.beams import BeamGate
from node.sensors.beams import BeamPair
from node.sampler import Sampler

PA = 4
PB = 13


def _rig(start_ms=0, **opts):
    c = SimClock(start_ms=start_ms)
    m = Machine(c)
    gate = BeamGate(m, PA, PB, c, active_low=opts.get("active_low", True))
    pins = {"a": m.Pin(PA, m.Pin.IN, m.Pin.PULL_UP), "b": m.Pin(PB, m.Pin.IN, m.Pin.PULL_UP)}
    drv = BeamPair(pins, c, opts)
    drv.begin()
    return c, m, gate, drv


def _read(drv):
    out = array("i", [-1, -1, -1, -1])
    ok = drv.read_into(out, 1)
    assert out[0] == -1  # nothing written outside its slots
    return ok, list(out[1:])


def test_interface():
    assert BeamPair.KIND == "beam_pair"
    assert BeamPair.CHANNELS == ("people_in", "people_out", "occupancy")
    assert BeamPair.SCALES == (1, 1, 1)
    assert BeamPair.COUNTERS == (True, True, False)
    c = SimClock()
    m = Machine(c)
    drv = BeamPair({"a": m.Pin(PA), "b": m.Pin(PB)}, c, {})
    assert drv.debounce_ms == 30 and drv.max_cross_ms == 1500 and drv.active_low
    assert drv.status == "warning" and not drv.read_into(array("i", [0, 0, 0]), 0)


def test_begin_without_both_pins_fails_with_a_reason():
    c = SimClock()
    m = Machine(c)
    drv = BeamPair({"a": m.Pin(PA)}, c, {})
    try:
        drv.begin()
    except Exception as e:
        assert "pins a" in str(e) and drv.status == "failed"
    else:
        raise AssertionError("begin() accepted a single pin")


def test_single_in_then_out():
    c, m, gate, drv = _rig()
    assert _read(drv) == (True, [0, 0, 0])
    gate.walk_in(100)
    c.advance(1000)
    assert _read(drv) == (True, [1, 0, 1])
    assert _read(drv) == (True, [0, 0, 1])  # counts are per read, occupancy stays
    gate.walk_out(100)
    c.advance(1000)
    assert _read(drv) == (True, [0, 1, 0])
    assert drv.entered == 1 and drv.left == 1 and drv.aborted == 0 and drv.clamped == 0
    assert drv.status == "ok" and drv.errors == 0


def test_wide_beams_released_before_the_second_is_broken():
    # beams further apart than a body: A clears 200 ms before B is broken
    c, m, gate, drv = _rig()
    gate.walk_in(100, speed_ms=600, block_ms=400)
    gate.walk_out(3000, speed_ms=600, block_ms=400)
    c.advance(1500)
    assert _read(drv) == (True, [1, 0, 1])
    c.advance(3000)
    assert _read(drv) == (True, [0, 1, 0])


def test_two_people_close_together_are_two_crossings():
    c, m, gate, drv = _rig()
    # the second breaks A before the first has reached B
    gate.walk_in(100, speed_ms=400, block_ms=200)  # A 100-300, B 500-700
    gate.walk_in(350, speed_ms=400, block_ms=200)  # A 350-550, B 750-950
    c.advance(2000)
    assert _read(drv) == (True, [2, 0, 2])
    # and two leaving the same way
    gate.walk_out(100, speed_ms=400, block_ms=200)
    gate.walk_out(350, speed_ms=400, block_ms=200)
    c.advance(2000)
    assert _read(drv) == (True, [0, 2, 0])
    assert drv.aborted == 0


def test_two_people_shoulder_to_shoulder_are_one_break():
    # the limit of two beams: bodies overlapping in both beams look like one person
    c, m, gate, drv = _rig()
    gate.walk_in(100)  # A 100-500, B 400-800
    gate.walk_in(300)  # A 300-700, B 600-1000: A is broken 100-700, B 400-1000
    c.advance(2000)
    assert _read(drv) == (True, [1, 0, 1])
    assert gate.edges == 8 and drv.aborted == 0


def test_two_people_passing_each_other_count_one_each_way():
    c, m, gate, drv = _rig()
    gate.walk_in(100, speed_ms=600, block_ms=200)  # A 100-300, B 700-900
    gate.walk_out(150, speed_ms=600, block_ms=200)  # B 150-350, A 750-950
    c.advance(2000)
    ok, v = _read(drv)
    assert ok and v[0] == 1 and v[1] == 1, v
    assert drv.aborted == 0


def test_aborted_crossing_is_not_counted():
    c, m, gate, drv = _rig()
    gate.abort(100, dwell_ms=300)  # A broken 100-400, nobody reaches B
    c.advance(1500)  # 1100 ms after A cleared: could still become a crossing
    assert _read(drv) == (True, [0, 0, 0]) and drv.aborted == 0
    c.advance(500)  # 1600 ms after: longer than max_cross_ms
    assert _read(drv) == (True, [0, 0, 0]) and drv.aborted == 1
    # someone inside looks out and turns back, then a real crossing
    gate.abort(100, dwell_ms=500, side="b")
    gate.walk_in(3000)
    c.advance(5000)
    assert _read(drv) == (True, [1, 0, 1])
    assert drv.aborted == 2 and drv.errors == 0


def test_max_cross_ms_is_an_option():
    c, m, gate, drv = _rig(max_cross_ms=400)
    gate.walk_in(100, speed_ms=900, block_ms=300)  # B broken 600 ms after A cleared
    c.advance(3000)
    assert _read(drv) == (True, [0, 0, 0])
    assert drv.aborted == 2  # the A start expired, then the lone B start


def test_contact_chatter_is_debounced():
    c, m, gate, drv = _rig()
    gate.walk_in(100, chatter=3)  # every edge bounces three times, 2 ms apart
    gate.bounce(2000, side="a")  # chatter with nobody there
    gate.bounce(2500, side="b", toggles=5)
    c.advance(4000)
    assert gate.edges > 20
    assert _read(drv) == (True, [1, 0, 1])
    c.advance(3000)
    assert _read(drv) == (True, [0, 0, 1])
    assert drv.aborted == 0  # the bounces never looked like a beam break


def test_a_break_longer_than_debounce_counts_as_a_break():
    c, m, gate, drv = _rig(debounce_ms=30)
    gate.bounce(100, side="a", toggles=2, gap_ms=50)  # A broken for 50 ms
    c.advance(3000)
    assert _read(drv) == (True, [0, 0, 0]) and drv.aborted == 1


def test_an_edge_still_settling_waits_for_the_next_read():
    c, m, gate, drv = _rig()
    gate.walk_in(100, speed_ms=300, block_ms=400)  # B broken at 400
    c.advance(410)  # B's edge is 10 ms old: not settled yet
    assert _read(drv) == (True, [0, 0, 0])
    c.advance(100)
    assert _read(drv) == (True, [1, 0, 1])


def test_occupancy_never_negative():
    c, m, gate, drv = _rig()
    for k in range(3):
        gate.walk_out(100 + 1000 * k)
    c.advance(4000)
    assert _read(drv) == (True, [0, 3, 0])
    assert drv.clamped == 3 and drv.left == 3
    gate.walk_in(100)
    c.advance(1000)
    assert _read(drv) == (True, [1, 0, 1])
    drv.reset_occupancy()
    assert _read(drv) == (True, [0, 0, 0])


def test_stuck_beam_is_a_warning_until_it_clears():
    c, m, gate, drv = _rig()
    gate.walk_in(100)
    gate.hold(2000, side="a")  # something blocks A from t=2 s
    c.advance(5000)
    assert _read(drv) == (True, [1, 0, 1]) and drv.status == "ok"
    c.advance(7500)  # A broken for 10.5 s
    assert _read(drv) == (False, [-1, -1, -1])
    assert drv.status == "warning" and drv.errors == 1
    c.advance(1000)
    assert not drv.read_into(array("i", [0, 0, 0]), 0)
    assert drv.errors == 1  # one error per stuck episode
    gate.release(0, side="a")
    c.advance(2000)
    assert _read(drv) == (True, [0, 0, 1]) and drv.status == "ok"
    gate.walk_out(100)
    c.advance(1000)
    assert _read(drv) == (True, [0, 1, 0])
    assert drv.aborted == 1  # the crossing the stuck beam had started


def test_counts_made_before_a_beam_sticks_are_not_lost():
    c, m, gate, drv = _rig()
    gate.walk_in(100)
    gate.hold(1000, side="b")
    c.advance(12000)
    assert not drv.read_into(array("i", [0, 0, 0]), 0)
    gate.release(0, side="b")
    c.advance(1000)
    assert _read(drv) == (True, [1, 0, 1])


def test_irq_handler_allocates_nothing():
    c, m, gate, drv = _rig()
    pa = m.pin(PA)
    pb = m.pin(PB)
    gc.collect()
    before = gc.mem_alloc()
    micropython.heap_lock()
    try:
        for _ in range(10):
            pa.drive(0)
            pb.drive(0)
            pa.drive(1)
            pb.drive(1)
    finally:
        micropython.heap_unlock()
    after = gc.mem_alloc()
    assert after - before == 0, after - before
    assert drv._ctl[0] == 40 and drv.lost == 0


def test_read_allocates_nothing():
    c, m, gate, drv = _rig()
    out = array("i", [0, 0, 0])
    gate.walk_in(100, chatter=2)
    gate.walk_in(1000, speed_ms=400, block_ms=200)
    gate.walk_out(2000)
    gate.abort(3000)
    c.advance(4000)  # all edges recorded, none processed yet
    assert drv._ctl[0] > 20
    gc.collect()
    before = gc.mem_alloc()
    micropython.heap_lock()
    try:
        ok = drv.read_into(out, 0)
    finally:
        micropython.heap_unlock()
    after = gc.mem_alloc()
    assert after - before == 0, after - before
    assert ok and list(out) == [2, 1, 1]
    c.advance(2000)
    gc.collect()
    before = gc.mem_alloc()
    ok = drv.read_into(out, 0)  # expiry of the aborted start
    assert gc.mem_alloc() - before == 0
    assert ok and drv.aborted == 1


def test_edge_ring_overflow_is_counted_never_a_crash():
    c, m, gate, drv = _rig()
    pa = m.pin(PA)
    micropython.heap_lock()  # the full-ring path allocates nothing either
    try:
        for _ in range(100):  # 200 edges with nobody reading
            pa.drive(0)
            pa.drive(1)
        pa.drive(0)  # and A ends up broken
    finally:
        micropython.heap_unlock()
    assert drv.lost > 0 or drv._ctl[2] > 0
    c.advance(100)
    ok, v = _read(drv)
    assert ok and drv.lost == 73 and drv.errors == 1 and drv.status == "warning"
    assert drv._on[0] == 1  # the beam state was taken from the pin again
    m.pin(PA).drive(1)
    c.advance(3000)
    assert _read(drv)[0] and drv.status == "ok" and drv.errors == 1
    gate.walk_in(100)
    c.advance(1000)
    assert _read(drv) == (True, [1, 0, 1])


def test_pir_mode_is_active_high():
    c, m, gate, drv = _rig(active_low=False)
    assert m.pin(PA).value() == 0  # idle PIR output is low
    gate.walk_in(100, speed_ms=800, block_ms=2000)  # PIR stay on for seconds
    c.advance(4000)
    assert _read(drv) == (True, [1, 0, 1])
    gate.walk_out(100, speed_ms=800, block_ms=2000)
    c.advance(4000)
    assert _read(drv) == (True, [0, 1, 0])
    gate.hold(0, side="a")
    c.advance(15000)  # a PIR on for 15 s is people moving about, not a fault
    assert _read(drv)[0] and drv.status == "ok"


def test_ticks_wrap_in_the_middle_of_a_crossing():
    c, m, gate, drv = _rig(start_ms=TICKS_PERIOD - 250)
    gate.walk_in(100)  # A at 2**30 - 150, B after the wrap
    c.advance(1000)
    assert _read(drv) == (True, [1, 0, 1])


def test_window_sums_through_the_sampler():
    c, m, gate, drv = _rig()
    s = Sampler([(drv, 1000)], 1000)
    for k in range(5):
        gate.walk_in(100 + 1000 * k)
    gate.walk_out(5100)
    for _ in range(8):
        c.advance(1000)
        s.step()
    agg, _ = s.close_window()
    assert agg["people_in"]["sum"] == 5 and agg["people_out"]["sum"] == 1, agg
    assert agg["occupancy"]["last"] == 4 and "sum" not in agg["occupancy"]
