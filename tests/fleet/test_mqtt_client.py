"""fleet/mqtt_client.py against a real mosquitto: a burst is read after one select()."""
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
    c.subscribe("burst/#", qos=1)
    deadline = time.monotonic() + 5
    while not c.is_connected() or c._out_messages or c._out_packet:   # CONNACK and SUBACK
        c.loop(timeout=0.1)
        assert time.monotonic() < deadline
    c.loop(timeout=0.2)
    return c


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
        time.sleep(0.3)                      # all of it is in the subscriber's socket now
        sub.loop(timeout=1.0)
        assert len(got) == per_loop          # paho alone reads one packet per select()
        while len(got) < 200:
            sub.loop(timeout=1.0)
        assert got == [str(i).encode() for i in range(200)]
    finally:
        pub.disconnect()
        pub.loop_stop()
        sub.disconnect()
