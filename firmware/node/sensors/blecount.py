"""Counts unique nearby Bluetooth LE devices per reporting window.

Privacy rules (docs/architecture.md), all enforced here:

- a device address is hashed the moment it is heard: the first 8 bytes of
  SHA-256(salt + address). The address is copied into one scratch buffer
  for the hash and zeroed right after; it is never stored, logged,
  published or written anywhere;
- the 16-byte salt comes from os.urandom (or the ``urandom`` function
  given to the constructor; without either, begin() refuses to count:
  the host VM has no os.urandom), lives only in RAM and is replaced
  daily: when UTC crosses midnight or, while the clock is not set, every
  24 h of ticks. Hashes of one day cannot be matched with
  another day's, not even by this node;
- only the truncated hashes are kept, in a preallocated table with a fill
  count, cleared (zeroed) at every window close and at every salt change;
- a window with fewer than ``k_min`` devices reports only the flag
  ``below_k``, never the number (k-anonymity).

A salt change in the middle of a window starts the table again and carries
the count over, so a device heard on both sides of midnight counts twice
in that one window: a small overcount, never a link between two days.

Scanning is passive (no scan requests), 50 ms in every 100 ms so Wi-Fi
keeps the radio too, in scans of 30 s that read_into restarts when one
ends. Advertisements weaker than ``rssi_min`` dBm are ignored (``weak``);
when the table is full, further new devices are counted in ``overflow``
and the window reports at least the table size.

The scan handler is not a hard interrupt (the BLE stack calls it from its
own task or the scheduler), so it may allocate, and hashing does: a hash
object and its digest per advertisement (about 190 bytes, garbage at once).
The table, the salt and the scratch buffer are allocated once; read_into
allocates nothing.
"""
import hashlib
from micropython import const
from node.sensors import SensorError, OK, WARNING, FAILED

try:
    from os import urandom as _os_urandom
except ImportError:  # the host VM: the caller passes a source, or begin() refuses
    _os_urandom = None

_IRQ_SCAN_RESULT = const(5)
_IRQ_SCAN_DONE = const(6)
_HASH = const(8)  # bytes of each hash kept
_SALT = const(16)
_ADDR = const(6)
_SCAN_MS = const(30000)
_INTERVAL_US = const(100000)
_WINDOW_US = const(50000)
_DAY_MS = const(86400000)
_DAY_S = const(86400)
_RECHECK_MS = const(600000)  # follow a clock set or corrected meanwhile


class BLECounter:
    KIND = "ble_counter"
    CHANNELS = ()
    SCALES = ()
    COUNTERS = ()

    def __init__(self, ble, clock, opts, urandom=None):
        opts = opts or {}
        self._ble = ble
        self._clock = clock
        self.k_min = opts.get("k_min", 5)
        self.rssi_min = opts.get("rssi_min", -85)
        n = opts.get("table", 256)
        self.table_size = n
        self._table = bytearray(n * _HASH)
        self._used = bytearray(n)
        self._fill = 0
        self._carry = 0  # devices counted this window under the previous salt
        self._msg = bytearray(_SALT + _ADDR)  # salt, then the address being hashed (kept zero)
        self._rand = urandom or _os_urandom
        self._day = -1  # UTC day of the salt, -1 when not known
        self._salt_t = 0
        self._due = 0
        self._recheck = 0
        self._scanning = False
        self._ready = False
        self._handler = self._irq  # one bound method, made once
        self.rotations = 0
        self.heard = 0  # advertisements counted (strong enough)
        self.weak = 0
        self.overflow = 0
        self.errors = 0
        self.status = WARNING  # not set up yet

    def begin(self):
        """Make a salt, start the radio and the first scan."""
        if self._rand is None:
            self.status = FAILED
            raise SensorError("ble_counter: this port has no os.urandom; "
                              "refusing to count without a random salt")
        try:
            self._ble.active(True)
            self._ble.irq(self._handler)
        except OSError as e:
            self.status = FAILED
            raise SensorError("ble_counter: cannot start the radio (OSError %s)" % e.args[0])
        self._clear()
        self._carry = 0
        self._new_salt(self._clock.ticks_ms())
        self._scanning = False
        self._ready = True
        self.status = OK if self._scan() else WARNING

    def stop(self):
        """End the scan and forget the table and the salt."""
        self._ready = False
        try:
            self._ble.gap_scan(None)
        except OSError:
            pass
        self._clear()
        self._carry = 0
        m = self._msg
        for i in range(_SALT + _ADDR):
            m[i] = 0

    def read_into(self, out, offset):
        """No channels: keeps the salt current and the scan running."""
        if not self._ready:
            return False
        self._tick(self._clock.ticks_ms())
        if not self._scanning and not self._scan():
            return False
        self.status = OK
        return True

    def summary(self):
        """At a window close: the number of devices heard in the window, or the
        flag below_k when fewer than k_min; then the table is cleared."""
        if not self._ready:
            return None
        self._tick(self._clock.ticks_ms())
        c = self._carry + self._fill
        self._carry = 0
        self._clear()
        if c < self.k_min:
            return {"flags": {"ble_devices": "below_k"}}
        return {"ch": {"ble_devices": {"n": 1, "min": c, "max": c, "mean": c, "last": c}}}

    # -- inside

    def _scan(self):
        try:
            self._ble.gap_scan(_SCAN_MS, _INTERVAL_US, _WINDOW_US, False)
        except OSError:
            self.errors += 1
            self.status = WARNING
            return False
        self._scanning = True
        return True

    def _irq(self, event, data):
        if event == _IRQ_SCAN_RESULT:
            if self._ready:
                self._heard(data[1], data[3])
        elif event == _IRQ_SCAN_DONE:
            self._scanning = False

    def _heard(self, addr, rssi):
        if rssi < self.rssi_min:
            self.weak += 1
            return
        if len(addr) != _ADDR:
            return
        now = self._clock.ticks_ms()
        self._tick(now)
        if self._day >= 0:
            # to the second: an address heard after midnight never meets the old salt
            u = self._clock.utc()
            if u is not None and u // _DAY_S != self._day:
                self._rotate(now)
        m = self._msg
        for i in range(_ADDR):
            m[_SALT + i] = addr[i]
        d = hashlib.sha256(m).digest()
        for i in range(_ADDR):
            m[_SALT + i] = 0
        self.heard += 1
        self._insert(d)

    def _insert(self, d):
        # open addressing; the slot comes from hash bytes that are not kept
        t = self._table
        used = self._used
        n = self.table_size
        i = ((d[_HASH] << 8) | d[_HASH + 1]) % n
        for _ in range(n):
            b = i * _HASH
            if not used[i]:
                for k in range(_HASH):
                    t[b + k] = d[k]
                used[i] = 1
                self._fill += 1
                return
            k = 0
            while k < _HASH and t[b + k] == d[k]:
                k += 1
            if k == _HASH:
                return  # already counted in this window
            i += 1
            if i == n:
                i = 0
        self.overflow += 1

    def _clear(self):
        t = self._table
        used = self._used
        for i in range(self.table_size):
            if used[i]:
                b = i * _HASH
                for k in range(_HASH):
                    t[b + k] = 0
                used[i] = 0
        self._fill = 0

    def _tick(self, now):
        # ticks only: nothing allocated unless a check or a change is due
        diff = self._clock.ticks_diff
        if diff(now, self._recheck) >= 0:
            self._plan(now)
        if diff(now, self._due) >= 0:
            self._rotate(now)

    def _rotate(self, now):
        self._carry += self._fill
        self._clear()
        self._new_salt(now)
        self.rotations += 1

    def _new_salt(self, now):
        s = self._rand(_SALT)
        m = self._msg
        for i in range(_SALT):
            m[i] = s[i]
        self._salt_t = now
        u = self._clock.utc()
        self._day = -1 if u is None else u // _DAY_S
        self._plan(now)

    def _plan(self, now):
        # the salt's end: the next UTC midnight, at most 24 h of ticks after it was made
        clock = self._clock
        due = clock.ticks_add(self._salt_t, _DAY_MS)
        u = clock.utc()
        if u is not None:
            day = u // _DAY_S
            if self._day < 0:
                self._day = day  # the clock was set after the salt was made
            if day != self._day:
                due = now  # midnight passed (or the clock moved): change it now
            else:
                at = clock.ticks_add(now, (_DAY_S - u % _DAY_S) * 1000)
                if clock.ticks_diff(at, due) < 0:
                    due = at
        self._due = due
        self._recheck = clock.ticks_add(now, _RECHECK_MS)
