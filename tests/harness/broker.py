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
