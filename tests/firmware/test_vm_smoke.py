# Runs in the MicroPython VM: proves the harness runs MicroPython, not CPython.
import sys


def test_runs_in_micropython():
    assert sys.implementation.name == "micropython", sys.implementation.name


async def test_async_tests_are_awaited():
    import asyncio
    await asyncio.sleep_ms(1)
