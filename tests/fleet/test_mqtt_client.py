"""fleet/mqtt_client.py against a real mosquitto: a burst is read after one select()."""
import fcntl
import termios
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fleet.mqtt_client import Client

pytestmark = pytest.mark.broker


def subscriber(cls, port, got):
    c = cls(CallbackAPIVersion.VERSION2, client_id=f"burst-{cls.__module__}")
    c.on_message = lambda client, userdata, message: got.append(message.payload)
    c.connect("127.0.0.1", port)
    c.subscribe("burst/#", qos=0)      # QoS 0: no in-flight window, the broker sends all at once
    deadline = time.monotonic() + 5
    while not c.is_connected() or c._out_messages or c._out_packet:   # CONNACK and SUBACK
        c.loop(timeout=0.1)
        assert time.monotonic() < deadline
    c.loop(timeout=0.2)
    return c


def pending(client) -> int:
    """Bytes waiting in the client's socket."""
    return int.from_bytes(fcntl.ioctl(client.socket().fileno(), termios.FIONREAD, b"\0\0\0\0"), "little")


@pytest.mark.parametrize("cls, per_loop", [(Client, 200), (mqtt.Client, 1)])
def test_one_loop_reads_every_packet_that_arrived(broker, cls, per_loop):
    got = []
    sub = subscriber(cls, broker.port, got)
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="burst-publisher")
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    try:
        for i in range(200):
            pub.publish(f"burst/{i}", str(i).encode(), qos=1).wait_for_publish(5)
        # wait until all of it is in the subscriber's socket: one PUBLISH is 1 + 1 + 2 + topic + payload bytes
        expected = sum(4 + len(f"burst/{i}") + len(str(i)) for i in range(200))
        deadline = time.monotonic() + 10
        while pending(sub) < expected:
            assert time.monotonic() < deadline, f"{pending(sub)} of {expected} bytes arrived"
            time.sleep(0.02)
        sub.loop(timeout=1.0)
        assert len(got) == per_loop          # paho alone reads one packet per select()
        while len(got) < 200:
            sub.loop(timeout=1.0)
        assert got == [str(i).encode() for i in range(200)]
    finally:
        pub.disconnect()
        pub.loop_stop()
        sub.disconnect()
