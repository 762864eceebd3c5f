# River stages and the two river level drivers (ultrasonic ranger over UART
# frames, 4-20 mA transducer through the ADC), in the VM.
import gc
from array import array
from sim.clock import SimClock
from sim.machine import Machine
from sim.devices.ranger import RangerDevice, frame
from node.sensors import SensorError
from node.sensors.river import Stages, A02YYUW, Level420, STAGE_NAMES

STAGES = {"standby": 2.5, "caution": 3.0, "evacuation": 3.5, "danger": 4.0}


def _raises(fn, *args):
    try:
        fn(*args)
    except SensorError as e:
        return str(e)
    raise AssertionError("no SensorError")


def test_interface():
    assert A02YYUW.KIND == "a02yyuw"
    assert A02YYUW.CHANNELS == ("level_m", "distance_mm") and A02YYUW.SCALES == (1000, 1)
    assert Level420.KIND == "level_4_20ma"
    assert Level420.CHANNELS == ("level_m",) and Level420.SCALES == (1000,)
    assert STAGE_NAMES == ("normal", "standby", "caution", "evacuation", "danger")


def test_stages_rise_at_threshold_and_fall_below_hysteresis():
    s = Stages(STAGES, 0.05)
    assert s.stage == 0 and s.name == "normal"
    assert s.update(2.0) is None
    assert s.update(2.499) is None
    assert s.update(2.5) == (0, 1)  # rising: at the threshold
    assert s.update(2.46) is None  # falling: not yet below 2.45
    assert s.update(2.451) is None
    assert s.update(2.449) == (1, 0)
    assert s.update(3.7) == (0, 3)  # a jump crosses several stages in one change
    assert s.name == "evacuation"
    assert s.update(4.2) == (3, 4)
    assert s.update(3.96) is None
    assert s.update(3.949) == (4, 3)
    assert s.update(1.0) == (3, 0)  # a fast fall, one change
    assert s.update_mm(3000) == (0, 2)
    assert s.update_mm(2951) is None and s.update_mm(2949) == (2, 1)


def test_noise_around_a_threshold_does_not_flap():
    s = Stages(STAGES, 0.05)
    assert s.update(2.8) == (0, 1)
    seed = 7
    changes = []
    for i in range(2000):
        seed = (seed * 1103515245 + 12345) & 0x7FFFFFFF
        noise = (seed >> 8) % 61 - 30  # +-30 mm of waves around 3.00 m
        c = s.update_mm(3000 + noise)
        if c:
            changes.append(c)
    assert changes == [(1, 2)], changes  # in once, never out: 30 mm < 50 mm hysteresis


def test_stages_checked_and_partial_sets():
    assert "must be above" in _raises(Stages, {"standby": 3.0, "caution": 2.0}, 0.05)
    assert "unknown river stage" in _raises(Stages, {"flood": 3.0}, 0.05)
    assert "four thresholds" in _raises(Stages, (1.0, 2.0), 0.05)
    assert "hysteresis" in _raises(Stages, STAGES, -0.1)
    s = Stages((1.0, 2.0, 3.0, 4.0), 0.1)
    assert s.update(3.5) == (0, 3)
    s = Stages({"caution": 3.0, "danger": 5.0}, 0.05)  # a river without standby/evacuation levels
    assert s.threshold_mm(1) is None and s.threshold_mm(2) == 3000
    assert s.update(4.0) == (0, 2)
    assert s.update(5.0) == (2, 4)
    assert s.update(4.96) is None
    assert s.update(4.94) == (4, 2)
    assert s.update(2.9) == (2, 0)


def test_stage_update_allocates_nothing_without_a_change():
    s = Stages(STAGES, 0.05)
    s.update_mm(3100)
    gc.collect()
    a = gc.mem_alloc()
    for v in (3050, 2990, 2960, 3400):
        s.update_mm(v)
    b = gc.mem_alloc()
    assert b - a == 0, b - a


# -- A02YYUW over UART frames
def _ranger(distance_mm=3000, **opts):
    c = SimClock()
    m = Machine(c)
    uart = m.UART(2, baudrate=9600, tx=17, rx=16)
    dev = m.uart_port(2).attach(RangerDevice(c, distance_mm))
    o = {"mount_m": 5.0, "stages": STAGES}
    o.update(opts)
    drv = A02YYUW(uart, c, o)
    drv.begin()
    return c, m, dev, drv


def test_ranger_frame_layout():
    assert frame(1500) == b"\xff\x05\xdc\xe0"  # 0x05DC = 1500, (0xFF + 0x05 + 0xDC) & 0xFF = 0xE0
    assert frame(255) == b"\xff\x00\xff\xfe"


def test_ranger_level_is_mount_minus_distance():
    c, m, dev, drv = _ranger(3000)
    out = array("i", [0, 0, 0])
    assert not drv.read_into(out, 1)  # nothing sent yet
    c.advance(1000)  # ten frames at ~10 Hz
    assert drv.read_into(out, 1)
    assert list(out) == [0, 2000, 3000]
    assert drv.frames == 10 and drv.errors == 0 and drv.status == "ok"
    assert drv.stage == "normal" and not drv.alert and drv.take_events() is None
    dev.set(255)  # a low byte of 0xFF inside the frame
    c.advance(1000)
    assert drv.read_into(out, 1) and out[2] == 255 and out[1] == 4745
    assert drv.bad_frames == 0


def test_ranger_stage_events_and_alert():
    c, m, dev, drv = _ranger(3000)
    out = array("i", [0, 0])
    levels = []
    for dist in (2450, 2000, 1400, 900, 1100, 1950, 2600):
        dev.set(dist)
        c.advance(1000)
        assert drv.read_into(out, 0)
        levels.append((out[0], drv.stage, drv.alert))
    assert levels == [(2550, "standby", False), (3000, "caution", True), (3600, "evacuation", True),
                      (4100, "danger", True), (3900, "evacuation", True), (3050, "caution", True),
                      (2400, "normal", False)], levels
    ev = drv.take_events()
    assert ev == [
        ("river.stage", "warning", {"stage": "standby", "from": "normal", "level_m": 2.55}),
        ("river.stage", "warning", {"stage": "caution", "from": "standby", "level_m": 3.0}),
        ("river.stage", "critical", {"stage": "evacuation", "from": "caution", "level_m": 3.6}),
        ("river.stage", "critical", {"stage": "danger", "from": "evacuation", "level_m": 4.1}),
        ("river.stage", "info", {"stage": "evacuation", "from": "danger", "level_m": 3.9}),
        ("river.stage", "info", {"stage": "caution", "from": "evacuation", "level_m": 3.05}),
        ("river.stage", "info", {"stage": "normal", "from": "caution", "level_m": 2.4}),
    ], ev
    assert drv.take_events() is None


def test_ranger_one_stray_echo_does_not_raise_a_stage():
    c, m, dev, drv = _ranger(3000)
    out = array("i", [0, 0])
    c.advance(1000)
    assert drv.read_into(out, 0)
    dev.spike(200)  # an echo off a bird: level 4.8 m for one frame
    c.advance(300)
    assert drv.read_into(out, 0)
    assert out[0] == 2000 and drv.stage == "normal" and drv.take_events() is None


def test_ranger_bad_checksum_counted_and_skipped():
    c, m, dev, drv = _ranger(1900)
    out = array("i", [0, 0])
    dev.corrupt_checksum()
    c.advance(100)  # just the bad frame
    assert not drv.read_into(out, 0)
    assert drv.bad_frames == 1 and drv.errors == 1 and drv.status == "warning"
    assert list(out) == [0, 0] and drv.stage == "normal"
    c.advance(100)
    assert drv.read_into(out, 0) and list(out) == [3100, 1900]
    assert drv.status == "ok" and drv.bad_frames == 1


def test_ranger_garbage_between_frames_is_skipped():
    c, m, dev, drv = _ranger(3000)
    out = array("i", [0, 0])
    dev.inject_garbage(b"\x00\x13\xff\x12\x42")  # a false header: one bad frame, then resync
    c.advance(100)
    assert drv.read_into(out, 0) and list(out) == [2000, 3000]
    assert drv.frames == 1 and drv.bad_frames == 1 and drv.skipped >= 3
    # the port fed byte by byte, split anywhere
    port = m.uart_port(2)
    port.detach()
    f = frame(2500) + b"\xff\xff" + frame(2500)
    for i in range(len(f)):
        port.feed(f[i:i + 1])
        drv.read_into(out, 0)
    assert list(out) == [2500, 2500] and drv.frames == 3


def test_ranger_out_of_range_counted_not_reported():
    c, m, dev, drv = _ranger(3000)
    out = array("i", [0, 0])
    c.advance(1000)
    assert drv.read_into(out, 0)
    for bad in (20, 4600, 0xFFFE):  # blind zone, beyond range, no echo
        dev.set(bad)
        c.advance(1000)
        assert not drv.read_into(out, 0), bad
        assert drv.status == "warning"
        assert list(out) == [2000, 3000]
    assert drv.out_of_range == 30 and drv.errors == 30 and drv.bad_frames == 0
    assert drv.stage == "normal"
    dev.set(30)  # the edge of the blind zone is a reading
    c.advance(1000)
    assert drv.read_into(out, 0) and out[1] == 30


def test_ranger_silent_part_is_a_warning():
    c, m, dev, drv = _ranger(3000)
    out = array("i", [0, 0])
    c.advance(1000)
    assert drv.read_into(out, 0)
    dev.silence()
    c.advance(1000)
    assert not drv.read_into(out, 0) and drv.status == "ok"
    c.advance(2000)
    assert not drv.read_into(out, 0) and drv.status == "warning" and drv.errors == 1
    c.advance(2000)
    assert not drv.read_into(out, 0) and drv.errors == 1  # counted once per outage
    dev.silence(False)
    c.advance(1000)
    assert drv.read_into(out, 0) and drv.status == "ok"


def test_ranger_options_checked():
    c = SimClock()
    m = Machine(c)
    assert "mount_m" in _raises(A02YYUW, m.UART(2), c, {})
    assert "must be above" in _raises(A02YYUW, m.UART(2), c, {"mount_m": 5, "stages": {"caution": 3, "danger": 2}})


def test_ranger_read_allocates_nothing():
    c, m, dev, drv = _ranger(2000)  # caution: the stage is set, no change follows
    out = array("i", [0, 0])
    c.advance(1000)
    drv.read_into(out, 0)
    drv.take_events()
    c.advance(500)
    gc.collect()
    a = gc.mem_alloc()
    ok = drv.read_into(out, 0)
    b = gc.mem_alloc()
    assert ok and drv.alert
    assert b - a == 0, b - a  # driver, sim UART and sim part together


# -- 4-20 mA transducer: shunt voltage on the ADC
_FS_UV = 2450000  # the simulated ESP32 ADC at 11 dB


def _counts(ma, shunt=100):
    return int(ma * shunt * 1000 / _FS_UV * 65535 + 0.5)


def _loop(ma=4.0, **opts):
    c = SimClock()
    m = Machine(c)
    adc = m.ADC(m.Pin(34))
    o = {"range_m": 10.0, "datum_m": 1.0, "stages": STAGES}
    o.update(opts)
    drv = Level420(adc, c, o)
    m.adc_source(34, _counts(ma, o.get("shunt_ohm", 100)))
    drv.begin()
    return c, m, drv


def test_420_conversion():
    c, m, drv = _loop()
    assert drv._adc._atten == 3  # 11 dB selected by begin()
    out = array("i", [0])
    for ma, mm in ((4.0, 1000), (8.0, 3500), (12.0, 6000), (20.0, 11000), (3.9, 937), (20.4, 11250)):
        m.adc_source(34, _counts(ma))
        assert drv.read_into(out, 0), ma
        assert abs(out[0] - mm) <= 2, (ma, out[0], mm)
        assert abs(drv.current_ua - ma * 1000) <= 2
    assert drv.errors == 0 and drv.status == "ok"


def test_420_broken_wire_and_short_are_faults():
    c, m, drv = _loop(5.0)
    out = array("i", [0])
    assert drv.read_into(out, 0) and abs(out[0] - 1625) <= 2
    for ma, kind in ((0.0, "open"), (3.7, "open"), (20.7, "short")):
        m.adc_source(34, _counts(ma))
        assert not drv.read_into(out, 0), ma
        assert drv.fault == kind and drv.status == "warning"
        assert abs(out[0] - 1625) <= 2  # nothing made up
    assert drv.faults == 3 and drv.errors == 3
    m.adc_source(34, _counts(5.0))
    assert drv.read_into(out, 0) and drv.fault is None and drv.status == "ok"
    assert drv.stage == "normal" and drv.take_events() is None  # a fault is not a flood


def test_420_saturated_adc_is_a_short_with_uv_per_count():
    # 150 ohm puts 20 mA at 3.0 V, beyond the ADC: with read_uv a 22 mA short
    # reads as a plausible 16.3 mA; with counts the saturation is visible
    c, m, drv = _loop(12.0, shunt_ohm=150)
    out = array("i", [0])
    m.adc_source(34, 65535)
    assert drv.read_into(out, 0) and abs(drv.current_ua - 16333) <= 5
    c, m, drv = _loop(12.0, shunt_ohm=150, uv_per_count=_FS_UV / 65535)
    assert drv.read_into(out, 0) and abs(out[0] - 6000) <= 3
    m.adc_source(34, 65535)
    assert not drv.read_into(out, 0) and drv.fault == "short"


def test_420_oversampling_averages_adc_noise():
    c, m, drv = _loop(oversample=8)
    k = [0]
    base = _counts(12.0)

    def noisy(now):
        k[0] += 1
        return base + (40 if k[0] & 1 else -40)  # +-1.5 mV of noise, alternating

    m.adc_source(34, noisy)
    out = array("i", [0])
    assert drv.read_into(out, 0) and abs(out[0] - 6000) <= 2
    assert k[0] == 8


def test_420_stage_events_and_alert():
    c, m, drv = _loop()
    out = array("i", [0])
    # level = 1.0 + (I - 4) / 16 * 10 m: 3.04 m at 7.264 mA, 3.6 m at 8.16 mA
    for ma, stage, alert in ((7.264, "caution", True), (8.16, "evacuation", True), (6.4, "standby", False)):
        m.adc_source(34, _counts(ma))
        assert drv.read_into(out, 0)
        assert drv.stage == stage and drv.alert == alert, (ma, drv.stage)
    ev = drv.take_events()
    assert [(e[1], e[2]["from"], e[2]["stage"]) for e in ev] == [
        ("warning", "normal", "caution"), ("critical", "caution", "evacuation"),
        ("info", "evacuation", "standby")], ev
    assert abs(ev[1][2]["level_m"] - 3.6) < 0.003


def test_420_options_checked():
    c = SimClock()
    m = Machine(c)
    assert "range_m" in _raises(Level420, m.ADC(m.Pin(34)), c, {})
    assert "shunt_ohm" in _raises(Level420, m.ADC(m.Pin(34)), c, {"range_m": 5, "shunt_ohm": 0.5})


def test_420_read_allocates_nothing():
    c, m, drv = _loop(7.5)
    out = array("i", [0])
    drv.read_into(out, 0)
    drv.take_events()
    gc.collect()
    a = gc.mem_alloc()
    ok = drv.read_into(out, 0)
    b = gc.mem_alloc()
    assert ok and drv.alert
    assert b - a == 0, b - a
