# BME280 driver against the simulated part (register level), in the VM.
# Pressure uses the datasheet's 32-bit integer variant (BME280_compensate_P_int32):
# on the worked example it gives 100656 Pa where the double formula gives
# 100653.26 Pa, and it stays within 5 Pa of the double formula over the range.
import gc
from array import array
from sim.clock import SimClock
from sim.machine import Machine
from sim.devices.bme280 import BME280Device, DEFAULT_CALIB, compensate_t, compensate_p, compensate_h
from node.sensors import SensorError
from node.sensors.bme280 import BME280


def _rig(dev=None, address=0x76):
    m = Machine(SimClock())
    i2c = m.I2C(0, scl=m.Pin(9), sda=m.Pin(8), freq=100000)
    dev = m.i2c_bus(0).attach(address, dev or BME280Device())
    return m, dev, BME280(i2c, address)


def test_interface():
    assert BME280.KIND == "bme280"
    assert BME280.CHANNELS == ("temp_c", "rh_pct", "pressure_hpa")
    assert BME280.SCALES == (100, 100, 100)


def test_datasheet_worked_example():
    # BMP280 datasheet example trimming, adc_T = 519888, adc_P = 415148
    m, dev, drv = _rig()
    drv.begin()
    assert drv.compensate_t(519888) == 2508  # 25.08 degC
    assert drv._tf == 128422  # t_fine of the example
    p = drv.compensate_p(415148)
    assert p == 100656 and abs(p - 100653) <= 3, p  # 32-bit variant: within 3 Pa
    dev.set_raw(adc_t=519888, adc_p=415148)
    out = array("i", [0, 0, 0])
    assert drv.read_into(out, 0)
    assert out[0] == 2508 and out[2] == 100656
    t, tf = compensate_t(DEFAULT_CALIB, 519888)
    assert abs(t - 25.08) < 0.005 and tf == 128422
    assert abs(compensate_p(DEFAULT_CALIB, 415148, tf) - 100653.27) < 0.05


def test_calibration_layout_per_datasheet():
    calib = dict(DEFAULT_CALIB)
    calib.update(H4=-300, H5=-45, H6=-7, H2=-20)  # exercise the signed, split nibbles
    dev = BME280Device(**calib)
    r = dev.regs
    assert r[0x88] | (r[0x89] << 8) == 27504  # dig_T1 little-endian at 0x88
    assert r[0xA1] == 75  # dig_H1
    assert r[0xE4] == (-300 >> 4) & 0xFF and r[0xE5] == ((-300 & 0x0F) | ((-45 & 0x0F) << 4))
    m, dev, drv = _rig(dev)
    drv.begin()
    got = (drv._t1, drv._t2, drv._t3, drv._p1, drv._p2, drv._p3, drv._p4, drv._p5, drv._p6,
           drv._p7, drv._p8, drv._p9, drv._h1, drv._h2, drv._h3, drv._h4, drv._h5, drv._h6)
    want = tuple(calib[k] for k in ("T1", "T2", "T3", "P1", "P2", "P3", "P4", "P5", "P6", "P7",
                                    "P8", "P9", "H1", "H2", "H3", "H4", "H5", "H6"))
    assert got == want, got


def test_against_datasheet_float_formulas():
    m, dev, drv = _rig()
    drv.begin()
    out = array("i", [0, 0, 0])
    c = DEFAULT_CALIB
    n = 0
    for tc in (-40.0, -10.5, 0.0, 21.37, 45.0, 85.0):
        for pa in (30000.0, 80000.0, 101325.0, 110000.0):
            for rh in (0.0, 12.5, 50.0, 87.3, 100.0):
                dev.set(tc, pa, rh)
                assert drv.read_into(out, 0), (tc, pa, rh)
                t, tf = compensate_t(c, dev.adc_t)
                assert abs(out[0] - t * 100) <= 1, (out[0], t)
                assert abs(out[1] - compensate_h(c, dev.adc_h, tf) * 100) <= 2, (out[1], rh)
                assert abs(out[2] - compensate_p(c, dev.adc_p, tf)) <= 5, (out[2], pa)
                # and the physical values set on the part
                assert abs(out[0] - tc * 100) <= 1 and abs(out[2] - pa) <= 6 and abs(out[1] - rh * 100) <= 2
                n += 1
    assert n == 120 and drv.errors == 0 and drv.status == "ok"


def test_humidity_matches_float_formula_over_raw_range():
    m, dev, drv = _rig()
    drv.begin()
    c = DEFAULT_CALIB
    for adc_t in (420000, 519888, 600000):
        drv.compensate_t(adc_t)
        tf = drv._tf
        for adc_h in range(20000, 45001, 2500):
            h = compensate_h(c, adc_h, tf) * 100
            assert abs(drv.compensate_h(adc_h) - h) <= 2, (adc_t, adc_h)


def test_data_only_after_normal_or_forced_mode():
    dev = BME280Device()
    m, dev, drv = _rig(dev)
    buf = m.I2C(0).readfrom_mem(0x76, 0xF7, 8)
    assert buf == b"\x80\x00\x00\x80\x00\x00\x80\x00"  # reset values: nothing measured
    m.I2C(0).writeto_mem(0x76, 0xF2, b"\x01")
    m.I2C(0).writeto_mem(0x76, 0xF4, b"\x25")  # forced mode
    assert m.I2C(0).readfrom_mem(0x76, 0xF4, 1) == b"\x24"  # back to sleep
    assert m.I2C(0).readfrom_mem(0x76, 0xF7, 8) != buf
    drv.begin()
    assert dev.regs[0xF4] == 0x27 and dev.regs[0xF2] == 0x01 and dev.regs[0xF5] == 0xA0


def test_wrong_chip_id_fails_with_reason():
    m, dev, drv = _rig(BME280Device(chip_id=0x58))  # a BMP280 where a BME280 was expected
    try:
        drv.begin()
        raise AssertionError("no SensorError")
    except SensorError as e:
        assert str(e) == "bme280 at 0x76: chip id 0x58, expected 0x60", str(e)
    assert drv.status == "failed"
    assert not drv.read_into(array("i", [0, 0, 0]), 0)


def test_missing_part_fails_begin():
    m = Machine(SimClock())
    drv = BME280(m.I2C(0), 0x77)
    try:
        drv.begin()
        raise AssertionError("no SensorError")
    except SensorError as e:
        assert str(e) == "bme280 at 0x77: no answer (OSError 19)", str(e)
    assert drv.status == "failed"


def test_detached_sensor_is_a_warning_not_a_crash():
    m, dev, drv = _rig()
    drv.begin()
    out = array("i", [7, 7, 7, 7])
    assert drv.read_into(out, 1)
    m.i2c_bus(0).detach(0x76)
    assert not drv.read_into(out, 1)
    assert not drv.read_into(out, 1)
    assert drv.errors == 2 and drv.status == "warning"
    m.i2c_bus(0).attach(0x76, dev)
    assert drv.read_into(out, 1)
    assert drv.status == "ok" and out[0] == 7


def test_part_reset_is_counted_and_reconfigured():
    m, dev, drv = _rig()
    drv.begin()
    out = array("i", [0, 0, 0])
    m.I2C(0).writeto_mem(0x76, 0xE0, b"\xb6")  # e.g. a brown-out of the sensor
    assert not drv.read_into(out, 0)
    assert drv.errors == 1 and drv.status == "warning"
    assert drv.read_into(out, 0) and drv.status == "ok"


def test_out_of_range_is_counted_not_reported():
    m, dev, drv = _rig()
    drv.begin()
    out = array("i", [0, 0, 0])
    dev.set_raw(adc_t=0xFFFF0)  # far above 85 degC
    assert not drv.read_into(out, 0)
    assert out[0] == 0 and drv.errors == 1
    dev.set(20.0, 20000.0, 40.0)  # 200 hPa: below the part's range
    assert not drv.read_into(out, 0) and drv.errors == 2


def test_read_allocates_nothing():
    m, dev, drv = _rig()
    drv.begin()
    dev.set(-30.0, 35000.0, 95.0)
    out = array("i", [0, 0, 0])
    drv.read_into(out, 0)
    gc.collect()
    a = gc.mem_alloc()
    ok = drv.read_into(out, 0)
    b = gc.mem_alloc()
    assert ok
    assert b - a == 0, b - a  # driver, sim bus and sim part together
