"""Flash a MicroPython image onto a board's SPI flash with esptool.

    python -m tools.flash --port /dev/ttyUSB0 --image ESP32_GENERIC-20250415-v1.25.0.bin

Detects the chip on the ROM bootloader, checks the image is an ESP image for
that chip, erases the whole flash, writes the image at the chip's offset
(0x1000 on the ESP32, 0x0 on the ESP32-S3 and -C3; `--offset` overrides),
verifies it (MD5 computed by the chip) and resets the board. The Python
function is `flash()`; it takes a `progress(done, total)` callback. Every
problem a technician can fix is a `FlashError` with what to do; the command
prints `tools.flash: <message>` and exits 1.

Uses esptool's Python API (`esptool.cmds`, pinned 5.6.0). `--before
no-reset --no-stub` talks to a board that is already in its bootloader and
without esptool's RAM stub (slower, but the only way for the virtual board).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

PROG = "tools.flash"
ESP_IMAGE_MAGIC = 0xE9
_HEADER = 24  # the image header: magic, segments, flash mode/size, entry, extended header (chip id at 12)
SECTOR = 0x1000


class FlashError(Exception):
    """The port, the image or the board is not what flashing needs; the message says what to do."""


def read_image(path: str | os.PathLike) -> bytes:
    """The image's bytes, if it is an ESP image (first byte 0xE9); FlashError otherwise."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise FlashError(f"image {p}: file not found") from None
    except IsADirectoryError:
        raise FlashError(f"image {p}: is a directory, not an image file") from None
    except OSError as exc:
        raise FlashError(f"image {p}: cannot read it ({exc.strerror or exc})") from None
    if not data:
        raise FlashError(f"image {p}: the file is empty (an interrupted download?)")
    if data[0] != ESP_IMAGE_MAGIC or len(data) < _HEADER:
        raise FlashError(f"image {p}: not an ESP image (first byte 0x{data[0]:02x}, an ESP image starts with "
                         "0xE9); use MicroPython's .bin for the board's chip, not a .uf2, .elf, .hex or .zip")
    return data


def image_chip_id(data: bytes) -> int:
    """The chip id in the image's extended header (0 ESP32, 9 ESP32-S3, 5 ESP32-C3)."""
    return int.from_bytes(data[12:14], "little")


def chip_key(name: str) -> str:
    """'ESP32-S3' or 'esp32s3' -> 'esp32s3' (the boards' `chip` spelling)."""
    return name.lower().replace("-", "").replace("_", "")


def check_port(port: str) -> None:
    """FlashError when `port` is a device path that does not exist (URLs like rfc2217:// pass)."""
    if not port:
        raise FlashError("no port given: pass --port /dev/ttyUSB0 (see `ls /dev/ttyUSB* /dev/ttyACM*`)")
    if "://" not in port and not os.path.exists(port):
        raise FlashError(f"port {port}: no such device; is the board plugged in? "
                         "(`ls /dev/ttyUSB* /dev/ttyACM*` lists the serial ports)")


@contextlib.contextmanager
def _esptool_output(progress: Callable[[int, int], None] | None, verbose: bool):
    """Route esptool's messages to stderr (only with `verbose`) and its progress to `progress`."""
    from esp_pylib.logger import EspLog, EspLogBase

    class Logger(EspLogBase):
        def _say(self, *args, **kwargs):
            if verbose:
                print(*args, file=sys.stderr)

        print = note = hint = debug = _say

        def warn(self, *args, suggestion=None):
            text = " ".join(str(a) for a in args)
            if verbose or "NOT reset" not in text:  # a port without RTS: flash() says so itself
                print("esptool:", text, file=sys.stderr)

        err = warn

        def set_verbosity(self, mode):
            pass

        def progress_bar(self, cur_iter, total_iters, prefix="", suffix="", bar_length=30):
            if progress:
                progress(cur_iter, total_iters)

    saved = EspLog.instance
    EspLog.instance = Logger()
    try:
        yield
    finally:
        EspLog.instance = saved


def _connect(port: str, before: str):
    from esptool.cmds import detect_chip
    try:
        return detect_chip(port, connect_mode=before, connect_attempts=3 if before != "no-reset" else 1)
    except Exception as exc:  # esptool raises FatalError, pyserial SerialException/OSError
        raise _translate(exc, port, "connecting") from None


def _translate(exc: Exception, port: str, doing: str) -> FlashError:
    import serial
    from esptool.util import FatalError
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, (serial.SerialException, OSError)) and not os.path.exists(port) and "://" not in port:
        return FlashError(f"port {port} went away while {doing} (board unplugged?); plug it back in and "
                          "run the command again: the whole image is written again")
    if isinstance(exc, FatalError) and ("Failed to connect" in text or "No serial data" in text
                                        or "Invalid head of packet" in text):
        return FlashError(f"no answer from the ROM bootloader on {port} while {doing}: hold BOOT (GPIO 0), "
                          "press and release EN, release BOOT and try again; check the USB cable carries data "
                          f"(esptool: {text.splitlines()[0]})")
    if isinstance(exc, (serial.SerialException, OSError)):
        return FlashError(f"port {port}: {text} while {doing} (is another program, a monitor or mpremote, "
                          "using the port?)")
    return FlashError(f"{doing} failed on {port}: {text}")


def flash(port: str, image: str | os.PathLike, offset: int | None = None, baud: int = 460800,
          chip: str | None = None, before: str = "default-reset", stub: bool = True, erase: bool = True,
          reset: bool = True, progress: Callable[[int, int], None] | None = None,
          verbose: bool = False) -> dict:
    """Write `image` to the board on `port`; return {"chip", "offset", "size", "erased", "seconds", "reset"}.

    `chip` (like "esp32") refuses a board with another chip; the image's own
    chip id is always checked against the board. `offset` defaults to the
    chip's bootloader offset. `before` is esptool's reset mode before
    connecting ("default-reset", or "no-reset" for a board already in its
    bootloader). `erase` erases the whole flash first (files included); it needs
    esptool's stub, so without `stub` only the sectors the image covers are
    erased. Raises FlashError.
    """
    data = read_image(image)
    check_port(port)
    if offset is not None and (offset < 0 or offset % SECTOR):
        raise FlashError(f"offset {offset:#x} must be a multiple of 0x1000 (a flash sector)")
    started = time.monotonic()
    with _esptool_output(progress, verbose):
        esp = _connect(port, before)
        try:
            from esptool import cmds
            found = chip_key(esp.CHIP_NAME)
            if chip and chip_key(chip) != found:
                raise FlashError(f"the board on {port} is an {esp.CHIP_NAME}, not {chip}: is this the right "
                                 "board for this profile?")
            if getattr(esp, "IMAGE_CHIP_ID", None) is not None and image_chip_id(data) != esp.IMAGE_CHIP_ID:
                raise FlashError(f"image {image}: built for {_chip_name(image_chip_id(data))}, but the board is an "
                                 f"{esp.CHIP_NAME}; download the MicroPython image for {esp.CHIP_NAME}")
            where = esp.BOOTLOADER_FLASH_OFFSET if offset is None else offset
            doing = "loading the stub"
            try:
                if stub:
                    esp = cmds.run_stub(esp)
                if baud and baud != esp.ESP_ROM_BAUD:
                    doing = f"changing to {baud} baud"
                    esp.change_baud(baud)
                doing = "attaching the flash"
                cmds.attach_flash(esp)
                erased = erase and stub  # the ROM alone cannot erase the whole flash, only what it writes
                if erased:
                    doing = "erasing the flash"
                    cmds.erase_flash(esp)
                doing = f"writing at {where:#x}"
                cmds.write_flash(esp, [(where, data)])  # compressed with the stub, plain without
                doing = "verifying"
                cmds.verify_flash(esp, [(where, data)])
            except FlashError:
                raise
            except Exception as exc:
                raise _translate(exc, port, doing) from None
            reset_done = False
            if reset:
                try:
                    cmds.reset_chip(esp, "hard-reset")
                    reset_done = _has_modem_lines(esp._port)  # without RTS (a pty) esptool only warns
                except Exception:
                    reset_done = False
        finally:
            with contextlib.suppress(Exception):
                esp._port.close()
    return {"chip": esp.CHIP_NAME, "offset": where, "size": len(data), "erased": erased,
            "seconds": round(time.monotonic() - started, 1), "reset": reset_done}


def _has_modem_lines(ser) -> bool:
    """False for a port without RTS/DTR (a pty, some USB bridges): esptool cannot reset through it."""
    try:
        ser.cts  # reads the modem lines
        return True
    except OSError:
        return False


def _chip_name(image_id: int) -> str:
    from esptool.targets import CHIP_DEFS
    for cls in CHIP_DEFS.values():
        if getattr(cls, "IMAGE_CHIP_ID", None) == image_id:
            return cls.CHIP_NAME
    return f"an unknown chip (id {image_id})"


def progress_bar(stream=sys.stderr, width: int = 30) -> Callable[[int, int], None]:
    """A `progress` callback drawing `[#####.....]  45%  740/1630 KiB` on `stream` (a line per 10 % when
    the stream is not a terminal)."""
    tty = stream.isatty()
    shown = [-1]

    def draw(done: int, total: int) -> None:
        pct = 100 * done // total if total else 100
        if not tty and pct // 10 == shown[0] // 10 and pct != 100:
            return
        if pct == shown[0]:
            return
        shown[0] = pct
        fill = width * pct // 100
        line = f"writing [{'#' * fill}{'.' * (width - fill)}] {pct:3d}%  {done // 1024}/{total // 1024} KiB"
        stream.write(("\r" + line if tty else line + "\n") + ("\n" if tty and pct == 100 else ""))
        stream.flush()
    return draw


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="Flash a MicroPython image onto a board (esptool): "
                                 "detect the chip, erase, write, verify, reset.")
    ap.add_argument("--port", required=True, help="the board's serial port (/dev/ttyUSB0)")
    ap.add_argument("--image", required=True, help="the MicroPython image (.bin) for the board's chip")
    ap.add_argument("--offset", type=lambda s: int(s, 0), default=None,
                    help="where to write it (default: the chip's: 0x1000 on the ESP32, 0x0 on the ESP32-S3/C3)")
    ap.add_argument("--baud", type=int, default=460800, help="baud rate for the transfer (default 460800)")
    ap.add_argument("--chip", default=None, help="refuse a board with another chip (esp32, esp32s3, esp32c3)")
    ap.add_argument("--before", choices=("default-reset", "no-reset"), default="default-reset",
                    help="default-reset: put the board in its bootloader with DTR/RTS; no-reset: it is already")
    ap.add_argument("--no-stub", action="store_true",
                    help="talk to the ROM bootloader only (slower; it cannot erase the whole flash)")
    ap.add_argument("--no-erase", action="store_true", help="do not erase the whole flash first (keeps files)")
    ap.add_argument("--verbose", action="store_true", help="show esptool's own messages")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        out = flash(args.port, args.image, args.offset, args.baud, args.chip, args.before, not args.no_stub,
                    not args.no_erase, progress=progress_bar(), verbose=args.verbose)
    except FlashError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the flash is incomplete: run the command again", file=sys.stderr)
        return 130
    print(f"{args.image}: {out['size']} bytes written to the {out['chip']} on {args.port} at {out['offset']:#x} "
          f"and verified in {out['seconds']} s" + ("" if out["erased"] or args.no_erase else
                                                   " (the rest of the flash was not erased: --no-stub)")
          + ("" if out["reset"] else "; press EN (reset) to start MicroPython"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
