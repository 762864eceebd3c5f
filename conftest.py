# The firmware test harness (MicroPython VM) and the broker fixtures.
pytest_plugins = ["tests.harness.mpvm", "tests.harness.broker"]

import signal

import pytest

_TEST_LIMIT_S = 300


@pytest.fixture(autouse=True)
def _time_limit():
    """No test may hang CI: one that runs past the limit fails with a TimeoutError."""
    def expired(signum, frame):
        raise TimeoutError(f"test still running after {_TEST_LIMIT_S} s")
    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(_TEST_LIMIT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)
