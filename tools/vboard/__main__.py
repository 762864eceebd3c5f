"""python -m tools.vboard: run a virtual ESP32 on a pseudo-terminal.

The first line on standard output is the port's path (open it with mpremote,
esptool or a terminal); after an unplug/plug the new path follows on its own
line. What the board does is logged on standard error. Stops on Ctrl-C or
SIGTERM. See docs/hil.md.
"""
from __future__ import annotations

import argparse
import signal
import sys

from tools.vboard.board import VBoard, VBoardError
from tools.vboard.rom import CHIPS

PROG = "tools.vboard"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="A virtual ESP32 on a pseudo-terminal: "
                                 "MicroPython for mpremote, the ROM bootloader for esptool.")
    ap.add_argument("--board", required=True, metavar="board.toml",
                    help="board profile: the chip and the sensors that are simulated")
    ap.add_argument("--state", metavar="DIR",
                    help="where the board keeps its filesystem (DIR/fs), flash (DIR/flash.bin) "
                         "and MAC; default: a temporary directory removed at exit")
    ap.add_argument("--control", metavar="SOCKET",
                    help="the rig's control socket (default: DIR/control.sock)")
    ap.add_argument("--chip", choices=sorted(CHIPS),
                    help="the chip the bootloader answers as (default: the board profile's)")
    ap.add_argument("--scenario", choices=("live", "still"), default="live",
                    help="live: the simulated surroundings change every second (weather, "
                         "people, river...); still: they keep their first values")
    ap.add_argument("--link", metavar="PATH",
                    help="a symlink kept pointing at the current port (it may change after unplug/plug)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        board = VBoard(args.board, state_dir=args.state, control=args.control, chip=args.chip,
                       scenario=args.scenario, link=args.link)
        path = board.start()
    except VBoardError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    print(path, flush=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: board.stop())
    try:
        board.run()
    finally:
        board.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
