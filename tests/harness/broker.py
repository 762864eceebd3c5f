"""Fixtures: a real mosquitto on a free loopback port, stopped afterwards."""
from __future__ import annotations

import pytest

from fleet.mosquitto import BrokerError, Mosquitto


@pytest.fixture
def broker(tmp_path):
    """A fresh mosquitto for one test (restartable on the same port)."""
    b = Mosquitto(tmp_path / "broker")
    try:
        b.start()
    except BrokerError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield b
    b.stop()


def subscribe(client, topic: str, qos: int = 1, timeout: float = 5.0) -> None:
    """Subscribe a running paho client and wait for the broker's SUBACK.

    A message published before the SUBACK can reach nobody, so tests wait
    for it instead of sleeping and hoping."""
    import threading

    acked = threading.Event()
    previous = client.on_subscribe
    client.on_subscribe = lambda *a: acked.set()
    try:
        client.subscribe(topic, qos=qos)
        if not acked.wait(timeout):
            raise AssertionError(f"the broker did not acknowledge the subscription to {topic} within {timeout:g} s")
    finally:
        client.on_subscribe = previous
