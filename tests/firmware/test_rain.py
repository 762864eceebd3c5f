# Tipping-bucket rain gauge on a pin interrupt (simulated reed switch with
# chatter), in the VM.
import gc
from array import array
from sim.clock import SimClock
from sim.machine import Machine
from sim.devices.rain import RainGaugeDevice
from node.sensors import SensorError
from node.sensors.rain import RainGauge

PIN = 27


def _rig(**opts):
    c = SimClock()
    m = Machine(c)
    pin = m.Pin(PIN, m.Pin.IN, m.Pin.PULL_UP)  # as node/app.py sets up `pins`
    dev = RainGaugeDevice(m, PIN, mm_per_tip=opts.get("mm_per_tip", 0.5))
    drv = RainGauge({"tip": pin}, c, opts)
    drv.begin()
    return c, m, dev, drv


def _summary(drv):
    ch = drv.summary()["ch"]
    return ch["rain_10min_mm"]["last"], ch["rain_1h_mm"]["last"]


def test_interface():
    assert RainGauge.KIND == "rain_gauge"
    assert RainGauge.CHANNELS == ("rain_mm",) and RainGauge.SCALES == (10,)
    assert RainGauge.COUNTERS == (True,)


def test_one_tip_with_chatter_counts_once():
    c, m, dev, drv = _rig()
    out = array("i", [0])
    assert drv.read_into(out, 0) and out[0] == 0  # dry is a reading: 0 mm
    dev.tip()
    c.advance(200)
    assert drv.read_into(out, 0)
    assert out[0] == 5  # 0.5 mm in 0.1 mm
    assert drv.tips == 1 and drv.bounces == 3 and dev.tips_sent == 1
    assert drv.read_into(out, 0) and out[0] == 0
    assert drv.status == "ok" and drv.errors == 0


def test_chatter_is_real_without_debounce():
    c, m, dev, drv = _rig(debounce_ms=0)
    out = array("i", [0])
    dev.tip()
    c.advance(200)
    assert drv.read_into(out, 0) and drv.tips == 4 and out[0] == 20


def test_tips_close_together_are_separate_after_the_debounce():
    c, m, dev, drv = _rig()
    out = array("i", [0])
    dev.tip()
    c.advance(150)
    dev.tip()
    c.advance(150)
    assert drv.read_into(out, 0) and drv.tips == 2 and out[0] == 10


def test_rolling_10min_and_1h_sums():
    c, m, dev, drv = _rig()
    out = array("i", [0])
    c.advance(30000)  # tips half way through each minute
    dev.rain(30, 3600000)  # 30 mm/h: one 0.5 mm tip a minute for an hour
    total = 0
    for minute in range(60):
        c.advance(60000)
        assert drv.read_into(out, 0)
        total += out[0]
    assert total == 300 and drv.tips == 60 and dev.tips_sent == 60
    assert _summary(drv) == (5.0, 30.0)
    assert not drv.alert and drv.take_events() is None
    c.advance(10 * 60000)  # dry for ten minutes
    assert drv.read_into(out, 0) and out[0] == 0
    assert _summary(drv) == (0.0, 25.0)
    c.advance(50 * 60000)
    assert _summary(drv) == (0.0, 0.0)  # summary rolls the minutes by itself
    agg = drv.summary()["ch"]["rain_1h_mm"]
    assert agg == {"n": 1, "min": 0.0, "max": 0.0, "mean": 0.0, "last": 0.0}


def test_fractional_bucket_carries_into_later_reads():
    c, m, dev, drv = _rig(mm_per_tip=0.254)  # a 0.01 inch bucket
    out = array("i", [0])
    total = 0
    for _ in range(10):
        dev.tip()
        c.advance(1000)
        assert drv.read_into(out, 0)
        total += out[0]
    assert total == 25  # 2.54 mm: 2.5 reported, 0.04 mm carried
    assert _summary(drv) == (2.54, 2.54)


def test_heavy_rain_alert_and_events():
    c, m, dev, drv = _rig(alert_mm_h=50)
    out = array("i", [0])
    dev.rain(60, 90 * 60000)  # 60 mm/h: a tip every 30 s
    alert_at = None
    for s in range(0, 90 * 60, 10):
        c.advance(10000)
        drv.read_into(out, 0)
        if drv.alert and alert_at is None:
            alert_at = s + 10
    assert alert_at == 3000, alert_at  # the 100th tip (50 mm in the hour) at 50 min
    ev = drv.take_events()
    # the minute that just began and the nine before it: 19 tips
    assert ev == [("rain.heavy", "warning", {"rain_1h_mm": 50.0, "rain_10min_mm": 9.5, "alert_mm_h": 50})], ev
    ended = None
    for s in range(0, 60 * 60, 10):
        c.advance(10000)
        drv.read_into(out, 0)
        if not drv.alert and ended is None:
            ended = s
    assert ended is not None and not drv.alert
    ev = drv.take_events()
    assert len(ev) == 1 and ev[0][:2] == ("rain.heavy", "info") and ev[0][2]["rain_1h_mm"] < 45.0, ev


def test_missed_reads_lose_edges_only_beyond_the_ring():
    c, m, dev, drv = _rig(debounce_ms=0)
    out = array("i", [0])
    for _ in range(20):  # 80 edges into a 64-edge ring
        dev.tip()
        c.advance(100)
    assert drv.read_into(out, 0)
    assert drv.lost == 16 and drv.tips == 64 and drv.errors == 16


def test_long_gap_clears_old_minutes():
    c, m, dev, drv = _rig()
    out = array("i", [0])
    dev.tip()
    c.advance(1000)
    drv.read_into(out, 0)
    c.advance(3 * 3600000)
    assert drv.read_into(out, 0) and out[0] == 0
    assert _summary(drv) == (0.0, 0.0)


def test_needs_the_tip_pin():
    c = SimClock()
    try:
        RainGauge({}, c, {})
        raise AssertionError("no SensorError")
    except SensorError as e:
        assert "tip" in str(e)


def test_irq_path_allocates_nothing():
    c, m, dev, drv = _rig()
    line = m.pin(PIN)
    handler = drv.irq_handler()
    line.drive(0)  # warm up
    line.drive(None)
    gc.collect()
    a = gc.mem_alloc()
    handler(line)
    line.drive(0)  # the simulated pin fires the handler itself
    line.drive(None)
    line.drive(0)
    line.drive(None)
    b = gc.mem_alloc()
    assert b - a == 0, b - a
    assert (drv._wr[0] - drv._rd) == 4


def test_read_allocates_nothing():
    c, m, dev, drv = _rig()
    out = array("i", [0])
    dev.tip()
    c.advance(200)
    drv.read_into(out, 0)
    c.advance(61000)  # a new minute to roll into as well
    dev.tip()
    c.advance(200)
    gc.collect()
    a = gc.mem_alloc()
    ok = drv.read_into(out, 0)
    b = gc.mem_alloc()
    assert ok and out[0] == 5
    assert b - a == 0, b - a
