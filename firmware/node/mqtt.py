# asyncio MQTT 3.1.1 client: QoS 0 and 1, retained, last will, keepalive.
# One connection per instance; reconnecting is the caller's job (node.uplink),
# in the way umqtt.robust extends umqtt.simple.
import asyncio
import struct
import time
from micropython import const

_CONNECT = const(0x10)
_CONNACK = const(0x20)
_PUBLISH = const(0x30)
_PUBACK = const(0x40)
_SUBSCRIBE = const(0x82)
_SUBACK = const(0x90)
_PINGREQ = const(0xC0)
_PINGRESP = const(0xD0)
_DISCONNECT = const(0xE0)

_REFUSED = ("", "unacceptable protocol version", "client id rejected", "server unavailable",
            "bad user name or password", "not authorised")


class MQTTError(Exception):
    pass


def _varlen(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | 0x80 if n else b)
        if not n:
            return out


def _str(s):
    if isinstance(s, str):
        s = s.encode()
    return struct.pack("!H", len(s)) + s


class MQTTClient:
    """connect(host, port) must be an async function returning (reader, writer)
    streams with readexactly/write/drain/close: asyncio.open_connection on a
    board and under CPython, a bridge in the MicroPython VM."""

    def __init__(self, client_id, connect, user=None, password=None, keepalive=60,
                 on_message=None, on_down=None, timeout_ms=10000):
        self.client_id = client_id
        self._open = connect
        self.user = user
        self.password = password
        self.keepalive = keepalive
        self.on_message = on_message
        self.on_down = on_down  # called once when a connection is lost
        self.timeout_ms = timeout_ms
        self.connected = False
        self._r = self._w = None
        self._pid = 0
        self._acks = {}  # pid -> asyncio.Event
        self._lock = asyncio.Lock()
        self._tasks = []
        self._last_rx = 0

    async def connect(self, host, port, clean_session=True, will=None):
        # will: (topic, message, retain, qos)
        self._r, self._w = await asyncio.wait_for_ms(self._open(host, port), self.timeout_ms)
        flags = 0x02 if clean_session else 0
        body = bytearray(b"\x00\x04MQTT\x04\x00") + struct.pack("!H", self.keepalive) + _str(self.client_id)
        if will:
            flags |= 0x04 | (will[3] & 3) << 3 | (0x20 if will[2] else 0)
            body += _str(will[0]) + _str(will[1])
        if self.user is not None:
            flags |= 0x80
            body += _str(self.user)
            if self.password is not None:
                flags |= 0x40
                body += _str(self.password)
        body[7] = flags
        await self._send(bytes([_CONNECT]) + _varlen(len(body)) + body)
        head = await asyncio.wait_for_ms(self._r.readexactly(4), self.timeout_ms)
        if head[0] != _CONNACK or head[1] != 2:
            self._close()
            raise MQTTError("bad CONNACK")
        if head[3]:
            self._close()
            code = head[3]
            raise MQTTError("connection refused: " + (_REFUSED[code] if code < len(_REFUSED) else str(code)))
        self.connected = True
        self._last_rx = time.ticks_ms()
        self._tasks = [asyncio.create_task(self._reader()), asyncio.create_task(self._pinger())]
        return head[2] & 1  # session present

    async def publish(self, topic, msg, retain=False, qos=0):
        if not self.connected:
            raise MQTTError("not connected")
        if isinstance(topic, str):
            topic = topic.encode()
        if isinstance(msg, str):
            msg = msg.encode()
        pid = b""
        if qos:
            self._pid = self._pid % 65535 + 1
            pid = struct.pack("!H", self._pid)
            ev = asyncio.Event()
            self._acks[self._pid] = ev
        n = 2 + len(topic) + len(pid) + len(msg)
        await self._send(bytes([_PUBLISH | qos << 1 | (1 if retain else 0)]) + _varlen(n)
                         + struct.pack("!H", len(topic)) + topic + pid + msg)
        if qos:
            await self._wait_ack(self._pid, ev)

    async def subscribe(self, topic, qos=1):
        if isinstance(topic, str):
            topic = topic.encode()
        self._pid = self._pid % 65535 + 1
        ev = asyncio.Event()
        self._acks[self._pid] = ev
        body = struct.pack("!H", self._pid) + _str(topic) + bytes([qos])
        await self._send(bytes([_SUBSCRIBE]) + _varlen(len(body)) + body)
        await self._wait_ack(self._pid, ev)

    async def disconnect(self):
        if self.connected:
            try:
                await self._send(b"\xe0\x00")
            except Exception:
                pass
        self._close()

    async def _wait_ack(self, pid, ev):
        try:
            await asyncio.wait_for_ms(ev.wait(), self.timeout_ms)
        except asyncio.TimeoutError:
            self._close()
            raise MQTTError("no acknowledgement within %d ms" % self.timeout_ms)
        finally:
            self._acks.pop(pid, None)
        if not self.connected:
            raise MQTTError("connection lost before acknowledgement")

    async def _send(self, pkt):
        async with self._lock:
            try:
                self._w.write(pkt)
                await self._w.drain()
            except Exception as e:
                self._close()
                raise MQTTError("send failed: %r" % (e,))

    async def _reader(self):
        r = self._r
        try:
            while self.connected:
                b = await r.readexactly(1)
                t = b[0]
                n = sh = 0
                while True:
                    c = (await r.readexactly(1))[0]
                    n |= (c & 0x7F) << sh
                    sh += 7
                    if not c & 0x80:
                        break
                body = await r.readexactly(n) if n else b""
                self._last_rx = time.ticks_ms()
                kind = t & 0xF0
                if kind == _PUBLISH:
                    await self._on_publish(t, body)
                elif kind in (_PUBACK, _SUBACK):
                    ev = self._acks.get(struct.unpack("!H", body[:2])[0])
                    if ev:
                        ev.set()
        except Exception:
            pass
        self._close()

    async def _on_publish(self, t, body):
        tl = struct.unpack("!H", body[:2])[0]
        topic = body[2:2 + tl]
        pos = 2 + tl
        qos = (t >> 1) & 3
        if qos:
            pid = body[pos:pos + 2]
            pos += 2
            await self._send(b"\x40\x02" + pid)
        if self.on_message:
            self.on_message(bytes(topic), bytes(body[pos:]))

    async def _pinger(self):
        ka = self.keepalive * 1000
        while self.connected:
            await asyncio.sleep_ms(ka // 4)
            if not self.connected:
                break
            if time.ticks_diff(time.ticks_ms(), self._last_rx) > ka * 3 // 2:
                self._close()  # the broker went silent
                break
            try:
                await self._send(b"\xc0\x00")
            except MQTTError:
                break

    def _close(self):
        was = self.connected
        self.connected = False
        if self._w:
            try:
                self._w.close()
            except Exception:
                pass
        for ev in self._acks.values():
            ev.set()  # waiters see connected == False
        me = asyncio.current_task() if hasattr(asyncio, "current_task") else None
        for t in self._tasks:
            if t is not me:
                try:
                    t.cancel()
                except Exception:
                    pass
        self._tasks = []
        if was and self.on_down:
            self.on_down()
