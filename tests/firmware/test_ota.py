# The node's OTA pieces in the MicroPython VM: versions and manifests, the
# slot selection in boot.py, the simulated esp32.Partition and its bootloader,
# and every refusal of a real signed release served over HTTP on loopback
# (tests/harness/ota.py) -- each answered on the reply topic, with the running
# version untouched.
import json
import os

import boot
from fwenv import env
from node.config import ConfigError, check_identity, check_profile, load_profile
from node.ota import OTAError, parse_manifest, read_state, version_tuple, write_json
from sim.clock import SimClock
from sim.esp32 import Flash
from sim.virtual import make_board
from sim.vmnet import open_connection

FWTEST_NEEDS = ("ota",)
E = env()["ota"]
KEY = E["keys"][0]
SHA = "ab" * 32


def raises(fn, exc, text=""):
    try:
        fn()
    except exc as e:
        assert text in str(e), "%r does not say %r" % (str(e), text)
        return e
    raise AssertionError("%s not raised" % exc.__name__)


def profile():
    p = load_profile("/boards/env-station.json")
    p["sensors"] = [s for s in p["sensors"] if s["kind"] == "bme280"]
    p["sensors"][0]["period_ms"] = 50
    p["report"]["deadband"] = {"temp_c": 0.2}
    return check_profile(p)


def make_node(root, keys=None, esp32=None, **ident):
    from node.app import Node
    try:
        os.mkdir(root)
    except OSError:
        pass
    clock = SimClock(utc=1795000000)
    i = {"node": "vm-ota", "user": "vm-ota", "password": "", "broker": {"host": "127.0.0.1", "port": 1}}
    keys = [KEY] if keys is None else keys
    if keys:
        i["ota_keys"] = keys
    i.update(ident)
    m, _ = make_board(profile(), clock, b"\x24\x6f\x28\x00\x00\x07")
    n = Node(m, clock, profile(), check_identity(i), root, open_connection, esp32=esp32)
    n.ota.backoff_ms = 1
    return n


def replies(node):
    out = []
    while True:
        r = node.outbox.peek()
        if r is None:
            return out
        node.outbox.ack()
        if r[0].endswith("/reply"):
            out.append(json.loads(r[1]))


async def update(node, version, **args):
    a = {"url": E["base"] + version + "/", "version": version}
    a.update(args)
    first = node.ota.command("c-" + version, a)
    await node.ota.task
    return first, replies(node)


def manifest(**kw):
    m = {"v": 1, "kind": "bundle", "version": "1.2.0", "boards": ["env-station"], "min_version": None,
         "key_id": "0" * 16, "files": [{"path": "node/app.mpy", "size": 3, "sha256": SHA}], "total_size": 3}
    m.update(kw)
    return json.dumps(m).encode()


def test_versions_compare_as_dotted_integers():
    assert version_tuple("1.10.0") > version_tuple("1.9.3")
    assert version_tuple("1.2") == version_tuple("1.2.0.0")
    assert version_tuple("2.0.0") > version_tuple("1.99.99")
    for bad in ("", "1..2", "1.x", "-1.0", "v1.0", None, 1, "1.2.3 "):
        raises(lambda: version_tuple(bad), OTAError, "not dotted integers")


def test_manifest_is_checked_field_by_field():
    m = parse_manifest(manifest())
    assert m["version"] == "1.2.0" and m["files"][0]["path"] == "node/app.mpy"
    cases = [
        (b"{nope", "not JSON"),
        (manifest(v=2), "not a version 1 manifest"),
        (manifest(kind="zip"), "kind 'zip'"),
        (manifest(version="1.2.x"), "not dotted integers"),
        (manifest(min_version="abc"), "not dotted integers"),
        (manifest(boards=[]), "boards"),
        (manifest(files=[]), "no files"),
        (manifest(files=[{"path": "../boot.py", "size": 3, "sha256": SHA}]), "file path"),
        (manifest(files=[{"path": "/boot.py", "size": 3, "sha256": SHA}]), "file path"),
        (manifest(files=[{"path": "node/a.py.part", "size": 3, "sha256": SHA}]), "file path"),
        (manifest(files=[{"path": "node/a b.py", "size": 3, "sha256": SHA}]), "file path"),
        (manifest(files=[{"path": "a.py", "size": -1, "sha256": SHA}]), "size of a.py"),
        (manifest(files=[{"path": "a.py", "size": 3, "sha256": "AB" * 32}]), "sha256 of a.py"),
        (manifest(total_size=4), "total_size"),
        (manifest(kind="image", files=[{"path": "a.bin", "size": 3, "sha256": SHA},
                                       {"path": "b.bin", "size": 0, "sha256": SHA}]), "exactly one file"),
        (manifest(ota_keys=["xy"]), "ota_keys"),
    ]
    for data, text in cases:
        raises(lambda: parse_manifest(data), OTAError, text)


def test_identity_takes_ota_keys_and_fleet_url():
    base = {"node": "n-1", "user": "n-1", "password": "", "broker": {"host": "h"}}
    d = dict(base, ota_keys=[KEY], fleet_url="http://fleet.local:8080")
    out = check_identity(d)
    assert out["ota_keys"] == [KEY] and out["fleet_url"] == "http://fleet.local:8080"
    assert check_identity(dict(base, ota_keys=[]))["ota_keys"] == []  # takes no updates ("no keys")
    raises(lambda: check_identity(dict(base, ota_keys=[KEY] * 9)), ConfigError, "at most 8")
    raises(lambda: check_identity(dict(base, ota_keys=[KEY.upper()])), ConfigError, "ota_keys[0]")
    raises(lambda: check_identity(dict(base, ota_keys=KEY)), ConfigError, "must be an array")
    raises(lambda: check_identity(dict(base, fleet_url="https://x")), ConfigError, "not an http:// URL")


def test_boot_selects_the_slot_counts_trial_boots_and_rolls_back_after_three():
    root = "/flash/sel"
    os.mkdir(root)
    assert boot.select(root) == ("root", False)  # factory: no /ota at all
    os.mkdir(root + "/ota")
    for slot in ("a", "b"):
        os.mkdir(root + "/ota/" + slot)
        os.mkdir(root + "/ota/%s/node" % slot)
        with open(root + "/ota/%s/main.py" % slot, "w") as f:
            f.write("")
    st = {"active": "a", "version": "1.0.0", "trial": None, "previous": None}
    write_json(root + "/ota/state.json", st)
    assert boot.select(root) == ("a", False)
    st["trial"] = {"kind": "bundle", "slot": "b", "version": "1.1.0", "boots": 0, "id": "d-1", "from": "1.0.0"}
    write_json(root + "/ota/state.json", st)
    for n in (1, 2, 3):
        assert boot.select(root) == ("b", True)
        assert read_state(root)["trial"]["boots"] == n
    assert boot.select(root) == ("a", False)  # 4th boot: the trial never committed
    s = read_state(root)
    assert s["trial"] is None and s["active"] == "a"
    assert s["last"]["state"] == "rolled_back" and s["last"]["version"] == "1.1.0"
    assert "3 trial boots" in s["last"]["reason"] and s["last"]["told"] is False
    assert "state.tmp" not in os.listdir(root + "/ota")
    # a slot whose code is gone boots the factory code; an unreadable state too
    os.remove(root + "/ota/a/main.py")
    assert boot.select(root) == ("root", False)
    with open(root + "/ota/state.json", "w") as f:
        f.write("{torn")
    assert boot.select(root) == ("root", False)


def test_simulated_bootloader_rolls_back_an_image_never_marked_valid():
    f = Flash("/flash/part1", size=16384, image=b"\xe9old")
    P = f.Partition
    assert P(P.RUNNING).info()[4] == "ota_0" and f.state()["state"] == "valid"
    nxt = P(P.RUNNING).get_next_update()
    assert nxt.info()[4] == "ota_1" and nxt.ioctl(4, 0) == 4 and nxt.ioctl(5, 0) == 4096
    buf = bytearray(b"\x00" * 4096)
    nxt.writeblocks(0, buf)
    raises(nxt.set_boot, OSError)  # not an image: the bootloader keeps the old one
    buf[0] = 0xE9
    nxt.writeblocks(0, buf)
    nxt.set_boot()
    assert f.boot() == "ota_1" and f.state()["state"] == "pending_verify"
    assert f.boot() == "ota_0" and f.rolled_back == "ota_1"  # reset before it was confirmed
    nxt.set_boot()
    assert f.boot() == "ota_1"
    P.mark_app_valid_cancel_rollback()
    assert f.boot() == "ota_1" and f.state()["state"] == "valid"
    back = bytearray(4)
    nxt.readblocks(0, back)
    assert back == b"\xe9\x00\x00\x00"
    raises(lambda: nxt.writeblocks(4, buf), OSError)  # past the partition's end


async def test_refusals_are_replied_and_leave_the_node_untouched():
    n = make_node("/flash/ref")
    cases = [
        ("2.1.0", {}, "wrong board: 2.1.0 is for river-station, this node is env-station"),
        ("2.2.0", {}, "unknown key"),
        ("2.2.1", {}, "bad signature"),
        ("2.3.0", {}, "below min_version: 2.3.0 needs 1.5.0 or later, this node runs 0.1.0"),
        ("0.0.5", {}, "downgrade: 0.0.5 is not newer than the running 0.1.0"),
        ("2.4.0", {}, "hash mismatch: node/x.py"),
        ("9.9.9", {}, "network: HTTP 404"),
    ]
    for version, args, reason in cases:
        first, rs = await update(n, version, **args)
        assert first["ota"]["state"] == "downloading" and first["ota"]["from"] == "0.1.0"
        last = rs[-1]
        assert last["id"] == "c-" + version and last["ok"] is False, rs
        o = last["result"]["ota"]
        assert o["state"] == "failed" and reason in o["reason"], o
        assert last["error"].startswith("ota failed: ")
        assert read_state("/flash/ref")["trial"] is None and n.reboot_reason is None
    # nothing switched; the file that did not match is not kept, even partly
    assert "state.json" not in os.listdir("/flash/ref/ota")
    assert os.listdir("/flash/ref/ota/a/node") == [], os.listdir("/flash/ref/ota/a/node")
    # nobody listening: a network failure after the retries
    first, rs = await update(n, "2.0.0", url="http://127.0.0.1:1/ota/releases/2.0.0/")
    assert rs[-1]["result"]["ota"]["reason"].startswith("network: cannot connect"), rs
    # bad arguments are an error reply at once
    n.ota.on_message(b'{"v": 1, "id": "c-x", "args": {"version": "1.x", "url": "http://h/"}}')
    n.ota.on_message(b'{"v": 1, "id": "c-y", "args": {"version": "3.0.0"}}')
    bad = replies(n)
    assert [r["ok"] for r in bad] == [False, False]
    assert "not dotted integers" in bad[0]["error"] and "no fleet_url" in bad[1]["error"]


async def test_no_keys_and_no_space_are_refused():
    n = make_node("/flash/nokeys", keys=[])
    assert n.ota.trusted() == []
    _, rs = await update(n, "2.0.0")
    assert "no keys" in rs[-1]["result"]["ota"]["reason"], rs
    n = make_node("/flash/full")
    n.ota.statvfs = lambda p: (4096, 4096, 512, 30, 30, 0, 0, 0, 0, 255)  # 120 KiB free
    _, rs = await update(n, "2.0.0")
    o = rs[-1]["result"]["ota"]
    assert o["state"] == "failed" and o["reason"].startswith("no space: the update needs"), o
    assert read_state("/flash/full")["trial"] is None


async def test_forced_downgrade_is_staged_from_fleet_url():
    n = make_node("/flash/force", fleet_url=E["base"][:-len("/ota/releases/")])
    first = n.ota.command("c-f", {"version": "0.0.5", "force": True})
    await n.ota.task
    rs = replies(n)
    assert [r["result"]["ota"]["state"] for r in rs] == ["downloading", "verifying", "staged"], rs
    t = read_state("/flash/force")["trial"]
    assert t["slot"] == "a" and t["version"] == "0.0.5" and t["boots"] == 0 and t["from"] == "0.1.0"
    assert t["id"] == "c-f" and t["deadline_s"] == 120
    with open("/flash/force/ota/a/main.py") as f:
        assert f.read() == "print(1)\n"
    assert n.reboot_reason and not n.running  # the loop ends and the board resets
    assert sorted(os.listdir("/flash/force/ota")) == ["a", "state.json"]  # progress record gone
    # while a trial is pending, another version is refused
    n.ota.trial = t
    raises(lambda: n.ota.command("c-g", {"version": "3.0.0", "url": "http://h/"}), ValueError, "busy")


async def test_http_client_reads_ranges_and_chunked_bodies_and_refuses_bad_answers():
    from node import http
    url = E["base"] + "2.0.0/manifest.json"
    whole = await http.fetch(open_connection, url, 65536)
    assert json.loads(whole)["version"] == "2.0.0"
    chunked = await http.fetch(open_connection, url.replace("/ota/", "/chunked/ota/"), 65536)
    assert chunked == whole and len(whole) > 700  # several chunks
    r = await http.get(open_connection, url, 100)
    assert r.status == 206 and r.start == 100 and r.length == len(whole) - 100
    assert await r.read(len(whole)) == whole[100:] and await r.read(10) == b""
    r.close()
    e = None
    try:
        await http.get(open_connection, url, len(whole) + 5)
    except http.HTTPError as x:
        e = x
    assert e is not None and e.status == 416
    for bad, text in (("https://h/x", "not an http:// URL"), ("http://h:99999/", "bad port"),
                      ("http://:80/", "bad host")):
        raises(lambda: http.split_url(bad), http.HTTPError, text)
    assert http.split_url("http://fleet.local/ota/") == ("fleet.local", 80, "/ota/")
    e = None
    try:
        await http.fetch(open_connection, url, 100)
    except http.HTTPError as x:
        e = x
    assert e is not None and "more than 100" in str(e)
