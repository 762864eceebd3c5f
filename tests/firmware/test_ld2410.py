# HLK-LD2410 radar driver against the simulated part (UART report frames), in the VM.
import gc
from array import array
from binascii import unhexlify
from sim.clock import SimClock
from sim.machine import Machine
from sim.devices.ld2410 import LD2410Device, frame, STATIC, MOVING, BOTH
from node.sensors.ld2410 import LD2410

def _hex(s):
    return unhexlify(s.replace(" ", ""))


# the examples of the serial protocol manual (basic and engineering mode)
BASIC = _hex("f4 f3 f2 f1 0d 00 02 aa 02 51 00 00 00 00 3b 00 00 55 00 f8 f7 f6 f5")
ENGINEERING = _hex("f4 f3 f2 f1 23 00 01 aa 03 1e 00 3c 00 00 39 00 00 08 08"
                   " 3c 22 05 03 03 04 03 06 05 00 00 39 10 13 06 06 08 04 03 05 55 00 f8 f7 f6 f5")
# both targets at known values: moving 79 cm/100, static 76 cm/100, detection 50 cm
BOTH_79_76 = _hex("f4 f3 f2 f1 0d 00 02 aa 03 4f 00 64 4c 00 64 32 00 55 00 f8 f7 f6 f5")


def _rig(**kw):
    c = SimClock()
    m = Machine(c)
    uart = m.UART(2, baudrate=256000, tx=17, rx=16)
    dev = m.uart_port(2).attach(LD2410Device(c, **kw))
    drv = LD2410(uart, c, {})
    drv.begin()
    return c, m, dev, drv


def _port_only():
    # the driver on a port fed by hand
    c, m, dev, drv = _rig()
    port = m.uart_port(2)
    port.detach()
    return c, port, drv


def _read(drv):
    out = array("i", [-1, -1, -1])
    return drv.read_into(out, 0), list(out)


def test_interface():
    assert LD2410.KIND == "ld2410"
    assert LD2410.CHANNELS == ("presence", "moving_cm", "static_cm")
    assert LD2410.SCALES == (1, 1, 1)
    c = SimClock()
    drv = LD2410(Machine(c).UART(2), c, {})
    assert drv.status == "warning" and not drv.read_into(array("i", [0, 0, 0]), 0)


def test_sim_frames_match_the_manual():
    assert len(BASIC) == 23 and len(ENGINEERING) == 45
    assert frame(STATIC, 81, 0, 0, 59, 0) == BASIC
    eng = frame(BOTH, 30, 60, 0, 57, 0, gates=(ENGINEERING[19:28], ENGINEERING[28:37]))
    assert eng[:37] == ENGINEERING[:37] and len(eng) == len(ENGINEERING)
    assert frame(BOTH, 79, 100, 76, 100, 50) == BOTH_79_76


def test_manual_examples_decoded():
    c, port, drv = _port_only()
    port.feed(BASIC)
    assert _read(drv) == (True, [1, 0, 0])  # static target, its distance 0 in the example
    assert drv.state == 2 and drv.moving_cm == 81 and drv.moving_energy == 0
    assert drv.static_cm == 0 and drv.static_energy == 59 and drv.detect_cm == 0
    assert not drv.engineering
    port.feed(BOTH_79_76)
    assert _read(drv) == (True, [1, 79, 76])
    assert drv.moving_energy == 100 and drv.static_energy == 100 and drv.detect_cm == 50
    port.feed(ENGINEERING)
    assert _read(drv) == (True, [1, 30, 0])
    assert drv.engineering and drv.moving_energy == 60 and drv.static_energy == 57
    assert drv.frames == 3 and drv.bad_frames == 0 and drv.errors == 0 and drv.skipped == 0


def test_frames_from_the_part_at_10_hz():
    c, m, dev, drv = _rig()
    assert _read(drv) == (False, [-1, -1, -1])  # nothing sent yet
    assert drv.status == "ok"
    c.advance(500)
    assert _read(drv) == (True, [0, 0, 0])  # nobody there
    assert drv.frames == 5
    dev.set(state=MOVING, moving_cm=240, moving_energy=70, detect_cm=250)
    c.advance(500)
    assert _read(drv) == (True, [1, 240, 0])
    dev.set(state=BOTH, static_cm=180, static_energy=40)
    c.advance(500)
    assert _read(drv) == (True, [1, 240, 180])
    dev.set(state=STATIC)
    c.advance(500)
    assert _read(drv) == (True, [1, 0, 180])
    assert drv.detect_cm == 250 and drv.frames == 20 and drv.errors == 0


def test_engineering_frames_from_the_part():
    c, m, dev, drv = _rig()
    dev.set(state=BOTH, moving_cm=90, moving_energy=55, static_cm=120, static_energy=33)
    dev.engineering(True)
    c.advance(300)
    assert _read(drv) == (True, [1, 90, 120])
    assert drv.engineering and drv.static_energy == 33 and drv.bad_frames == 0


def test_frame_split_across_reads():
    c, port, drv = _port_only()
    port.feed(BOTH_79_76[:9])
    assert _read(drv) == (False, [-1, -1, -1])
    port.feed(BOTH_79_76[9:])
    assert _read(drv) == (True, [1, 79, 76])
    assert drv.errors == 0


def test_corrupted_frames_counted_and_skipped():
    c, m, dev, drv = _rig()
    dev.set(state=MOVING, moving_cm=150)
    for corrupt in (dev.corrupt_footer, dev.corrupt_tail, dev.bad_length):
        bad = drv.bad_frames
        corrupt()
        c.advance(100)
        assert _read(drv) == (False, [-1, -1, -1])
        assert drv.bad_frames == bad + 1 and drv.status == "warning"
        c.advance(100)
        assert _read(drv) == (True, [1, 150, 0]) and drv.status == "ok"
    assert drv.bad_frames == 3 and drv.errors == 3 and drv.frames == 3


def test_garbage_between_frames_is_skipped():
    c, m, dev, drv = _rig()
    dev.set(state=STATIC, static_cm=300)
    dev.inject_garbage(b"\x00\xf4\xf3\x13\xaa\xf8")
    c.advance(100)
    assert _read(drv) == (True, [1, 0, 300])
    assert drv.skipped == 6 and drv.bad_frames == 0
    # a command ACK (FD FC FB FA ... 04 03 02 01) is not a report: skipped, not bad
    c2, port, drv2 = _port_only()
    port.feed(_hex("fd fc fb fa 04 00 ff 01 00 00 04 03 02 01") + BASIC)
    assert _read(drv2) == (True, [1, 0, 0]) and drv2.bad_frames == 0 and drv2.skipped == 14


def test_truncated_frame_counted_and_the_next_one_recovered():
    c, m, dev, drv = _rig()
    dev.set(state=BOTH, moving_cm=0xF4, static_cm=500)  # a header byte inside the data
    dev.truncate_next(12)
    c.advance(200)  # the cut frame and a whole one arrive together
    assert _read(drv) == (True, [1, 0xF4, 500])
    assert drv.bad_frames == 1 and drv.frames == 1 and drv.status == "ok"


def test_out_of_range_answers_are_bad_frames():
    c, port, drv = _port_only()
    port.feed(frame(4, 100, 10, 100, 10, 100))  # no such target state
    port.feed(frame(MOVING, 4000, 10, 0, 0, 0))  # 40 m: not this part
    assert _read(drv) == (False, [-1, -1, -1])
    assert drv.bad_frames == 2 and drv.errors == 2 and drv.frames == 0


def test_bad_length_in_a_fake_header_resyncs_on_the_real_one():
    c, port, drv = _port_only()
    # a header with a silly length, then a real frame right behind it
    port.feed(b"\xf4\xf3\xf2\xf1\x7f\x00" + BOTH_79_76)
    assert _read(drv) == (True, [1, 79, 76])
    assert drv.bad_frames == 1
    # a header with a plausible length swallows the real frame: found again inside
    port.feed(b"\xf4\xf3\xf2\xf1\x0d\x00\x02\xaa" + BOTH_79_76 + BASIC)
    assert _read(drv) == (True, [1, 0, 0])
    assert drv.frames == 3 and drv.bad_frames == 2


def test_silence_is_a_warning_then_recovers():
    c, m, dev, drv = _rig()
    c.advance(500)
    assert _read(drv)[0]
    dev.silence()
    c.advance(1500)
    assert _read(drv) == (False, [-1, -1, -1])
    assert drv.status == "ok" and drv.errors == 0  # a short gap is not yet a fault
    c.advance(1000)  # 2.5 s without a frame
    assert _read(drv) == (False, [-1, -1, -1])
    assert drv.status == "warning" and drv.errors == 1
    c.advance(5000)
    assert not _read(drv)[0] and drv.errors == 1  # one error per silence
    dev.silence(False)
    c.advance(200)
    assert _read(drv) == (True, [0, 0, 0]) and drv.status == "ok"


def test_fifo_overflow_while_not_read():
    c, m, dev, drv = _rig()
    dev.set(state=MOVING, moving_cm=321)
    c.advance(10000)  # 100 frames (2300 bytes) into a 256-byte FIFO
    assert _read(drv) == (True, [1, 321, 0])
    assert m.uart_port(2).overflow > 0 and drv.status == "ok"


def test_uart_error_is_a_warning():
    c, m, dev, drv = _rig()

    class Broken:
        def readinto(self, buf, n=None):
            raise OSError(5)

    drv._uart = Broken()
    assert not drv.read_into(array("i", [0, 0, 0]), 0)
    assert drv.errors == 1 and drv.status == "warning"


def test_read_allocates_nothing():
    c, m, dev, drv = _rig()
    dev.set(state=BOTH, moving_cm=100, static_cm=200)
    out = array("i", [0, 0, 0])
    c.advance(100)
    drv.read_into(out, 0)
    c.advance(500)  # five frames waiting: sim UART, sim part and parser all run
    gc.collect()
    a = gc.mem_alloc()
    ok = drv.read_into(out, 0)
    b = gc.mem_alloc()
    assert ok and drv.frames == 6 and list(out) == [1, 100, 200]
    assert b - a == 0, b - a
    # and through a bad frame and its re-parse
    port = m.uart_port(2)
    port.detach()
    port.feed(b"\xf4\xf3\xf2\xf1\x0d\x00\x02\xaa" + BOTH_79_76)
    gc.collect()
    a = gc.mem_alloc()
    ok = drv.read_into(out, 0)
    b = gc.mem_alloc()
    assert ok and list(out) == [1, 79, 76] and drv.bad_frames == 1
    assert b - a == 0, b - a
