# The node's side of the MQTT contract (docs/mqtt.md): topics, the common
# envelope, the outbox in front of every durable message, and one connection
# kept up with jittered exponential backoff. Sampling never waits for it.
import asyncio
import json
import random

from node.clock import iso
from node.mqtt import MQTTClient, MQTTError

_BACKOFF_MS = 500
_BACKOFF_MAX_MS = 60000
_IDLE_CHECK_MS = 1000


class Uplink:
    def __init__(self, identity, clock, uptime, outbox, boot, connect, birth, keepalive=60,
                 on_command=None):
        self.node = identity["node"]
        self.base = identity.get("root", "iwaki") + "/" + self.node + "/"
        self.host = identity["broker"]["host"]
        self.port = identity["broker"]["port"]
        self.clock = clock
        self.uptime = uptime
        self.outbox = outbox
        self.boot = boot
        self.birth = birth  # () -> dict: the birth body
        self.on_command = on_command  # (name, args) -> result; raise ValueError to refuse
        self.seq = 0
        self.reconnects = 0
        self.sent = 0
        self.last_error = None
        self.running = True
        self.wake = asyncio.Event()
        self.client = MQTTClient(self.node, connect, user=identity.get("user"),
                                 password=identity.get("password") or None, keepalive=keepalive,
                                 on_message=self._on_message, on_down=self.wake.set)

    def envelope(self, seq):
        utc = self.clock.utc()
        return {"v": 1, "node": self.node, "boot": self.boot, "seq": seq, "ts": iso(utc),
                "clock_set": utc is not None, "up_ms": self.uptime.ms()}

    def publish(self, kind, body):
        """Queue a durable message (telemetry, health, event, reply) in the
        outbox under the next sequence number; returns that number."""
        seq = self.seq
        self.seq = seq + 1
        d = self.envelope(seq)
        d.update(body)
        self.outbox.put(self.base + kind, json.dumps(d))
        self.wake.set()
        return seq

    def _state(self, state, reason):
        d = self.envelope(self.seq)
        d["state"] = state
        d["reason"] = reason
        return json.dumps(d)

    async def run(self):
        attempt = 0
        while self.running:
            try:
                await self._session()
                attempt = 0
            except (OSError, MQTTError, asyncio.TimeoutError) as e:
                self.last_error = repr(e)
            if not self.running:
                break
            self.reconnects += 1
            attempt += 1
            d = min(_BACKOFF_MAX_MS, _BACKOFF_MS << min(attempt, 8))
            await self.clock.sleep_ms(d // 2 + random.getrandbits(16) % (d // 2 + 1))

    async def _session(self):
        c = self.client
        will = (self.base + "state", self._state("offline", "lost"), True, 1)
        await c.connect(self.host, self.port, clean_session=True, will=will)
        await c.subscribe(self.base + "cmd/#", 1)
        b = self.envelope(self.seq)
        b.update(self.birth())
        await c.publish(self.base + "birth", json.dumps(b), retain=True, qos=1)
        await c.publish(self.base + "state", self._state("online", "connected"), retain=True, qos=1)
        while c.connected and self.running:
            rec = self.outbox.peek()
            if rec is None:
                self.wake.clear()
                try:
                    await asyncio.wait_for_ms(self.wake.wait(), _IDLE_CHECK_MS)
                except asyncio.TimeoutError:
                    pass
                continue
            await c.publish(rec[0], rec[1], qos=1)
            self.outbox.ack()
            self.sent += 1
        if self.running:
            raise MQTTError("connection lost")

    async def stop(self):
        """Clean stop: say offline (so the will is not needed) and disconnect."""
        self.running = False
        c = self.client
        if c.connected:
            try:
                await c.publish(self.base + "state", self._state("offline", "shutdown"), retain=True, qos=1)
            except (OSError, MQTTError, asyncio.TimeoutError):
                pass
            await c.disconnect()
        self.wake.set()

    def kill(self):
        """Drop the connection as a power cut would: no DISCONNECT, so the
        broker publishes the last will."""
        self.running = False
        self.client._close()
        self.wake.set()

    def _on_message(self, topic, msg):
        name = topic.decode()[len(self.base) + 4:]
        asyncio.create_task(self._command(name, msg))

    async def _command(self, name, msg):
        cid = "?"
        try:
            d = json.loads(msg)
            cid = str(d["id"])
            if not self.on_command:
                raise ValueError("no commands on this node")
            result = self.on_command(name, d.get("args") or {})
            self.publish("reply", {"id": cid, "ok": True, "result": result})
        except Exception as e:  # a bad command must never stop the node
            self.publish("reply", {"id": cid, "ok": False, "error": "%s: %s" % (name, e)})
