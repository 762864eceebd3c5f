# The store-and-forward outbox on the VM's filesystem: order, persistence
# across a simulated reboot, bounds, and torn writes from power loss.
import json
import os

from node.bootinfo import next_boot
from node.outbox import Outbox

_n = [0]


def fresh():
    _n[0] += 1
    return "/flash/ob%d" % _n[0]


def drain(ob):
    out = []
    while True:
        r = ob.peek()
        if r is None:
            return out
        out.append(r)
        ob.ack()


def test_fifo_order_and_ack():
    ob = Outbox(fresh())
    for i in range(5):
        ob.put("iwaki/n1/telemetry", json.dumps({"seq": i}))
    assert ob.depth == 5
    assert ob.peek() == ("iwaki/n1/telemetry", b'{"seq": 0}')
    assert ob.peek() == ("iwaki/n1/telemetry", b'{"seq": 0}')  # peek does not consume
    got = drain(ob)
    assert [json.loads(p)["seq"] for _, p in got] == [0, 1, 2, 3, 4]
    assert ob.depth == 0 and ob.bytes == 0 and ob.peek() is None


def test_survives_reboot_with_acked_messages_gone():
    path = fresh()
    ob = Outbox(path, seg_bytes=200)
    for i in range(20):
        ob.put("t", "m%02d" % i)
    for _ in range(7):
        ob.peek()
        ob.ack()
    # simulated reboot: a new Outbox object on the same files
    ob2 = Outbox(path, seg_bytes=200)
    assert ob2.depth == 13
    assert [p for _, p in drain(ob2)] == [b"m%02d" % i for i in range(7, 20)]
    ob3 = Outbox(path, seg_bytes=200)
    assert ob3.depth == 0 and ob3.peek() is None
    ob3.put("t", "after")
    assert Outbox(path, seg_bytes=200).peek() == ("t", b"after")


def test_unacked_peek_is_sent_again_after_reboot():
    path = fresh()
    ob = Outbox(path)
    ob.put("t", "only")
    assert ob.peek() == ("t", b"only")  # sent, but no PUBACK before power loss
    assert Outbox(path).peek() == ("t", b"only")


def test_bounded_drops_oldest_and_counts_across_reboots():
    path = fresh()
    ob = Outbox(path, max_bytes=1000, seg_bytes=200)
    for i in range(100):
        ob.put("t", "x%03d" % i)
    assert ob.bytes <= 1000
    assert ob.dropped > 0
    assert ob.dropped + ob.depth == 100
    kept = [p for _, p in drain(ob)]
    assert kept[-1] == b"x099"  # the newest are kept
    assert kept == sorted(kept)
    assert Outbox(path, max_bytes=1000, seg_bytes=200).dropped == ob.dropped


def test_torn_last_record_is_skipped_and_appends_continue():
    path = fresh()
    ob = Outbox(path)
    ob.put("t", "good1")
    ob.put("t", "good2")
    seg = path + "/" + [n for n in os.listdir(path) if n.startswith("q")][0]
    with open(seg, "ab") as f:
        f.write(b"1234abcd t half-writ")  # power lost mid-record
    ob2 = Outbox(path)
    ob2.put("t", "good3")
    got = [p for _, p in drain(ob2)]
    assert got == [b"good1", b"good2", b"good3"], got
    assert ob2.corrupt == 1


def test_corrupted_record_fails_its_crc():
    path = fresh()
    ob = Outbox(path)
    ob.put("t", "aaaa")
    ob.put("t", "bbbb")
    seg = path + "/" + [n for n in os.listdir(path) if n.startswith("q")][0]
    with open(seg, "rb") as f:
        data = bytearray(f.read())
    data[data.find(b"aaaa")] = ord("z")  # one flipped byte on flash
    with open(seg, "wb") as f:
        f.write(data)
    ob2 = Outbox(path)
    assert [p for _, p in drain(ob2)] == [b"bbbb"]
    assert ob2.corrupt == 1


def test_oversized_message_refused():
    ob = Outbox(fresh(), max_bytes=1000)
    try:
        ob.put("t", "x" * 600)
        assert False, "accepted a message larger than half the outbox"
    except ValueError as e:
        assert "larger than half" in str(e)
    assert ob.depth == 0


def test_boot_counter_increments_and_survives():
    p = "/flash/bootcount"
    assert next_boot(p) == 1
    assert next_boot(p) == 2
    with open(p + ".tmp", "w") as f:
        f.write("garbage")  # a torn temp file from a power cut is ignored
    assert next_boot(p) == 3
