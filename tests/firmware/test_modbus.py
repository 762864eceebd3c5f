# Modbus RTU framing and the Eastron SDM meter driver against the simulated
# meter (UART frames), in the VM.
import struct
from array import array
from sim.clock import SimClock
from sim.machine import Machine
from sim.devices.sdm import SDMDevice, with_crc
from node.sensors import SensorError
from node.sensors.modbus import (crc16, read_input_registers_request, answer_length, check_answer,
                                 ModbusError, RTUMaster, READ_INPUT_REGISTERS, exception_name)
from node.sensors.sdm import SDMMeter


def _b(*xs):
    return bytes(xs)


# -- CRC-16 (Modbus: poly 0xA001 reflected, init 0xFFFF, low byte first)

def test_crc_published_vectors():
    # read 2 input registers from 0 at slave 1: the frame ends 71 CB
    assert crc16(_b(0x01, 0x04, 0x00, 0x00, 0x00, 0x02)) == 0xCB71
    # read 10 holding registers from 0 at slave 1: ... C5 CD
    assert crc16(_b(0x01, 0x03, 0x00, 0x00, 0x00, 0x0A)) == 0xCDC5
    # "Modbus over serial line" v1.02, 6.2.2 example: 11 03 00 6B 00 03 -> CRC 76 87
    assert crc16(_b(0x11, 0x03, 0x00, 0x6B, 0x00, 0x03)) == 0x8776
    # CRC-16/MODBUS check value of the CRC catalogue
    assert crc16(b"123456789") == 0x4B37


def test_crc_of_a_whole_frame_is_zero_and_n_limits_it():
    f = read_input_registers_request(1, 0, 2)
    assert crc16(f) == 0
    assert crc16(f + b"\xff\xff", 8) == 0


def test_read_input_registers_request_bytes():
    assert read_input_registers_request(1, 0x0000, 2) == _b(0x01, 0x04, 0x00, 0x00, 0x00, 0x02, 0x71, 0xCB)
    r = read_input_registers_request(0x11, 0x0048, 0x004A)
    assert r[:6] == _b(0x11, 0x04, 0x00, 0x48, 0x00, 0x4A)
    c = crc16(r, 6)
    assert r[6] == c & 0xFF and r[7] == c >> 8
    for bad in ((0, 0, 2), (248, 0, 2), (1, 0, 0), (1, 0, 126), (1, 0xFFFF, 2)):
        try:
            read_input_registers_request(*bad)
            assert False, bad
        except ValueError:
            pass


def test_answer_length_from_the_header():
    assert answer_length(_b(0x01), 1, 4) == 0
    assert answer_length(_b(0x01, 0x84), 2, 4) == 5  # exception: addr fn code crc crc
    assert answer_length(_b(0x01, 0x04), 2, 4) == 0
    assert answer_length(_b(0x01, 0x04, 0x08), 3, 4) == 13


def test_check_answer_good_and_bad():
    good = with_crc(_b(0x01, 0x04, 0x04, 0x43, 0x66, 0x00, 0x00))
    assert check_answer(good, len(good), 1, 4, 2) == 3
    assert struct.unpack_from(">f", good, 3)[0] == 230.0  # 0x4366 0x0000
    bad = bytearray(good)
    bad[4] ^= 1
    for frame, addr, count, kind in ((bad, 1, 2, "crc"), (good, 2, 2, "frame"), (good, 1, 4, "frame"),
                                     (good[:4], 1, 2, "frame")):
        try:
            check_answer(frame, len(frame), addr, 4, count)
            assert False, kind
        except ModbusError as e:
            assert e.kind == kind and e.code is None, (kind, e.kind)


def test_exception_responses_named():
    for code, name in ((1, "ILLEGAL FUNCTION"), (2, "ILLEGAL DATA ADDRESS"), (3, "ILLEGAL DATA VALUE"),
                       (4, "SERVER DEVICE FAILURE"), (6, "SERVER DEVICE BUSY")):
        f = with_crc(_b(0x07, 0x84, code))
        try:
            check_answer(f, 5, 7, 4, 2)
            assert False
        except ModbusError as e:
            assert e.kind == "exception" and e.code == code
            assert name in str(e), str(e)
    assert exception_name(99) == "UNKNOWN EXCEPTION"


# -- the simulated meter's register map

def _ask(dev, c, req):
    dev.uart_tx(req)
    c.advance(dev.latency_ms)
    return dev.uart_poll(c.ticks_ms())


def test_sim_meter_maps_per_model():
    c = SimClock()
    d120 = SDMDevice(c, "sdm120")
    d630 = SDMDevice(c, "sdm630")
    # phase 2 voltage exists on the SDM630 only
    a = _ask(d120, c, read_input_registers_request(1, 0x0002, 2))
    assert a == with_crc(_b(0x01, 0x84, 0x02))
    a = _ask(d630, c, read_input_registers_request(1, 0x0002, 2))
    assert check_answer(a, len(a), 1, 4, 2) == 3
    assert struct.unpack_from(">f", a, 3)[0] == 230.0
    # more than 40 parameters, odd counts: illegal data value
    assert _ask(d120, c, read_input_registers_request(1, 0, 82)) == with_crc(_b(0x01, 0x84, 0x03))
    assert _ask(d120, c, read_input_registers_request(1, 0, 3)) == with_crc(_b(0x01, 0x84, 0x03))
    # past the end of the map; another function
    assert _ask(d120, c, read_input_registers_request(1, 0x0500, 2))[2] == 0x02
    holding = bytearray(read_input_registers_request(1, 0, 2))
    holding[1] = 0x03
    c16 = crc16(holding, 6)
    holding[6] = c16 & 0xFF
    holding[7] = c16 >> 8
    assert _ask(d120, c, holding) == with_crc(_b(0x01, 0x83, 0x01))


def test_sim_meter_integrates_energy():
    c = SimClock()
    d = SDMDevice(c)
    d.set(voltage_v=200.0, current_a=16.0, import_kwh=10.0)
    c.advance(3600 * 1000)
    assert abs(d.value(0x0048) - 13.2) < 1e-6  # 3.2 kW for an hour
    assert d.value(0x000C) == 3200.0


# -- SDMMeter driver

def _rig(model="sdm120", address=1, dev_address=1, timeout_ms=200, setup=None):
    # setup(dev) runs before begin() sends the first request
    c = SimClock()
    m = Machine(c)
    dev = m.uart_port(2).attach(SDMDevice(c, model, dev_address, latency_ms=40))
    if setup is not None:
        setup(dev)
    drv = SDMMeter(m.UART(2, baudrate=9600), c, {"model": model, "address": address, "timeout_ms": timeout_ms})
    drv.begin()
    return c, m, dev, drv


def test_interface():
    assert SDMMeter.KIND == "sdm_meter"
    assert SDMMeter.CHANNELS == ("voltage_v", "current_a", "power_w", "energy_kwh")
    assert SDMMeter.SCALES == (10, 100, 1, 1000)


def test_reads_the_register_block_and_decodes_floats():
    c, m, dev, drv = _rig(setup=lambda d: d.set(voltage_v=230.0, current_a=16.0, import_kwh=1234.567))
    assert dev.received == [read_input_registers_request(1, 0x0000, 0x004A)]  # sent by begin()
    out = array("i", [0, 0, 0, 0, 0])
    assert not drv.read_into(out, 1)  # the answer is 40 ms away: not a fault
    assert drv.errors == 0 and drv.status == "warning" and len(dev.received) == 1
    c.advance(1000)
    assert drv.read_into(out, 1)
    assert list(out) == [0, 2300, 1600, 3680, 1234567]
    assert drv.voltage_v == 230.0 and drv.current_a == 16.0 and drv.power_w == 3680.0
    assert abs(drv.energy_kwh - 1234.567) < 0.001
    assert drv.status == "ok" and drv.errors == 0 and drv.readings == 1
    assert len(dev.received) == 2  # the next request is on its way
    c.advance(1000)
    assert drv.read_into(out, 1) and drv.readings == 2


def test_sdm630_power_is_the_total_system_power():
    c, m, dev, drv = _rig(model="sdm630", setup=lambda d: d.set(voltage_v=202.0, current_a=30.0, pf=0.99))
    out = array("i", [0, 0, 0, 0])
    c.advance(1000)
    assert drv.read_into(out, 0)
    assert out[0] == 2020 and out[1] == 3000 and out[2] == round(202.0 * 30.0 * 0.99)
    assert dev.value(0x0034) == dev.value(0x000C)  # a single-phase charger on L1


def test_timeout_counted_and_recovered():
    c, m, dev, drv = _rig()
    out = array("i", [-1, -1, -1, -1])
    dev.silent = True
    c.advance(1000)
    assert not drv.read_into(out, 0)  # the answer to begin()'s request never came
    assert drv.timeouts == 1 and drv.errors == 1 and drv.status == "warning"
    assert "no answer" in drv.last_error
    assert list(out) == [-1, -1, -1, -1] and drv.power_w is None
    c.advance(100)
    assert not drv.read_into(out, 0) and drv.timeouts == 1  # within timeout_ms: still waiting
    c.advance(100)
    assert not drv.read_into(out, 0) and drv.timeouts == 2
    dev.silent = False
    c.advance(1000)
    assert not drv.read_into(out, 0)  # that request was sent while the meter was silent
    c.advance(1000)
    assert drv.read_into(out, 0) and drv.status == "ok" and drv.timeouts == 3


def test_bad_crc_counted_never_reported():
    c, m, dev, drv = _rig()
    out = array("i", [-1, -1, -1, -1])
    dev.bad_crc = True
    for _ in range(3):
        c.advance(1000)
        assert not drv.read_into(out, 0)
    assert drv.crc_errors == 3 and drv.errors == 3 and drv.status == "warning"
    assert list(out) == [-1, -1, -1, -1]
    dev.bad_crc = False
    c.advance(1000)
    assert drv.read_into(out, 0) and drv.status == "ok" and drv.errors == 3


def test_exception_response_counted_with_its_name():
    c, m, dev, drv = _rig(setup=lambda d: setattr(d, "busy", True))
    c.advance(1000)
    assert not drv.read_into(array("i", [0, 0, 0, 0]), 0)
    assert drv.exceptions == 1 and drv.errors == 1 and drv.status == "warning"
    assert "SERVER DEVICE BUSY" in drv.last_error


def test_garbage_before_the_answer_is_a_frame_error():
    c, m, dev, drv = _rig()
    dev.garbage = b"\x00\xff"
    c.advance(1000)
    assert not drv.read_into(array("i", [0, 0, 0, 0]), 0)
    assert drv.frame_errors + drv.crc_errors == 1 and drv.errors == 1
    c.advance(1000)
    assert drv.read_into(array("i", [0, 0, 0, 0]), 0)


def test_wrong_slave_address_is_ignored_by_the_meter():
    c, m, dev, drv = _rig(address=2, dev_address=1)
    c.advance(1000)
    assert not drv.read_into(array("i", [0, 0, 0, 0]), 0)
    assert dev.ignored == len(dev.received) == 2 and dev.requests == 0  # begin() and the retry
    assert drv.timeouts == 1 and drv.status == "warning"


def test_out_of_range_answer_not_reported():
    c, m, dev, drv = _rig(setup=lambda d: d.set(voltage_v=float("nan")))
    out = array("i", [-1, -1, -1, -1])
    c.advance(1000)
    assert not drv.read_into(out, 0)
    assert drv.range_errors == 1 and drv.errors == 1 and list(out) == [-1, -1, -1, -1]
    assert drv.voltage_v is None


def test_wrong_model_refused_and_wrong_register_map_counted():
    c, m, dev, drv = _rig()
    bad = SDMMeter(m.UART(2), c, {"model": "sdm220"})
    try:
        bad.begin()
        assert False
    except SensorError as e:
        assert "sdm220" in str(e)
    assert bad.status == "failed" and not bad.read_into(array("i", [0, 0, 0, 0]), 0)
    # a meter whose map does not start at 0x0000 refuses the block: exception 2
    c, m, dev, drv = _rig(setup=lambda d: d.params.discard(0x0000))
    c.advance(1000)
    assert not drv.read_into(array("i", [0, 0, 0, 0]), 0)
    assert drv.exceptions == 1 and "ILLEGAL DATA ADDRESS" in drv.last_error


def test_rtu_master_polls_without_blocking():
    c = SimClock()
    m = Machine(c)
    dev = m.uart_port(1).attach(SDMDevice(c, latency_ms=50))
    mb = RTUMaster(m.UART(1), c, timeout_ms=200)
    mb.send_read(1, READ_INPUT_REGISTERS, 0x0048, 2)
    assert mb.pending and mb.poll() is False
    c.advance(49)
    assert mb.poll() is False
    c.advance(1)
    assert mb.poll() is True and not mb.pending
    assert struct.unpack_from(">f", mb.rx, 3)[0] == 0.0
    assert mb.poll() is False  # nothing pending
