"""A simulated ``machine`` module, one board per Machine instance.

Firmware uses it exactly like ``machine`` (``hw.Pin(5, hw.Pin.IN)``,
``hw.I2C(0, scl=hw.Pin(9), sda=hw.Pin(8))``...); tests drive the other
side: ``m.pin(5).drive(0)``, ``m.adc_source(4, fn)``, ``m.adc_waveform(4, fn_us)``,
``m.i2c_bus(0).attach(0x76, dev)``, ``m.uart_port(1).attach(dev)``,
``m.wdt_expired()``. Timing comes from the SimClock given to it.

Device protocols: I2C ``i2c_write(data)``, ``i2c_read(n) -> bytes`` and
optionally ``i2c_read_into(buf)`` (used when present: no allocation);
a device may raise OSError(19) to NACK. UART ``uart_tx(data)`` and
``uart_poll(now_ms) -> bytes-like or None``, copied into the RX FIFO at once.
"""
from sim.clock import ticks_diff

PWRON_RESET = 1
HARD_RESET = 2
WDT_RESET = 3
DEEPSLEEP_RESET = 4
SOFT_RESET = 5

_ENODEV = 19
_ADC_FS_MV = (950, 1250, 1750, 2450)  # ESP32 full scale per attenuation


class SimReset(Exception):
    """machine.reset() and friends: the board restarts (args[0] = cause)."""


class _Line:
    # the electrical state of one GPIO, shared by every Pin object on it
    def __init__(self):
        self.mode = -1
        self.pull = -1
        self.out = 0
        self.ext = None  # level driven from outside, None = floating
        self.level = 0
        self.handler = None
        self.trigger = 0
        self.owner = None


class Pin:
    IN = 1
    OUT = 3
    OPEN_DRAIN = 7
    PULL_DOWN = 1
    PULL_UP = 2
    IRQ_RISING = 1
    IRQ_FALLING = 2
    _m = None  # bound per Machine

    def __init__(self, id, mode=-1, pull=-1, value=None):
        if not isinstance(id, int) or id < 0:
            raise ValueError("invalid pin")
        self._id = id
        self._line = self._m._line(id)
        self.init(mode, pull, value)

    def init(self, mode=-1, pull=-1, value=None):
        ln = self._line
        if mode != -1:
            ln.mode = mode
        if pull != -1:
            ln.pull = pull
        if value is not None:
            ln.out = 1 if value else 0
        self._update()

    def _update(self):
        ln = self._line
        if ln.mode == Pin.OUT:
            lv = ln.out
        elif ln.mode == Pin.OPEN_DRAIN and ln.out == 0:
            lv = 0
        elif ln.ext is not None:
            lv = ln.ext
        else:
            lv = 1 if ln.pull == Pin.PULL_UP else 0
        old = ln.level
        ln.level = lv
        if lv != old and ln.handler is not None:
            edge = Pin.IRQ_RISING if lv else Pin.IRQ_FALLING
            if ln.trigger & edge:
                ln.handler(ln.owner)

    def value(self, v=None):
        if v is None:
            return self._line.level
        self._line.out = 1 if v else 0
        self._update()

    __call__ = value

    def on(self):
        self.value(1)

    def off(self):
        self.value(0)

    def irq(self, handler=None, trigger=3):
        ln = self._line
        ln.handler = handler
        ln.trigger = trigger
        ln.owner = self
        return self

    def drive(self, v):
        """Sim side: drive the line from outside (None releases it)."""
        self._line.ext = None if v is None else (1 if v else 0)
        self._update()

    def __repr__(self):
        return "Pin(%d)" % self._id


class ADC:
    ATTN_0DB = 0
    ATTN_2_5DB = 1
    ATTN_6DB = 2
    ATTN_11DB = 3
    _m = None

    def __init__(self, pin, atten=None):
        self._id = pin if isinstance(pin, int) else pin._id
        self._atten = 0 if atten is None else atten
        self._bits = 12

    def atten(self, a):
        self._atten = a

    def width(self, bits):
        self._bits = bits

    def read_u16(self):
        return self._m._adc_read(self._id)

    def read(self):
        return self.read_u16() >> (16 - self._bits)

    def read_uv(self):
        # floor(counts * fs_uv / 65535) without leaving small ints
        p = self.read_u16() * _ADC_FS_MV[self._atten]
        return (p // 65535) * 1000 + ((p % 65535) * 1000) // 65535


class _Wave:
    # an ADC source that is a fast waveform (adc_waveform): counts from
    # fn(now_us); each conversion takes conv_us on the microsecond ticks
    def __init__(self, clock, fn, conv_us):
        self.clock = clock
        self.fn = fn
        self.conv_us = conv_us
        spend = getattr(clock, "spend_us", None)
        if spend is None and hasattr(clock, "_us"):
            spend = self._spend  # SimClock keeps its microsecond ticks in _us
        self.spend = spend  # None: a real clock, time passes by itself

    def _spend(self, us):
        c = self.clock
        c._us = (c._us + us) & 0x3FFFFFFF

    def read(self):
        v = self.fn(self.clock.ticks_us())
        if self.spend is not None:
            self.spend(self.conv_us)
        return v


class I2CBus:
    """Sim side of one I2C bus: devices by address."""

    def __init__(self):
        self.devices = {}
        self._reads = {}
        self._a1 = bytearray(1)
        self._a2 = bytearray(2)

    def attach(self, addr, device):
        self.devices[addr] = device
        self._reads[addr] = getattr(device, "i2c_read_into", None)
        return device

    def detach(self, addr):
        self.devices.pop(addr, None)
        self._reads.pop(addr, None)

    def _dev(self, addr):
        d = self.devices.get(addr)
        if d is None:
            raise OSError(_ENODEV)
        return d

    def write(self, addr, data):
        self._dev(addr).i2c_write(data)

    def read_into(self, addr, buf):
        d = self._dev(addr)
        r = self._reads[addr]
        if r is not None:
            r(buf)
            return
        data = d.i2c_read(len(buf))
        for i in range(len(buf)):
            buf[i] = data[i]

    def memaddr(self, memaddr, addrsize):
        if addrsize == 8:
            a = self._a1
            a[0] = memaddr & 0xFF
        else:
            a = self._a2
            a[0] = (memaddr >> 8) & 0xFF
            a[1] = memaddr & 0xFF
        return a


class I2C:
    _m = None

    def __init__(self, id=0, scl=None, sda=None, freq=400000, timeout=50000):
        self._bus = self._m.i2c_bus(id)
        self.freq = freq

    def init(self, scl=None, sda=None, freq=400000, timeout=50000):
        self.freq = freq

    def scan(self):
        return sorted(self._bus.devices)

    def writeto(self, addr, buf, stop=True):
        self._bus.write(addr, buf)
        return len(buf)

    def writevto(self, addr, vector, stop=True):
        data = b"".join(bytes(v) for v in vector)
        self._bus.write(addr, data)
        return len(data)

    def readfrom_into(self, addr, buf, stop=True):
        self._bus.read_into(addr, buf)

    def readfrom(self, addr, nbytes, stop=True):
        buf = bytearray(nbytes)
        self._bus.read_into(addr, buf)
        return bytes(buf)

    def readfrom_mem_into(self, addr, memaddr, buf, addrsize=8):
        bus = self._bus
        bus.write(addr, bus.memaddr(memaddr, addrsize))
        bus.read_into(addr, buf)

    def readfrom_mem(self, addr, memaddr, nbytes, addrsize=8):
        buf = bytearray(nbytes)
        self.readfrom_mem_into(addr, memaddr, buf, addrsize)
        return bytes(buf)

    def writeto_mem(self, addr, memaddr, buf, addrsize=8):
        bus = self._bus
        bus.write(addr, bytes(bus.memaddr(memaddr, addrsize)) + bytes(buf))


class UARTPort:
    """Sim side of one UART: the attached device and a bounded RX FIFO
    (overflow drops the oldest bytes and counts them in ``overflow``)."""

    def __init__(self, machine, rxbuf=256):
        self._m = machine
        self.device = None
        self.overflow = 0
        self.resize(rxbuf)

    def resize(self, rxbuf):
        self._rx = bytearray(rxbuf)
        self._head = 0
        self._n = 0

    def attach(self, device):
        self.device = device
        return device

    def detach(self):
        self.device = None

    def feed(self, data):
        """Put bytes into the RX FIFO as if they arrived on the line."""
        rx = self._rx
        size = len(rx)
        h = self._head
        n = self._n
        for i in range(len(data)):
            if n == size:
                h = (h + 1) % size
                n -= 1
                self.overflow += 1
            rx[(h + n) % size] = data[i]
            n += 1
        self._head = h
        self._n = n

    def poll(self):
        d = self.device
        if d is not None:
            data = d.uart_poll(self._m.clock.ticks_ms())
            if data:
                self.feed(data)
        return self._n

    def take_into(self, buf, nbytes):
        rx = self._rx
        size = len(rx)
        k = nbytes if nbytes < self._n else self._n
        h = self._head
        for i in range(k):
            buf[i] = rx[h]
            h = (h + 1) % size
        self._head = h
        self._n -= k
        return k

    def find(self, byte):
        # bytes up to and including the first `byte`, or 0
        rx = self._rx
        size = len(rx)
        for i in range(self._n):
            if rx[(self._head + i) % size] == byte:
                return i + 1
        return 0


class UART:
    _m = None

    def __init__(self, id, baudrate=9600, bits=8, parity=None, stop=1, tx=None, rx=None,
                 rxbuf=256, timeout=0, timeout_char=0, txbuf=256):
        self._port = self._m.uart_port(id)
        if rxbuf != len(self._port._rx):
            self._port.resize(rxbuf)
        self.baudrate = baudrate

    def init(self, baudrate=9600, **kw):
        self.baudrate = baudrate

    def deinit(self):
        pass

    def any(self):
        return self._port.poll()

    def read(self, nbytes=None):
        n = self._port.poll()
        if n == 0:
            return None
        if nbytes is not None and nbytes < n:
            n = nbytes
        buf = bytearray(n)
        self._port.take_into(buf, n)
        return bytes(buf)

    def readinto(self, buf, nbytes=None):
        if self._port.poll() == 0:
            return None
        return self._port.take_into(buf, len(buf) if nbytes is None else nbytes)

    def readline(self):
        port = self._port
        n = port.poll()
        if n == 0:
            return None
        k = port.find(10) or n
        buf = bytearray(k)
        port.take_into(buf, k)
        return bytes(buf)

    def write(self, buf):
        d = self._port.device
        if d is not None:
            d.uart_tx(bytes(buf))
        return len(buf)


class Timer:
    ONE_SHOT = 0
    PERIODIC = 1
    _m = None

    def __init__(self, id=0, **kw):
        self._id = id
        self._cb = None
        self._period = 0
        self._mode = Timer.PERIODIC
        self._due = 0
        self._on = False
        self._listener = self._tick  # one bound method, so remove_listener finds it
        if kw:
            self.init(**kw)

    def init(self, mode=PERIODIC, period=-1, freq=-1, callback=None):
        self.deinit()
        if freq > 0:
            period = 1000 // freq
        if period <= 0:
            raise ValueError("period")
        clock = self._m.clock
        self._cb = callback
        self._mode = mode
        self._period = period
        self._due = clock.ticks_add(clock.ticks_ms(), period)
        self._on = True
        clock.add_listener(self._listener, period)

    def deinit(self):
        if self._on:
            self._on = False
            self._m.clock.remove_listener(self._listener)

    def _tick(self, now):
        while self._on and ticks_diff(now, self._due) >= 0:
            if self._mode == Timer.ONE_SHOT:
                self._on = False
            else:
                self._due = (self._due + self._period) & 0x3FFFFFFF
            if self._cb is not None:
                self._cb(self)
        if not self._on:
            self._m.clock.remove_listener(self._listener)
            return None
        return ticks_diff(self._due, now)


class WDT:
    _m = None

    def __init__(self, id=0, timeout=5000):
        self.timeout = timeout
        self.fed = self._m.clock.ticks_ms()
        self._m.wdt = self

    def feed(self):
        self.fed = self._m.clock.ticks_ms()


class Machine:
    """One simulated board. Factories (Pin, I2C, UART, ADC, Timer, WDT) are
    classes bound to this instance."""

    PWRON_RESET = PWRON_RESET
    HARD_RESET = HARD_RESET
    WDT_RESET = WDT_RESET
    DEEPSLEEP_RESET = DEEPSLEEP_RESET
    SOFT_RESET = SOFT_RESET

    def __init__(self, clock, uid=b"\x24\x6f\x28\x00\x00\x01", reset_cause=PWRON_RESET):
        self.clock = clock
        self._uid = bytes(uid)
        self._cause = reset_cause
        self._freq = 160000000
        self._lines = {}
        self._adc = {}
        self._i2c = {}
        self._uarts = {}
        self.wdt = None
        for cls in (Pin, ADC, I2C, UART, Timer, WDT):
            # a subclass per board, so hw.Pin(5) knows which board it is on
            setattr(self, cls.__name__, type(cls.__name__, (cls,), {"_m": self}))

    # -- the machine module's functions
    def reset_cause(self):
        return self._cause

    def unique_id(self):
        return self._uid

    def freq(self, hz=None):
        if hz is None:
            return self._freq
        self._freq = hz

    def reset(self):
        raise SimReset(SOFT_RESET)

    soft_reset = reset

    def deepsleep(self, ms=0):
        raise SimReset(DEEPSLEEP_RESET)

    def lightsleep(self, ms=0):
        self.clock.advance(ms)

    def idle(self):
        pass

    def disable_irq(self):
        return 0

    def enable_irq(self, state=0):
        pass

    # -- the simulation side
    def _line(self, n):
        ln = self._lines.get(n)
        if ln is None:
            ln = self._lines[n] = _Line()
        return ln

    def pin(self, n):
        """A Pin on GPIO n (same line as the firmware's), for drive()."""
        return self.Pin(n)

    def adc_source(self, pin_no, source):
        """Counts 0..65535 for an ADC pin: a value or fn(now_ms)."""
        self._adc[pin_no] = source

    def adc_waveform(self, pin_no, fn_us, conv_us=10):
        """Counts 0..65535 for an ADC pin from fn(now_us): a fast signal (a PWM
        pilot, mains current) that a driver samples in a burst paced with
        ticks_us. Each read is a conversion taking conv_us of virtual time on
        the microsecond ticks only (ticks_ms and timers do not move), so a
        burst that keeps converting while it waits sees time pass as on a board."""
        self._adc[pin_no] = _Wave(self.clock, fn_us, conv_us)

    def _adc_read(self, n):
        s = self._adc.get(n, 0)
        if isinstance(s, _Wave):
            s = s.read()
        elif callable(s):
            s = s(self.clock.ticks_ms())
        return 0 if s < 0 else (65535 if s > 65535 else int(s))

    def i2c_bus(self, id):
        b = self._i2c.get(id)
        if b is None:
            b = self._i2c[id] = I2CBus()
        return b

    def uart_port(self, id):
        p = self._uarts.get(id)
        if p is None:
            p = self._uarts[id] = UARTPort(self)
        return p

    def wdt_expired(self):
        """True when a WDT was started and not fed within its timeout."""
        w = self.wdt
        return w is not None and ticks_diff(self.clock.ticks_ms(), w.fed) > w.timeout
