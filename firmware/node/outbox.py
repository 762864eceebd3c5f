# Store-and-forward outbox on flash: messages wait here until the broker has
# acknowledged them (QoS 1), across broker outages, reboots and power loss.
#
# Layout under <dir>/: segment files qNNNNNN of records, one per line:
#   <crc32 8 hex> <topic> <payload>\n
# a "head" file "<segment> <offset>" naming the oldest unacknowledged record
# (replaced atomically by rename), and "dropped", the count of records ever
# dropped because the outbox was full. A torn last record (power lost while
# writing) fails its CRC and is skipped and counted, never sent.
import os
from binascii import crc32


def _exists(p):
    try:
        os.stat(p)
        return True
    except OSError:
        return False


def _write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)


def _read_int_pair(path):
    try:
        with open(path) as f:
            a, b = f.read().split()
        return int(a), int(b)
    except (OSError, ValueError):
        return None


class Outbox:
    def __init__(self, path, max_bytes=262144, seg_bytes=4096):
        self.dir = path
        self.max_bytes = max_bytes
        self.seg_bytes = seg_bytes
        try:
            os.mkdir(path)
        except OSError:
            pass
        self.segs = sorted(int(n[1:]) for n in os.listdir(path) if n[0] == "q" and n[1:].isdigit())
        head = _read_int_pair(path + "/head")
        self.head_seg, self.head_off = head if head else (self.segs[0] if self.segs else 0, 0)
        self.segs = [s for s in self.segs if s >= self.head_seg]
        for n in os.listdir(path):  # segments before the head were fully acknowledged
            if n[0] == "q" and n[1:].isdigit() and int(n[1:]) < self.head_seg:
                os.remove(path + "/" + n)
        d = _read_int_pair(path + "/dropped")
        self.dropped = d[0] if d else 0
        self.corrupt = 0
        self.depth = 0
        self.bytes = 0
        self._peeked = None
        for s in self.segs:
            size = os.stat(self._seg(s))[6]
            self.bytes += size - (self.head_off if s == self.head_seg else 0)
            self.depth += self._count(s, self.head_off if s == self.head_seg else 0)
        # never append after a torn record: start a fresh segment
        self.tail_seg = self.segs[-1] if self.segs else self.head_seg
        self.tail_size = os.stat(self._seg(self.tail_seg))[6] if self.segs else 0
        if self.segs and not self._ends_clean(self.tail_seg):
            self._new_segment()

    def _seg(self, s):
        return "%s/q%06d" % (self.dir, s)

    def _count(self, s, off):
        n = 0
        with open(self._seg(s), "rb") as f:
            f.seek(off)
            for line in f:
                n += 1
        return n

    def _ends_clean(self, s):
        with open(self._seg(s), "rb") as f:
            size = f.seek(0, 2)
            if not size:
                return True
            f.seek(size - 1)
            return f.read(1) == b"\n"

    def _new_segment(self):
        self.tail_seg += 1
        self.tail_size = 0
        if not self.segs:  # empty outbox: the new segment is also the head
            self.head_seg = self.tail_seg
            self.head_off = 0
        self.segs.append(self.tail_seg)

    def put(self, topic, payload):
        """Append one message (topic str, payload bytes or str)."""
        if isinstance(payload, str):
            payload = payload.encode()
        body = topic.encode() + b" " + payload
        rec = b"%08x " % crc32(body) + body + b"\n"
        if len(rec) > self.max_bytes // 2:
            raise ValueError("message of %d bytes is larger than half the outbox" % len(rec))
        while self.bytes + len(rec) > self.max_bytes and len(self.segs) > 1:
            self._drop_oldest()
        if not self.segs or self.tail_size + len(rec) > self.seg_bytes and self.tail_size:
            self._new_segment()
        with open(self._seg(self.tail_seg), "ab") as f:
            f.write(rec)
        self.tail_size += len(rec)
        self.bytes += len(rec)
        self.depth += 1

    def _drop_oldest(self):
        s = self.segs.pop(0)
        off = self.head_off
        n = self._count(s, off)
        self.bytes -= os.stat(self._seg(s))[6] - off
        os.remove(self._seg(s))
        self.depth -= n
        self.dropped += n
        _write_atomic(self.dir + "/dropped", "%d 0" % self.dropped)
        self.head_seg = self.segs[0] if self.segs else self.tail_seg
        self.head_off = 0
        self._peeked = None
        self._save_head()

    def peek(self):
        """The oldest unacknowledged (topic, payload bytes), or None."""
        while self._peeked is None and self.depth > 0 and self.segs:
            s = self.segs[0]
            with open(self._seg(s), "rb") as f:
                f.seek(self.head_off)
                line = f.readline()
            if not line:
                if len(self.segs) == 1:
                    return None
                self._advance(None)
                continue
            nxt = self.head_off + len(line)
            rec = self._parse(line)
            if rec is None:  # torn or corrupted: skip it for good
                self.corrupt += 1
                self.depth -= 1
                self.bytes -= len(line)
                self.head_off = nxt
                self._save_head()
                continue
            self._peeked = (rec[0], rec[1], nxt, len(line))
        if self._peeked is None:
            return None
        return self._peeked[0], self._peeked[1]

    @staticmethod
    def _parse(line):
        if len(line) < 12 or line[-1:] != b"\n" or line[8:9] != b" ":
            return None
        body = line[9:-1]
        try:
            if int(line[:8], 16) != crc32(body):
                return None
        except ValueError:
            return None
        sp = body.find(b" ")
        if sp < 1:
            return None
        return body[:sp].decode(), body[sp + 1:]

    def ack(self):
        """The peeked message was delivered: forget it."""
        if self._peeked is None:
            return
        _, _, nxt, size = self._peeked
        self._peeked = None
        self.depth -= 1
        self.bytes -= size
        self.head_off = nxt
        if self.depth == 0 or self.head_off >= os.stat(self._seg(self.segs[0]))[6] and len(self.segs) > 1:
            self._advance(None)
        else:
            self._save_head()

    def _advance(self, _):
        # the head segment is exhausted: remove it (keep the tail for appends)
        if len(self.segs) > 1:
            os.remove(self._seg(self.segs.pop(0)))
            self.head_seg = self.segs[0]
            self.head_off = 0
        self._save_head()

    def _save_head(self):
        _write_atomic(self.dir + "/head", "%d %d" % (self.head_seg, self.head_off))
