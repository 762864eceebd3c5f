# The simulated clock and machine, run in the MicroPython VM: ticks match
# MicroPython's own, and every part behaves like the ESP32 port.
import gc
import time
from sim.clock import SimClock, TICKS_PERIOD
from sim.machine import Machine, SimReset, PWRON_RESET, WDT_RESET
from sim.devices.base import RegisterDevice


def _raises(fn, exc):
    try:
        fn()
    except exc as e:
        return e
    raise AssertionError("%s not raised" % exc.__name__)


# -- clock

def test_ticks_wrap_at_2_30():
    c = SimClock(start_ms=TICKS_PERIOD - 10)
    t0 = c.ticks_ms()
    c.advance(25)
    assert c.ticks_ms() == 15
    assert c.ticks_diff(c.ticks_ms(), t0) == 25
    assert c.ticks_diff(t0, c.ticks_ms()) == -25
    assert c.ticks_add(TICKS_PERIOD - 1, 1) == 0
    assert c.ticks_add(0, -1) == TICKS_PERIOD - 1


def test_ticks_match_micropython():
    c = SimClock()
    half = TICKS_PERIOD // 2
    values = (0, 1, 5, half - 1, half, half + 1, TICKS_PERIOD - 1, TICKS_PERIOD - 7, 123456789)
    for a in values:
        for b in values:
            assert c.ticks_diff(a, b) == time.ticks_diff(a, b), (a, b)
        for d in (0, 1, -1, 1000, -1000, half - 1, -half + 1):
            assert c.ticks_add(a, d) == time.ticks_add(a, d), (a, d)
    assert c.ticks_diff(half, 0) == -half  # signed range is [-2**29, 2**29)
    _raises(lambda: c.ticks_add(0, half), OverflowError)
    _raises(lambda: time.ticks_add(0, half), OverflowError)


def test_ticks_us_follow_ms_and_wrap():
    c = SimClock(start_ms=5)
    assert c.ticks_us() == 5000
    c.advance(TICKS_PERIOD // 1000 + 1)  # past one wrap of the microsecond counter
    assert c.ticks_us() == ((5 + TICKS_PERIOD // 1000 + 1) * 1000) % TICKS_PERIOD
    assert c.ticks_ms() == 5 + TICKS_PERIOD // 1000 + 1


def test_utc_unset_then_advances_with_virtual_time():
    c = SimClock()
    assert c.utc() is None
    c.set_utc(1750000000)
    c.advance(999)
    assert c.utc() == 1750000000
    c.advance(1)
    assert c.utc() == 1750000001
    c.advance(3600 * 1000)
    assert c.utc() == 1750003601
    c2 = SimClock(utc=1700000000)
    assert c2.utc() == 1700000000


def test_listeners_fire_at_their_due_times():
    c = SimClock(start_ms=TICKS_PERIOD - 300)  # and across the wrap
    seen = []

    def every_250(now):
        seen.append(now)
        return 250

    c.add_listener(every_250, 250)
    t0 = c.ticks_ms()
    c.advance(1000)
    # due at 250, 500, 750, 1000, plus the end-of-advance call at 1000
    assert [c.ticks_diff(t, t0) for t in seen] == [250, 500, 750, 1000, 1000], seen
    c.remove_listener(every_250)
    c.advance(1000)
    assert len(seen) == 5


async def test_sleep_ms_advances_and_yields():
    c = SimClock()
    await c.sleep_ms(1500)
    assert c.ticks_ms() == 1500
    c.set_jitter(lambda: 3)
    await c.sleep_ms(10)
    assert c.ticks_ms() == 1513
    c.set_jitter(None)
    await c.sleep_ms(0)
    assert c.ticks_ms() == 1513


def test_advance_allocates_nothing():
    c = SimClock()
    n = [0]

    def tick(now):
        n[0] += 1
        return 100

    c.add_listener(tick, 100)
    c.advance(10)
    gc.collect()
    a = gc.mem_alloc()
    c.advance(1000)
    b = gc.mem_alloc()
    assert b - a == 0, b - a
    assert n[0] > 10


# -- machine

def test_machine_identity_and_reset():
    c = SimClock()
    m = Machine(c, uid=b"\x24\x6f\x28\x00\x00\x07", reset_cause=WDT_RESET)
    assert m.reset_cause() == WDT_RESET == m.WDT_RESET == 3
    assert Machine(c).reset_cause() == PWRON_RESET == 1
    assert m.unique_id() == b"\x24\x6f\x28\x00\x00\x07"
    assert m.freq() == 160000000
    m.freq(240000000)
    assert m.freq() == 240000000
    e = _raises(m.reset, SimReset)
    assert e.args[0] == m.SOFT_RESET


def test_pin_levels_and_irq_on_drive():
    m = Machine(SimClock())
    p = m.Pin(5, m.Pin.IN, m.Pin.PULL_UP)
    assert p.value() == 1
    hits = []
    p.irq(handler=lambda pin: hits.append(pin.value()), trigger=m.Pin.IRQ_FALLING)
    m.pin(5).drive(0)
    assert p.value() == 0
    assert hits == [0]
    m.pin(5).drive(1)  # rising edge: not subscribed
    assert hits == [0]
    p.irq(handler=lambda pin: hits.append(("r", pin)), trigger=m.Pin.IRQ_RISING | m.Pin.IRQ_FALLING)
    m.pin(5).drive(0)
    m.pin(5).drive(0)  # no edge, no call
    m.pin(5).drive(None)  # released: the pull-up raises it
    assert len(hits) == 3 and hits[2][1] is p
    q = m.Pin(2, m.Pin.OUT, value=1)
    assert q.value() == 1
    q.off()
    assert q() == 0
    q.on()
    assert m.pin(2).value() == 1
    od = m.Pin(4, m.Pin.OPEN_DRAIN, m.Pin.PULL_UP)
    od.value(0)
    assert od.value() == 0
    od.value(1)
    assert od.value() == 1
    other = Machine(SimClock())  # boards do not share pins
    assert other.Pin(5, other.Pin.IN).value() == 0


def test_adc_counts_from_source():
    c = SimClock()
    m = Machine(c)
    adc = m.ADC(m.Pin(4))
    assert adc.read_u16() == 0
    m.adc_source(4, 32768)
    assert adc.read_u16() == 32768
    assert adc.read() == 2048
    m.adc_source(4, lambda now: 1000 + now)
    c.advance(500)
    assert adc.read_u16() == 1500
    m.adc_source(4, 70000)
    assert adc.read_u16() == 65535
    adc.atten(m.ADC.ATTN_11DB)
    assert adc.read_uv() == 2450000
    m.adc_source(4, 0)
    assert adc.read_uv() == 0


class _Regs(RegisterDevice):
    def __init__(self):
        super().__init__()
        self.writes = []

    def on_write(self, reg, value):
        self.writes.append((reg, value))
        self.regs[reg] = value


def test_i2c_register_device_and_enodev():
    m = Machine(SimClock())
    i2c = m.I2C(0, scl=m.Pin(9), sda=m.Pin(8), freq=100000)
    dev = m.i2c_bus(0).attach(0x40, _Regs())
    assert i2c.scan() == [0x40]
    i2c.writeto(0x40, b"\x10\x01\x02\x03")  # pointer, then consecutive registers
    assert dev.writes == [(0x10, 1), (0x11, 2), (0x12, 3)]
    assert i2c.readfrom_mem(0x40, 0x10, 3) == b"\x01\x02\x03"
    i2c.writeto_mem(0x40, 0xFF, b"\x09\x08")  # pointer wraps at 0xFF
    assert dev.regs[0xFF] == 9 and dev.regs[0] == 8
    i2c.writeto(0x40, b"\x11")
    assert i2c.readfrom(0x40, 2) == b"\x02\x03"  # reads continue from the pointer
    buf = bytearray(2)
    i2c.readfrom_into(0x40, buf)
    assert buf == bytearray(b"\x00\x00")
    i2c.readfrom_mem_into(0x40, 0x0010, buf, addrsize=16)  # pointer = first byte 0x00
    assert dev.ptr == 3
    for fn in (lambda: i2c.readfrom_mem(0x41, 0, 1), lambda: i2c.writeto(0x41, b"\x00"),
               lambda: i2c.readfrom_into(0x41, buf)):
        assert _raises(fn, OSError).args[0] == 19  # ENODEV, as on the ESP32 port
    m.i2c_bus(0).detach(0x40)
    assert i2c.scan() == []
    assert _raises(lambda: i2c.readfrom_mem(0x40, 0x10, 1), OSError).args[0] == 19
    assert m.I2C(1).scan() == []  # another bus


def test_i2c_register_read_allocates_nothing():
    m = Machine(SimClock())
    i2c = m.I2C(0)
    m.i2c_bus(0).attach(0x40, _Regs())
    buf = bytearray(8)
    i2c.readfrom_mem_into(0x40, 0xF7, buf)
    gc.collect()
    a = gc.mem_alloc()
    i2c.readfrom_mem_into(0x40, 0xF7, buf)
    b = gc.mem_alloc()
    assert b - a == 0, b - a


class _Echo:
    def __init__(self):
        self.sent = []
        self.pending = b""

    def uart_tx(self, data):
        self.sent.append(data)

    def uart_poll(self, now_ms):
        d = self.pending
        self.pending = b""
        return d


def test_uart_read_write_and_empty_is_none():
    m = Machine(SimClock())
    u = m.UART(1, baudrate=9600, tx=17, rx=18)
    dev = m.uart_port(1).attach(_Echo())
    assert u.read() is None
    assert u.readinto(bytearray(4)) is None
    assert u.any() == 0
    assert u.write(b"AT\r\n") == 4
    assert dev.sent == [b"AT\r\n"]
    dev.pending = b"OK\r\nREADY\r\nxy"
    assert u.any() == 13
    assert u.readline() == b"OK\r\n"
    buf = bytearray(3)
    assert u.readinto(buf) == 3 and buf == bytearray(b"REA")
    assert u.read(2) == b"DY"
    assert u.read() == b"\r\nxy"
    assert u.read() is None


def test_uart_rx_overflow_drops_oldest_and_counts():
    m = Machine(SimClock())
    u = m.UART(2, rxbuf=16)
    port = m.uart_port(2)
    port.feed(bytes(range(20)))
    assert port.overflow == 4
    assert u.any() == 16
    assert u.read() == bytes(range(4, 20))


def test_timer_periodic_one_shot_and_deinit():
    c = SimClock()
    m = Machine(c)
    t = m.Timer(0)
    fired = []
    t.init(period=100, mode=m.Timer.PERIODIC, callback=lambda tm: fired.append(c.ticks_ms()))
    c.advance(1000)
    assert fired == [100, 200, 300, 400, 500, 600, 700, 800, 900, 1000], fired
    t.deinit()
    c.advance(1000)
    assert len(fired) == 10
    once = []
    m.Timer(1).init(period=250, mode=m.Timer.ONE_SHOT, callback=lambda tm: once.append(c.ticks_ms()))
    c.advance(1000)
    assert once == [2250]


def test_wdt_expires_without_feed():
    c = SimClock()
    m = Machine(c)
    assert not m.wdt_expired()  # no watchdog started
    w = m.WDT(timeout=8000)
    c.advance(7000)
    w.feed()
    c.advance(8000)
    assert not m.wdt_expired()
    c.advance(1)
    assert m.wdt_expired()
    w.feed()
    assert not m.wdt_expired()
