"""A simulated ``bluetooth.BLE`` radio: the scanning subset.

``SimBLE(clock)`` answers ``active()``, ``irq(handler)`` and
``gap_scan(duration_ms, interval_us, window_us, active)`` like MicroPython's
``bluetooth.BLE``: while a scan runs, every advertisement heard calls the
handler with ``_IRQ_SCAN_RESULT`` (5) and ``(addr_type, addr, adv_type,
rssi, adv_data)``, and the end of the scan (its duration over, or
``gap_scan(None)``) with ``_IRQ_SCAN_DONE`` (6) and ``()``. As on the board,
``addr`` and ``adv_data`` are memoryviews into one buffer the radio reuses:
they are scrambled as soon as the handler returns, so a driver that keeps
them instead of copying (or hashing) them at once sees garbage.

The other side, for tests and virtual nodes:

- ``advertise(addr, rssi, adv_data=b"", addr_type=0, adv_type=0)``: one
  advertisement now (heard only while a scan runs; returns whether it was);
- ``add_device(addr, rssi, every_ms=1000, ...)``: a device advertising
  every every_ms of virtual time (the first one every_ms after it is added,
  or ``first_ms``); ``remove_device(addr)``; ``clear_devices()``.

Scan interval and window are recorded but not modelled: every advertisement
of a device is heard.
"""
from sim.clock import ticks_diff

_IRQ_SCAN_RESULT = 5
_IRQ_SCAN_DONE = 6
_EPERM = 1
_MASK = 0x3FFFFFFF


class SimBLE:
    def __init__(self, clock):
        self.clock = clock
        self._active = False
        self._handler = None
        self._scanning = False
        self._scan_end = None  # ticks, or None for a scan without end
        self._devices = []  # [addr, rssi, every_ms, due, adv_data, addr_type, adv_type]
        self._addr = bytearray(6)
        self._data = bytearray(31)
        self._listener = self._tick
        self._listening = False
        self._in_tick = False
        self.scan_args = None  # (duration_ms, interval_us, window_us, active) of the last start
        self.scans = 0  # scans started
        self.heard = 0  # advertisements delivered to the handler

    # -- the bluetooth.BLE API
    def active(self, on=None):
        if on is None:
            return self._active
        on = bool(on)
        if not on and self._scanning:
            self._scanning = False  # the stack goes down without a SCAN_DONE
        self._active = on
        self._schedule()
        return on

    def irq(self, handler):
        self._handler = handler

    def gap_scan(self, duration_ms, interval_us=1280000, window_us=11250, active=False):
        if not self._active:
            raise OSError(_EPERM)
        if duration_ms is None:
            self._stop()
            return
        if window_us > interval_us:
            raise ValueError("window longer than interval")
        if self._scanning:
            self._stop()  # the stack stops a running scan before the new one
        now = self.clock.ticks_ms()
        for d in self._devices:
            # advertisements sent while nobody listened are gone: keep each
            # device's phase, drop what it missed
            late = ticks_diff(now, d[3])
            if late > 0:
                d[3] = (d[3] + ((late + d[2] - 1) // d[2]) * d[2]) & _MASK
        self._scanning = True
        self._scan_end = None if duration_ms == 0 else (now + duration_ms) & _MASK
        self.scan_args = (duration_ms, interval_us, window_us, active)
        self.scans += 1
        self._schedule()

    def scanning(self):
        return self._scanning

    # -- the air
    def advertise(self, addr, rssi, adv_data=b"", addr_type=0, adv_type=0):
        if not (self._active and self._scanning):
            return False
        self._deliver(addr, rssi, adv_data, addr_type, adv_type)
        return True

    def add_device(self, addr, rssi, every_ms=1000, adv_data=b"", addr_type=0, adv_type=0,
                   first_ms=None):
        addr = bytes(addr)
        if len(addr) != 6:
            raise ValueError("a BLE address is 6 bytes")
        self.remove_device(addr)
        due = (self.clock.ticks_ms() + (every_ms if first_ms is None else first_ms)) & _MASK
        self._devices.append([addr, rssi, every_ms, due, bytes(adv_data), addr_type, adv_type])
        self._schedule()

    def remove_device(self, addr):
        addr = bytes(addr)
        self._devices = [d for d in self._devices if d[0] != addr]

    def clear_devices(self):
        self._devices = []

    # -- inside
    def _deliver(self, addr, rssi, adv_data, addr_type, adv_type):
        a = self._addr
        for i in range(6):
            a[i] = addr[i]
        n = min(len(adv_data), 31)
        d = self._data
        for i in range(n):
            d[i] = adv_data[i]
        self.heard += 1
        h = self._handler
        if h is not None:
            h(_IRQ_SCAN_RESULT, (addr_type, memoryview(a), adv_type, rssi, memoryview(d)[:n]))
        for i in range(6):  # the radio reuses its buffer for the next event
            a[i] = 0xEE
        for i in range(n):
            d[i] = 0xEE

    def _stop(self):
        if not self._scanning:
            return
        self._scanning = False
        self._scan_end = None
        self._schedule()
        h = self._handler
        if h is not None:
            h(_IRQ_SCAN_DONE, ())

    def _next_due(self, now):
        # ms until the next thing to do, or None
        if not (self._active and self._scanning):
            return None
        best = None
        if self._scan_end is not None:
            best = ticks_diff(self._scan_end, now)
        for d in self._devices:
            x = ticks_diff(d[3], now)
            if best is None or x < best:
                best = x
        return best

    def _schedule(self):
        if self._in_tick:
            return  # _tick returns the next due time itself
        if self._listening:
            self.clock.remove_listener(self._listener)
            self._listening = False
        d = self._next_due(self.clock.ticks_ms())
        if d is not None:
            self.clock.add_listener(self._listener, max(d, 1))
            self._listening = True

    def _tick(self, now):
        self._in_tick = True
        try:
            while self._active and self._scanning:
                # the earliest due device, if due
                first = None
                for d in self._devices:
                    if ticks_diff(d[3], now) <= 0 and (first is None or ticks_diff(d[3], first[3]) < 0):
                        first = d
                end = self._scan_end
                if first is not None and (end is None or ticks_diff(first[3], end) < 0):
                    first[3] = (first[3] + first[2]) & _MASK
                    self._deliver(first[0], first[1], first[4], first[5], first[6])
                    continue
                if end is not None and ticks_diff(end, now) <= 0:
                    self._scanning = False
                    self._scan_end = None
                    h = self._handler
                    if h is not None:
                        h(_IRQ_SCAN_DONE, ())
                    continue
                break
        finally:
            self._in_tick = False
        d = self._next_due(now)
        return None if d is None else max(d, 1)
