# PMS5003 driver against the simulated part (UART frames), in the VM.
import gc
from array import array
from sim.clock import SimClock
from sim.machine import Machine
from sim.devices.pms5003 import PMS5003Device, frame
from node.sensors.pms5003 import PMS5003


def _rig(**kw):
    c = SimClock()
    m = Machine(c)
    uart = m.UART(1, baudrate=9600, tx=17, rx=18)
    dev = m.uart_port(1).attach(PMS5003Device(c, **kw))
    drv = PMS5003(uart)
    drv.begin()
    return c, m, dev, drv


def test_interface():
    assert PMS5003.KIND == "pms5003"
    assert PMS5003.CHANNELS == ("pm1_ugm3", "pm25_ugm3", "pm10_ugm3")
    assert PMS5003.SCALES == (1, 1, 1)


def test_frame_layout():
    f = frame(11, 22, 33, cf1=(14, 25, 36))
    assert len(f) == 32
    assert f[0] == 0x42 and f[1] == 0x4D and (f[2] << 8) | f[3] == 28
    words = [(f[i] << 8) | f[i + 1] for i in range(4, 30, 2)]
    assert words[:6] == [14, 25, 36, 11, 22, 33]
    assert (f[30] << 8) | f[31] == sum(f[:30])


def test_good_frames_decoded_once_per_second():
    c, m, dev, drv = _rig(pm1=4, pm25=9, pm10=15)
    dev.set(cf1=(40, 90, 150))  # CF=1 words differ: the atmospheric ones are reported
    out = array("i", [0, 0, 0, 0])
    assert not drv.read_into(out, 1)  # nothing sent yet
    assert drv.status == "ok" and drv.errors == 0
    c.advance(1000)
    assert drv.read_into(out, 1)
    assert list(out) == [0, 4, 9, 15]
    assert not drv.read_into(out, 1)  # no new frame in between
    dev.set(pm1=120, pm25=250, pm10=400)
    c.advance(1000)
    assert drv.read_into(out, 1) and list(out) == [0, 120, 250, 400]
    assert drv.frames == 2 and drv.bad_frames == 0 and drv.errors == 0


def test_newest_of_several_frames_wins():
    c, m, dev, drv = _rig()
    m.uart_port(1).detach()
    m.uart_port(1).feed(frame(1, 2, 3) + frame(4, 5, 6) + frame(7, 8, 9))
    out = array("i", [0, 0, 0])
    assert drv.read_into(out, 0) and list(out) == [7, 8, 9]
    assert drv.frames == 3


def test_frame_split_across_reads():
    c, m, dev, drv = _rig()
    port = m.uart_port(1)
    port.detach()
    f = frame(10, 20, 30)
    out = array("i", [0, 0, 0])
    port.feed(f[:13])
    assert not drv.read_into(out, 0)
    port.feed(f[13:])
    assert drv.read_into(out, 0) and list(out) == [10, 20, 30]
    assert drv.errors == 0


def test_corrupt_checksum_counted_and_skipped():
    c, m, dev, drv = _rig(pm1=1, pm25=2, pm10=3)
    out = array("i", [0, 0, 0])
    dev.corrupt_checksum()
    c.advance(1000)
    assert not drv.read_into(out, 0)
    assert drv.bad_frames == 1 and drv.errors == 1 and drv.status == "warning"
    assert list(out) == [0, 0, 0]
    c.advance(1000)
    assert drv.read_into(out, 0) and list(out) == [1, 2, 3]
    assert drv.status == "ok" and drv.bad_frames == 1


def test_garbage_between_frames_is_skipped():
    c, m, dev, drv = _rig(pm1=5, pm25=6, pm10=7)
    out = array("i", [0, 0, 0])
    dev.inject_garbage(b"\x00\x13\x42\xff\x4d\x42")
    c.advance(1000)
    assert drv.read_into(out, 0) and list(out) == [5, 6, 7]
    assert drv.skipped == 6 and drv.bad_frames == 0
    # garbage that looks like a header with a wrong length: one bad frame, then resync
    dev.inject_garbage(b"\x42\x4d\x00")
    c.advance(1000)
    assert drv.read_into(out, 0) and list(out) == [5, 6, 7]
    assert drv.bad_frames == 1 and drv.errors == 1 and drv.frames == 2


def test_truncated_frame_counted_and_next_one_recovered():
    c, m, dev, drv = _rig(pm1=66, pm25=77, pm10=88)  # 66 = 0x42 inside the data words
    out = array("i", [0, 0, 0])
    dev.truncate_next(20)
    c.advance(2000)  # the cut frame and a whole one arrive together
    assert drv.read_into(out, 0) and list(out) == [66, 77, 88]
    assert drv.bad_frames == 1 and drv.frames == 1 and drv.status == "ok"


def test_fifo_overflow_while_not_read():
    c, m, dev, drv = _rig()
    c.advance(20000)  # 20 frames (640 bytes) into a 256-byte FIFO
    out = array("i", [0, 0, 0])
    assert drv.read_into(out, 0)
    assert m.uart_port(1).overflow > 0
    assert list(out) == [5, 8, 12]


def test_uart_error_is_a_warning():
    c, m, dev, drv = _rig()

    class Broken:
        def readinto(self, buf, n=None):
            raise OSError(5)

    drv._uart = Broken()
    assert not drv.read_into(array("i", [0, 0, 0]), 0)
    assert drv.errors == 1 and drv.status == "warning"


def test_read_allocates_nothing():
    c, m, dev, drv = _rig(pm1=3, pm25=4, pm10=5)
    out = array("i", [0, 0, 0])
    c.advance(1000)
    drv.read_into(out, 0)
    c.advance(3000)  # three frames waiting: sim UART, sim part and parser all run
    gc.collect()
    a = gc.mem_alloc()
    ok = drv.read_into(out, 0)
    b = gc.mem_alloc()
    assert ok and drv.frames == 4
    assert b - a == 0, b - a
