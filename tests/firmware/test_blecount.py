# BLE device counting against the simulated radio, in the VM: unique devices
# per window, k-anonymity, daily salt, and the proof that no address or hash
# ever leaves the driver.
import gc
import hashlib
import json
import os
import random
from array import array
from binascii import hexlify, b2a_base64
from sim.clock import SimClock
from sim.ble import SimBLE
from node.sensors.blecount import BLECounter

DAY = 86400
MIDNIGHT = 20454 * DAY  # 2026-01-01T00:00:00Z


class Salts:
    """A recorded random source (the VM has no os.urandom)."""

    def __init__(self, seed=1):
        random.seed(seed)
        self.given = []

    def __call__(self, n):
        b = bytes([random.getrandbits(8) for _ in range(n)])
        self.given.append(b)
        return b


def _addr(i):
    return bytes([0x24, 0x6F, 0x28, 0x10, (i >> 8) & 0xFF, i & 0xFF])


def _rig(utc=None, **opts):
    c = SimClock(utc=utc)
    ble = SimBLE(c)
    salts = Salts()
    drv = BLECounter(ble, c, opts, urandom=salts)
    drv.begin()
    return c, ble, drv, salts


def _count(s):
    if "ch" in s:
        return s["ch"]["ble_devices"]["last"]
    return s["flags"]["ble_devices"]


def _entries(drv):
    t = drv._table
    return [bytes(t[i * 8:i * 8 + 8]) for i in range(drv.table_size) if drv._used[i]]


def _expected(salt, addr):
    return hashlib.sha256(salt + addr).digest()[:8]


def test_interface():
    assert BLECounter.KIND == "ble_counter"
    assert BLECounter.CHANNELS == () and BLECounter.SCALES == ()
    c = SimClock()
    drv = BLECounter(SimBLE(c), c, {}, urandom=Salts())
    assert drv.k_min == 5 and drv.rssi_min == -85 and drv.table_size == 256
    assert len(drv._table) == 256 * 8
    assert drv.status == "warning" and drv.summary() is None


def test_begin_starts_a_passive_scan():
    c, ble, drv, salts = _rig()
    assert ble.active() and ble.scanning() and drv.status == "ok"
    duration, interval, window, active = ble.scan_args
    assert duration > 0 and window <= interval and active is False
    assert len(salts.given) == 1 and len(salts.given[0]) == 16
    assert drv.read_into(array("i"), 0)


def test_without_a_random_source_it_refuses_to_count():
    if hasattr(os, "urandom"):
        return  # a port with os.urandom uses it
    c = SimClock()
    drv = BLECounter(SimBLE(c), c, {})
    try:
        drv.begin()
    except Exception as e:
        assert "urandom" in str(e) and drv.status == "failed"
    else:
        raise AssertionError("counted without a random salt")


def test_unique_devices_per_window_repeats_counted_once():
    c, ble, drv, salts = _rig()
    for i in range(7):
        ble.add_device(_addr(i), -60, every_ms=100)
    c.advance(1000)  # each advertises ten times
    assert ble.heard == 70 and drv.heard == 70
    assert drv.summary() == {"ch": {"ble_devices": {"n": 1, "min": 7, "max": 7, "mean": 7, "last": 7}}}
    assert drv._fill == 0 and _entries(drv) == [] and not any(drv._table)  # cleared
    ble.remove_device(_addr(0))
    ble.remove_device(_addr(1))
    c.advance(1000)
    assert _count(drv.summary()) == 5
    c.advance(1000)
    ble.advertise(_addr(99), -50)  # a single advertisement counts
    assert _count(drv.summary()) == 6


def test_weak_advertisements_are_ignored():
    c, ble, drv, salts = _rig(rssi_min=-80)
    for i in range(5):
        ble.add_device(_addr(i), -80, every_ms=500)  # at the limit: counted
    for i in range(5, 9):
        ble.add_device(_addr(i), -81, every_ms=500)  # one dB weaker: ignored
    c.advance(1000)
    assert _count(drv.summary()) == 5
    assert drv.weak == 8


def test_below_k_reports_a_flag_never_the_number():
    c, ble, drv, salts = _rig()
    for i in range(4):
        ble.add_device(_addr(i), -60, every_ms=200)
    c.advance(1000)
    s = drv.summary()
    assert s == {"flags": {"ble_devices": "below_k"}}
    assert "ch" not in s and "4" not in json.dumps(s)
    assert drv.summary() == {"flags": {"ble_devices": "below_k"}}  # nobody at all
    c2, ble2, drv2, _ = _rig(k_min=2)
    ble2.advertise(_addr(1), -40)
    ble2.advertise(_addr(2), -40)
    assert _count(drv2.summary()) == 2


def test_table_overflow_reports_at_least_the_table_size():
    c, ble, drv, salts = _rig(table=16)
    for i in range(40):
        ble.add_device(_addr(i), -60, every_ms=250)
    c.advance(1000)
    assert _count(drv.summary()) == 16
    assert drv.overflow == 24 * 4
    c.advance(1000)
    assert _count(drv.summary()) == 16  # a fresh table each window


def test_scan_restarted_when_it_ends():
    c, ble, drv, salts = _rig()
    ble.add_device(_addr(1), -60, every_ms=1000)
    out = array("i")
    c.advance(30000)
    assert not ble.scanning() and not drv._scanning  # the 30 s scan is over
    assert drv.read_into(out, 0)
    assert ble.scanning() and ble.scans == 2
    n = drv.heard
    c.advance(5000)
    assert drv.heard >= n + 5


def test_radio_refusing_to_scan_is_a_warning():
    c, ble, drv, salts = _rig()
    ble.gap_scan(None)  # the stack ends the scan and goes down
    ble.active(False)
    assert not drv.read_into(array("i"), 0)
    assert drv.status == "warning" and drv.errors == 1
    ble.active(True)
    assert drv.read_into(array("i"), 0) and drv.status == "ok"


def test_sim_radio_hands_out_views_it_reuses():
    # as on the board: addr is only valid during the callback
    c = SimClock()
    ble = SimBLE(c)
    kept = []
    events = []

    def handler(event, data):
        events.append(event)
        if event == 5:
            kept.append((data[1], bytes(data[1]), data[3], bytes(data[4])))

    ble.irq(handler)
    assert not ble.advertise(_addr(1), -40)  # radio off: nothing heard
    ble.active(True)
    ble.gap_scan(2000, 30000, 30000)
    assert ble.advertise(_addr(1), -40, adv_data=b"\x02\x01\x06")
    view, copy, rssi, adv = kept[0]
    assert copy == _addr(1) and rssi == -40 and adv == b"\x02\x01\x06"
    assert bytes(view) != _addr(1)  # scrambled once the handler returned
    ble.add_device(_addr(2), -70, every_ms=500)
    c.advance(2500)
    assert events == [5, 5, 5, 5, 6]  # three more advertisements, then the scan ends at 2 s
    ble.gap_scan(0, 30000, 30000)  # no end
    c.advance(10000)
    assert ble.scanning() and events.count(5) == 25
    ble.gap_scan(None)
    assert events[-1] == 6 and not ble.scanning()


def test_hash_is_salted_sha256_truncated():
    c, ble, drv, salts = _rig()
    a = _addr(5)
    ble.advertise(a, -50)
    assert _entries(drv) == [_expected(salts.given[0], a)]
    assert bytes(drv._msg[16:]) == bytes(6)  # the scratch copy of the address is zeroed


def test_salt_rotates_at_the_utc_day_boundary():
    c, ble, drv, salts = _rig(utc=MIDNIGHT - 10)  # 23:59:50
    a = _addr(7)
    ble.advertise(a, -50)
    before = _entries(drv)
    assert before == [_expected(salts.given[0], a)]
    c.advance(9000)
    ble.advertise(a, -50)  # 23:59:59: same day, same hash, counted once
    assert _entries(drv) == before and drv.rotations == 0
    c.advance(2000)  # 00:00:01
    ble.advertise(a, -50)
    after = _entries(drv)
    assert drv.rotations == 1 and len(salts.given) == 2
    assert salts.given[1] != salts.given[0]
    assert after == [_expected(salts.given[1], a)] and after != before
    # the window across midnight counts the device once per day
    assert drv._carry == 1 and _count(drv.summary()) == "below_k"
    c.advance(DAY * 1000 - 3000)  # 23:59:58 of the next day
    drv.read_into(array("i"), 0)
    assert drv.rotations == 1
    c.advance(3000)
    drv.read_into(array("i"), 0)  # the ticks check alone notices midnight
    assert drv.rotations == 2


def test_salt_rotates_every_24_h_when_the_clock_is_not_set():
    c, ble, drv, salts = _rig()
    a = _addr(3)
    ble.advertise(a, -50)
    h1 = _entries(drv)
    drv.summary()
    c.advance(DAY * 1000 - 1000)
    drv.read_into(array("i"), 0)
    ble.advertise(a, -50)
    assert _entries(drv) == h1 and drv.rotations == 0
    drv.summary()
    c.advance(2000)
    drv.read_into(array("i"), 0)
    ble.advertise(a, -50)
    assert drv.rotations == 1 and _entries(drv) == [_expected(salts.given[1], a)]
    assert _entries(drv) != h1


def test_clock_set_later_moves_the_rotation_to_midnight():
    c, ble, drv, salts = _rig()
    c.advance(60000)
    c.set_utc(MIDNIGHT - 3600)  # NTP answers: 23:00
    c.advance(600000)  # the driver looks again within 10 min
    drv.read_into(array("i"), 0)
    c.advance(3000 * 1000)  # 00:00:00 and a bit
    drv.read_into(array("i"), 0)
    assert drv.rotations == 1


def test_read_allocates_nothing():
    c, ble, drv, salts = _rig()
    ble.add_device(_addr(1), -60, every_ms=100)
    out = array("i")
    c.advance(1000)
    drv.read_into(out, 0)
    gc.collect()
    a = gc.mem_alloc()
    for _ in range(100):
        ok = drv.read_into(out, 0)
    b = gc.mem_alloc()
    assert ok and b - a == 0, b - a


def _walk(path):
    found = []
    for entry in os.ilistdir(path):
        name, typ = entry[0], entry[1]
        p = path.rstrip("/") + "/" + name
        if typ == 0x4000:
            found.extend(_walk(p))
        else:
            found.append(p)
    return found


def _forms(b):
    """How a byte string may show up in text: hex both cases, with and without
    separators, both byte orders, base64, and Python's escaped repr."""
    h = hexlify(b).decode()
    pairs = [h[i:i + 2] for i in range(0, len(h), 2)]
    rev = "".join(reversed(pairs))
    out = []
    for x in (h, ":".join(pairs), "-".join(pairs), rev, ":".join(reversed(pairs)),
              " ".join(pairs)):
        out.append(x)
        out.append(x.upper())
    out.append(b2a_base64(b).decode().strip())
    out.append(b2a_base64(b).decode().strip().rstrip("="))
    out.append(repr(b)[2:-1])  # b'...' -> its escaped body
    return out


def test_privacy_no_address_or_hash_leaves_the_driver():
    files_before = _walk("/flash")
    c, ble, drv, salts = _rig(utc=MIDNIGHT - 2500)
    addrs = [_addr(i) for i in range(12)] + [b"Iwaki!", b"\xaa\xbb\xcc\xdd\xee\xff"]
    for a in addrs:
        ble.add_device(a, -55, every_ms=5000)
    outputs = []
    entries = []
    out = array("i")
    for sec in range(1, 3001):  # five 10-minute windows, midnight in the fifth
        c.advance(1000)
        drv.read_into(out, 0)  # once a second, as the sampler does
        if sec % 50 == 0:
            for e in _entries(drv):
                if e not in entries:
                    entries.append(e)
        if sec % 600 == 0:
            outputs.append(json.dumps(drv.summary()))
    assert drv.rotations == 1
    assert len(entries) == 2 * len(addrs)  # one hash per address per day
    assert sorted(entries) == sorted([_expected(s, a) for s in salts.given for a in addrs])
    for a in addrs:
        ble.remove_device(a)
    text = "\n".join(outputs)
    assert outputs[0] == json.dumps({"ch": {"ble_devices": {"n": 1, "min": 14, "max": 14,
                                                            "mean": 14, "last": 14}}})
    assert '"last": 28' in outputs[4]  # the window across midnight: each device once per day
    # everything the driver holds, except the table of hashes itself
    held = []
    for name in dir(drv):
        if name.startswith("__") or name in ("_table", "_used"):
            continue
        v = getattr(drv, name)
        if callable(v) and name != "_handler":
            continue
        held.append((name, repr(v)))
        if isinstance(v, (bytes, bytearray, memoryview)):
            raw = bytes(v)
            for a in addrs:
                assert a not in raw, name
            for e in entries:
                assert e not in raw, name
    names = [n for n, _ in held]
    assert "_msg" in names and "_handler" in names and "heard" in names, names
    held_text = "\n".join(r for _, r in held)
    for a in addrs:
        assert a not in bytes(drv._table)
        for f in _forms(a):
            assert f not in text, (a, f)
            assert f not in held_text, (a, f)
    for e in entries:
        for f in _forms(e):
            assert f not in text, f
            assert f not in held_text, f
    for s in salts.given:
        for f in _forms(s):
            assert f not in text, f
    # nothing written to flash, and the table is empty between windows
    assert _walk("/flash") == files_before
    assert not any(drv._table) and not any(drv._used)
    assert bytes(drv._msg[16:]) == bytes(6)
