# SCD4x driver against the simulated part (I2C commands, CRC-8, timing), in the VM.
import gc
from array import array
from sim.clock import SimClock
from sim.machine import Machine
from sim.devices.scd4x import SCD4xDevice, crc8
from node.sensors import SensorError
from node.sensors.scd4x import SCD4x, _crc8


def _rig():
    c = SimClock()
    m = Machine(c)
    i2c = m.I2C(0, scl=m.Pin(9), sda=m.Pin(8))
    dev = m.i2c_bus(0).attach(0x62, SCD4xDevice(c))
    return c, m, dev, SCD4x(i2c, delay_ms=c.advance)


def test_interface():
    assert SCD4x.KIND == "scd4x"
    assert SCD4x.CHANNELS == ("co2_ppm", "temp_c", "rh_pct")
    assert SCD4x.SCALES == (1, 100, 100)


def test_crc8_datasheet_example():
    assert crc8(b"\xbe\xef") == 0x92
    assert _crc8(b"\xbe\xef", 0) == 0x92
    assert _crc8(b"\x00\xbe\xef", 1) == 0x92


def test_begin_reads_serial_and_starts_periodic_mode():
    c, m, dev, drv = _rig()
    t0 = c.ticks_ms()
    drv.begin()
    assert drv.serial == 0x0BAD0C0FFEE0
    assert dev.periodic and drv.status == "ok"
    assert c.ticks_diff(c.ticks_ms(), t0) == 501  # 500 ms after stop, 1 ms for the serial
    try:
        m.I2C(0).writeto(0x62, b"\x36\x82")  # get_serial_number is refused in periodic mode
        raise AssertionError("no NACK")
    except OSError as e:
        assert e.args[0] == 19


def test_part_timing_is_enforced():
    c = SimClock()
    m = Machine(c)
    m.i2c_bus(0).attach(0x62, SCD4xDevice(c))
    drv = SCD4x(m.I2C(0))  # no delay_ms: the answer is read before the part is ready
    try:
        drv.begin()
        raise AssertionError("no SensorError")
    except SensorError as e:
        assert str(e) == "scd4x at 0x62: no answer (OSError 19)", str(e)
    assert drv.status == "failed"


def test_measurement_every_5_s_decoded_per_datasheet():
    c, m, dev, drv = _rig()
    dev.set(co2_ppm=812, temp_c=23.45, rh_pct=41.7)
    drv.begin()
    out = array("i", [0, 0, 0])
    assert not drv.read_into(out, 0)  # nothing yet: not an error
    assert drv.errors == 0 and drv.status == "ok"
    got = 0
    for _ in range(60):
        c.advance(1000)
        if drv.read_into(out, 0):
            got += 1
    assert got == 12, got  # 60 s of clock, one measurement per 5 s
    assert dev.measurements == 12
    assert out[0] == 812
    wt = int((23.45 + 45) * 65535 / 175 + 0.5)
    wh = int(41.7 * 65535 / 100 + 0.5)
    assert abs(out[1] - (-45 + 175 * wt / 65535) * 100) <= 1, out[1]
    assert abs(out[2] - 100 * wh / 65535 * 100) <= 1, out[2]
    assert abs(out[1] - 2345) <= 1 and abs(out[2] - 4170) <= 1
    assert drv.errors == 0


def test_extremes_of_the_encoding():
    c, m, dev, drv = _rig()
    drv.begin()
    out = array("i", [0, 0, 0])
    for t, rh in ((-10.0, 0.0), (60.0, 100.0), (-45.0, 0.0), (130.0, 100.0)):
        dev.set(temp_c=t, rh_pct=rh)
        c.advance(5000)
        assert drv.read_into(out, 0)
        assert abs(out[1] - t * 100) <= 1 and abs(out[2] - rh * 100) <= 1, (out[1], out[2])


def test_bad_crc_is_counted_and_not_reported():
    c, m, dev, drv = _rig()
    drv.begin()
    out = array("i", [-1, -1, -1])
    c.advance(5000)
    dev.corrupt_crc()  # hits the data-ready answer
    assert not drv.read_into(out, 0)
    assert drv.errors == 1 and drv.status == "warning"
    assert list(out) == [-1, -1, -1]
    assert drv.read_into(out, 0)  # the measurement is still there
    assert drv.status == "ok"
    c.advance(5000)
    dev.set(co2_ppm=999)
    # corrupt the measurement answer itself: the data-ready answer comes first
    real = dev._answer

    def corrupt_second(words, now, exec_ms, n=[0]):
        n[0] += 1
        if n[0] == 2:
            dev.corrupt_crc()
        real(words, now, exec_ms)

    dev._answer = corrupt_second
    assert not drv.read_into(out, 0)
    assert drv.errors == 2 and out[0] != 999


def test_out_of_range_co2_is_counted():
    c, m, dev, drv = _rig()
    drv.begin()
    dev.set(co2_ppm=50000)  # above the 40000 ppm output range
    c.advance(5000)
    out = array("i", [0, 0, 0])
    assert not drv.read_into(out, 0)
    assert drv.errors == 1 and out[0] == 0


def test_detached_sensor_is_a_warning_not_a_crash():
    c, m, dev, drv = _rig()
    drv.begin()
    m.i2c_bus(0).detach(0x62)
    c.advance(5000)
    out = array("i", [0, 0, 0])
    assert not drv.read_into(out, 0)
    assert drv.errors == 1 and drv.status == "warning"
    m.i2c_bus(0).attach(0x62, dev)
    assert drv.read_into(out, 0) and drv.status == "ok"


def test_read_allocates_nothing():
    c, m, dev, drv = _rig()
    drv.begin()
    out = array("i", [0, 0, 0])
    c.advance(5000)
    drv.read_into(out, 0)
    c.advance(5000)
    gc.collect()
    a = gc.mem_alloc()
    ok = drv.read_into(out, 0)
    b = gc.mem_alloc()
    assert ok
    assert b - a == 0, b - a  # driver, sim bus, sim part and clock.advance as delay
