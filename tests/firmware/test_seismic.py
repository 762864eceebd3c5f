# ADXL345 read from its FIFO (simulated part at register level), the fast
# earthquake trigger, and the JMA intensity functions, in the VM.
# The known-answer tests against numpy are in tests/test_seismic_reference.py.
import gc
import math
from array import array
from sim.clock import SimClock
from sim.machine import Machine
from sim.devices.adxl345 import ADXL345Device, sine, BW_RATE, POWER_CTL, DATA_FORMAT, FIFO_CTL
from node.sensors import SensorError
from node.sensors.seismic import ADXL345, SCALES_JMA, jma_intensity, jma_gain, jma_published, jma_scale, pga

GPL = 980.665 / 256  # gal per LSB at full resolution


def _rig(wave=None, address=0x53, noise_lsb=0, **opts):
    c = SimClock()
    m = Machine(c)
    dev = m.i2c_bus(0).attach(address, ADXL345Device(c, wave, noise_lsb=noise_lsb))
    if address != 0x53:
        opts["address"] = address
    drv = ADXL345(m.I2C(0, scl=m.Pin(22), sda=m.Pin(21)), c, opts)
    drv.begin()
    return c, m, dev, drv


def _quake(amp, freq, t0, dur, ky=0.5, kz=0.0):
    # a sine burst on x, scaled on y and z
    def wave(t):
        if t0 <= t < t0 + dur:
            v = amp * math.sin(2 * math.pi * freq * (t - t0))
            return (v, ky * v, kz * v)
        return (0.0, 0.0, 0.0)
    return wave


def _run(c, drv, seconds, every_ms=200, out=None):
    out = out or array("i", [0])
    events = []
    for _ in range(seconds * 1000 // every_ms):
        c.advance(every_ms)
        drv.read_into(out, 0)
        ev = drv.take_events()
        if ev:
            events.extend(ev)
    return events


def test_interface():
    assert ADXL345.KIND == "adxl345"
    assert ADXL345.CHANNELS == ("accel_gal",) and ADXL345.SCALES == (100,)


def test_begin_sets_rate_format_fifo_and_measure():
    c, m, dev, drv = _rig()
    r = dev.regs
    assert r[BW_RATE] == 0x0A  # 100 Hz
    assert r[DATA_FORMAT] == 0x0B  # full resolution (3.9 mg/LSB), +-16 g
    assert r[FIFO_CTL] >> 6 == 2  # stream
    assert r[POWER_CTL] & 0x08
    assert drv.status == "ok"


def test_wrong_part_and_missing_part_fail_with_reason():
    c = SimClock()
    m = Machine(c)
    m.i2c_bus(0).attach(0x53, ADXL345Device(c, devid=0xE6))
    drv = ADXL345(m.I2C(0), c, {})
    try:
        drv.begin()
        raise AssertionError("no SensorError")
    except SensorError as e:
        assert str(e) == "adxl345 at 0x53: device id 0xe6, expected 0xe5", str(e)
    assert drv.status == "failed"
    drv = ADXL345(m.I2C(0), c, {"address": 0x1D})
    try:
        drv.begin()
        raise AssertionError("no SensorError")
    except SensorError as e:
        assert str(e) == "adxl345 at 0x1d: no answer (OSError 19)", str(e)


def test_fifo_drained_at_100hz_on_the_alternate_address():
    c, m, dev, drv = _rig(sine(20.0, 1.0), address=0x1D)
    out = array("i", [0])
    assert not drv.read_into(out, 0)  # nothing measured yet
    c.advance(200)
    assert drv.read_into(out, 0)
    assert drv.samples == 20 and dev.fifo_entries() == 0
    c.advance(10000)
    assert drv.read_into(out, 0)  # 1000 samples waited: only the FIFO's 32 are left
    assert drv.overruns == 1 and drv.status == "warning" and dev.overflows == 1000 - 32
    for _ in range(50):
        c.advance(200)
        assert drv.read_into(out, 0)
    assert drv.samples == 20 + 32 + 1000 and drv.overruns == 1 and drv.status == "ok"
    # raw counts: gravity on z (256 LSB/g), the sine on x
    w = drv._w - 1
    assert abs(drv._z[w] - 256) <= 1
    assert max(drv._x) == 5 and min(drv._x) == -5  # 20 gal = 5.2 LSB


def test_accel_channel_and_pga():
    c, m, dev, drv = _rig(_quake(50.0, 2.0, 0.0, 100.0, ky=0.0))
    out = array("i", [0])
    _run(c, drv, 8, out=out)  # the gravity baseline settles
    drv.summary()
    peaks = []
    for _ in range(10):
        c.advance(300)
        assert drv.read_into(out, 0)
        peaks.append(out[0])
    assert min(peaks) >= 4600 and max(peaks) <= 5400, peaks  # 50 gal, 3.83 gal steps
    s = drv.summary()["ch"]
    assert abs(s["pga_gal"]["max"] - 50) <= 4, s
    assert pga([3.0, 0.0], [4.0, 0.0], [0.0, 12.0]) == 12.0
    assert pga([3.0], [4.0], [0.0]) == 5.0


def test_quiet_ground_no_event_no_alert():
    c, m, dev, drv = _rig(noise_lsb=1)
    events = _run(c, drv, 30)
    assert events == [] and not drv.alert
    s = drv.summary()["ch"]
    assert s["intensity"]["n"] == 1 and s["intensity"]["last"] < 2.5  # the part's noise floor
    assert drv.overruns == 0 and drv.errors == 0


def test_earthquake_event_alert_and_fall_back():
    # 60 gal on x and 30 gal on y at 2 Hz for 10 s after 20 s of quiet:
    # a = 0.697 * 67.1 gal, I = 2 log10(a) + 0.94 = 4.28 (震度4)
    c, m, dev, drv = _rig(_quake(60.0, 2.0, 20.0, 10.0))
    events = _run(c, drv, 20)
    assert events == [] and not drv.alert
    alert_from = alert_to = None
    for k in range(125):  # 25 s in 200 ms reads
        c.advance(200)
        drv.read_into(array("i", [0]), 0)
        ev = drv.take_events()
        if ev:
            events.extend(ev)
        if drv.alert and alert_from is None:
            alert_from = k
        if alert_from is not None and not drv.alert and alert_to is None:
            alert_to = k
    assert len(events) == 1, events
    name, sev, data = events[0]
    assert name == "earthquake" and sev == "warning"
    assert data["scale"] == "4" and 3.5 <= data["intensity"] < 4.5, data
    assert abs(data["pga_gal"] - 67.1) <= 5, data
    assert alert_from is not None and alert_from <= 5  # within a second of the onset
    assert alert_to is not None and 97 <= alert_to <= 102, alert_to  # when the last 10 s are quiet
    assert abs(drv.summary()["ch"]["intensity"]["last"] - 4.28) <= 0.05


def test_strong_quake_is_critical_and_scale_rises_are_reported():
    # 300 gal + 150 gal at 2 Hz: I = 2 log10(0.697 * 335) + 0.94 = 5.68 (6弱)
    c, m, dev, drv = _rig(_quake(300.0, 2.0, 12.0, 8.0))
    events = _run(c, drv, 32)
    assert events, events
    assert events[-1][0] == "earthquake" and events[-1][1] == "critical"
    assert events[-1][2]["scale"] == "6-", events
    idx = [SCALES_JMA.index(e[2]["scale"]) for e in events]
    assert idx == sorted(idx) and len(set(idx)) == len(idx), events  # one event per new scale
    for e, i in zip(events, idx):
        assert e[1] == ("critical" if i >= SCALES_JMA.index("5+") else "warning"), e
    assert abs(events[-1][2]["intensity"] - 5.68) <= 0.05
    assert not drv.alert  # 12 s after the shaking stopped


def test_summary_intensity_matches_the_waveform():
    # three components, several frequencies: the driver's intensity from raw
    # counts (3.83 gal steps, gravity on z) against the exact waveform in gal
    def wave(t):
        return (80 * math.sin(2 * math.pi * 1.3 * t) + 30 * math.sin(2 * math.pi * 4.1 * t + 1),
                60 * math.sin(2 * math.pi * 0.8 * t + 2),
                40 * math.sin(2 * math.pi * 2.7 * t))

    c, m, dev, drv = _rig(wave, window_s=30, trigger_gal=10000)
    _run(c, drv, 30)
    s = drv.summary()["ch"]
    n = 3000
    ts = [(k + 1) / 100 for k in range(n)]  # the part's sample times
    xs, ys, zs = [], [], []
    for t in ts:
        x, y, z = wave(t)
        xs.append(x)
        ys.append(y)
        zs.append(z)
    want = jma_intensity(xs, ys, zs, 100)
    assert abs(s["intensity"]["last"] - want) <= 0.02, (s, want)
    assert drv.late == 0


def test_fifo_drained_while_a_window_is_computed():
    # On the board the 60 s computation takes seconds: the JMA code calls back
    # between stages and the driver drains the FIFO into the ring's margin.
    c, m, dev, drv = _rig(_quake(100.0, 1.5, 0.0, 1000.0), trigger_gal=10000)
    _run(c, drv, 60)
    quiet = drv.summary()["ch"]["intensity"]["last"]
    polls = [0]

    def slow_poll(ms):
        def poll():
            polls[0] += 1
            c.advance(ms)  # time passes while the node computes
            drv._drain_quiet()
        return poll

    before = drv.overruns
    drv._poll = slow_poll(100)  # 10 samples per stage: the FIFO keeps up
    s = drv.summary()["ch"]
    assert polls[0] >= 40, polls
    assert drv.overruns == before and drv.late == 0
    assert abs(s["intensity"]["last"] - quiet) <= 0.01, (s, quiet)  # the same 60 s
    drv._poll = slow_poll(400)  # 40 per stage: FIFO overruns, margin overrun
    drv.summary()
    assert drv.overruns > before and drv.late == 1


def test_read_allocates_nothing():
    c, m, dev, drv = _rig(sine(3.0, 2.0), noise_lsb=0)  # below the trigger
    out = array("i", [0])
    _run(c, drv, 2)
    c.advance(300)  # 30 samples waiting
    gc.collect()
    a = gc.mem_alloc()
    ok = drv.read_into(out, 0)
    b = gc.mem_alloc()
    assert ok and drv.samples == 230
    assert b - a == 0, b - a  # driver, sim bus and sim part together: 30 samples, 31 transactions


def test_window_option_sizes_the_rings():
    c, m, dev, drv = _rig(window_s=20)
    assert len(drv._x) == (20 + 10) * 100
    assert drv._jma.size == 2048
    try:
        ADXL345(m.I2C(0), c, {"window_s": 0})
        raise AssertionError("no SensorError")
    except SensorError as e:
        assert "window_s" in str(e)


def test_published_value_and_scale():
    assert jma_published(4.449) == 4.4
    assert jma_published(4.4951) == 4.5  # rounded to 4.50 first, then cut
    assert jma_published(4.4949) == 4.4
    cases = ((-1.0, "0"), (0.49, "0"), (0.5, "1"), (1.5, "2"), (2.5, "3"), (3.4949, "3"), (3.4951, "4"),
             (4.5, "5-"), (4.99, "5-"), (5.0, "5+"), (5.5, "6-"), (6.0, "6+"), (6.5, "7"), (7.3, "7"))
    for i, want in cases:
        assert jma_scale(i) == want, (i, jma_scale(i), want)
    assert jma_scale(-math.inf) == "0"


def test_intensity_textbook_relation_in_the_vm():
    # a 1 Hz sine of amplitude A on one axis: a = A * gain(1 Hz)
    n = 6000
    z = [0.0] * n
    for amp in (10.0, 100.0):
        x = [amp * math.sin(2 * math.pi * k / 100) for k in range(n)]
        i = jma_intensity(x, z, z, 100)
        assert abs(i - (2 * math.log10(amp * jma_gain(1.0)) + 0.94)) < 0.01, (amp, i)
    assert jma_intensity(z, z, z, 100) == -math.inf
    assert jma_intensity([1.0] * 20, [0.0] * 20, [0.0] * 20, 100) == -math.inf  # shorter than 0.3 s
