"""paho-mqtt's client, reading every packet a burst brought after one select().

paho 2.2's network loop reads one packet per `select()` unless it has QoS 2
or outgoing messages in flight. The fleet's subscriber and the relay's
platform client receive bursts (thousands of node messages, hundreds of
PUBACKs), so `Client.loop_read` reads on until the socket is empty (or
`BURST` packets), the same way paho's own loop does for each packet. It
uses paho's `_packet_read` and `_loop_rc_handle`, which is why paho-mqtt
is pinned; `tests/fleet/test_mqtt_client.py` checks the behaviour.
"""
from __future__ import annotations

import paho.mqtt.client as mqtt

#: Most packets read after one select(), so writes (acknowledgements) are never held back long.
BURST = 1000


class Client(mqtt.Client):
    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        for _ in range(max(max_packets, BURST)):
            if self._sock is None:
                return mqtt.MQTTErrorCode.MQTT_ERR_NO_CONN
            rc = self._packet_read()
            if rc > 0:
                return self._loop_rc_handle(rc)
            if rc == mqtt.MQTTErrorCode.MQTT_ERR_AGAIN:
                break
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS
