# The firmware test harness (MicroPython VM) and the broker fixtures.
pytest_plugins = ["tests.harness.mpvm", "tests.harness.broker"]
