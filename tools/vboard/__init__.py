"""A virtual ESP32 on a pseudo-terminal, for HIL tests and provisioning
without hardware (docs/hil.md).

    python -m tools.vboard --board boards/env-station.toml --state DIR

The real mpremote talks to its MicroPython (the pinned VM running the board's
filesystem, with the board profile's sensors simulated by firmware/sim); the
real esptool talks to its ROM bootloader and flashes ``DIR/flash.bin``; a rig
drives pins, ADC levels and faults over ``DIR/control.sock``
(tools/vboard/control.py).
"""
from tools.vboard.board import VBoard, VBoardError

__all__ = ["VBoard", "VBoardError"]
