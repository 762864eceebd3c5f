# The firmware's MQTT client in the MicroPython VM against a real mosquitto,
# reached through the VM's TCP bridge.
import asyncio
import json

from fwenv import env
from node.mqtt import MQTTClient, MQTTError
from sim.vmnet import open_connection

FWTEST_NEEDS = ("broker",)
E = env()
HOST, PORT = E["broker_host"], E["broker_port"]


async def test_connect_publish_qos1_and_receive_own_subscription():
    got = []
    c = MQTTClient("vm-a", open_connection, keepalive=30, on_message=lambda t, m: got.append((t, m)))
    present = await c.connect(HOST, PORT)
    assert c.connected and present == 0
    await c.subscribe("t/vm/#", 1)
    await c.publish("t/vm/one", b"hello", qos=1)
    await c.publish("t/vm/two", json.dumps({"x": 1}), qos=0)
    for _ in range(100):
        if len(got) == 2:
            break
        await asyncio.sleep_ms(10)
    assert got == [(b"t/vm/one", b"hello"), (b"t/vm/two", b'{"x": 1}')], got
    await c.disconnect()
    assert not c.connected


async def test_large_payload_uses_multibyte_length():
    got = []
    c = MQTTClient("vm-big", open_connection, on_message=lambda t, m: got.append(m))
    await c.connect(HOST, PORT)
    await c.subscribe("t/big", 1)
    body = b"x" * 20000
    await c.publish("t/big", body, qos=1)
    for _ in range(200):
        if got:
            break
        await asyncio.sleep_ms(10)
    assert got and got[0] == body
    await c.disconnect()


async def test_last_will_is_published_when_the_node_vanishes():
    got = []
    watcher = MQTTClient("vm-watch", open_connection, on_message=lambda t, m: got.append((t, m)))
    await watcher.connect(HOST, PORT)
    await watcher.subscribe("t/will/#", 1)
    node = MQTTClient("vm-node", open_connection, keepalive=5)
    await node.connect(HOST, PORT, will=("t/will/state", b"offline", False, 1))
    node._close()  # socket dropped without DISCONNECT: the broker must send the will
    for _ in range(300):
        if got:
            break
        await asyncio.sleep_ms(10)
    assert got == [(b"t/will/state", b"offline")], got
    await watcher.disconnect()


async def test_clean_disconnect_sends_no_will():
    got = []
    watcher = MQTTClient("vm-watch2", open_connection, on_message=lambda t, m: got.append(m))
    await watcher.connect(HOST, PORT)
    await watcher.subscribe("t/will2/#", 1)
    node = MQTTClient("vm-node2", open_connection)
    await node.connect(HOST, PORT, will=("t/will2/state", b"offline", False, 1))
    await node.disconnect()
    await asyncio.sleep_ms(300)
    assert got == []
    await watcher.disconnect()


async def test_bad_credentials_and_closed_port_raise_clear_errors():
    c = MQTTClient("vm-x", open_connection)
    try:
        await c.connect(HOST, 1)
        assert False, "connected to a closed port"
    except OSError as e:
        assert "connect to" in str(e)
    assert not c.connected


async def test_publish_when_not_connected_raises():
    c = MQTTClient("vm-y", open_connection)
    try:
        await c.publish("t/x", b"1", qos=1)
        assert False
    except MQTTError as e:
        assert "not connected" in str(e)
