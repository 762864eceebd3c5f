"""Host-only hardware simulation (clock, machine, devices) for the MicroPython
VM and CPython. Never bundled onto a board."""
