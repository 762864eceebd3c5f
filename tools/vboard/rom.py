"""The ESP32 ROM bootloader's serial protocol, so the real esptool flashes a vboard.

esptool talks SLIP-framed commands (``0xC0 ... 0xC0``; ``0xDB 0xDC`` stands for
0xC0 and ``0xDB 0xDD`` for 0xDB). A request is ``00 op len16 chk32 data``, an
answer ``01 op len16 val32 data status``: two status bytes (status, error)
from the flasher stub, four from the ROM. ``Rom`` answers as the chip's ROM
does, and as esptool's flasher stub once esptool has uploaded it to RAM and
jumped to it (MEM_BEGIN/DATA/END, then the stub's ``OHAI``): nothing runs, the
vboard only changes which answers it gives.

Chips are data (``CHIPS``): how esptool tells them apart (ESP32: a magic
word at 0x40001000; ESP32-S3: GET_SECURITY_INFO with chip id 9), where their
eFuses keep the MAC and revision, and where their SPI controller sits (esptool
reads the flash id with a raw SPI command through those registers). Every
other register reads back what was last written to it, or 0.

The flash is a file of ``FLASH_SIZE`` bytes (``Flash``), kept across runs.
A write is an overwrite (erase happens at FLASH_BEGIN, rounded to sectors, as
the ROM does it); ``ERASE_FLASH`` sets everything to 0xFF.

How the vboard leaves the bootloader is ``Rom.exit``: "run" (FLASH_END asking
to run the application, which esptool sends for ``--after soft-reset``) or
"reboot" (FLASH_END asking the ROM to reboot). The stub instead goes back to
the ROM on a reboot request (``--after no-reset`` with the stub) and sets
``stay`` so that closing the port afterwards does not reset the board.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

FLASH_SIZE = 4 * 1024 * 1024
SECTOR = 0x1000

# the start of esptool's SYNC request as it appears on the line: SLIP frame
# start, request, SYNC, 36 bytes of data, checksum 0, then 07 07 12 20
SYNC_FRAME = b"\xc0\x00\x08\x24\x00\x00\x00\x00\x00\x07\x07\x12\x20"

_SYNC, _READ_REG, _WRITE_REG = 0x08, 0x0A, 0x09
_FLASH_BEGIN, _FLASH_DATA, _FLASH_END = 0x02, 0x03, 0x04
_MEM_BEGIN, _MEM_END, _MEM_DATA = 0x05, 0x06, 0x07
_SPI_SET_PARAMS, _SPI_ATTACH, _READ_FLASH_SLOW = 0x0B, 0x0D, 0x0E
_CHANGE_BAUDRATE = 0x0F
_DEFL_BEGIN, _DEFL_DATA, _DEFL_END = 0x10, 0x11, 0x12
_SPI_FLASH_MD5, _GET_SECURITY_INFO = 0x13, 0x14
_ERASE_FLASH, _ERASE_REGION, _READ_FLASH = 0xD0, 0xD1, 0xD2

# error codes in the second status byte
_BAD_MESSAGE, _FAILED, _BAD_CRC, _WRITE_ERR, _READ_ERR, _DEFLATE_ERR = 0x05, 0x06, 0x07, 0x08, 0x09, 0x0B

_SPI_CMD_USR = 1 << 18
_FLASH_ID = 0xEF | (0x40 << 8) | (0x16 << 16)  # a Winbond 4 MB part (RDID 0x9F)
_XTAL_HZ = 40_000_000


@dataclass(frozen=True)
class Chip:
    """What esptool reads from one chip model's ROM bootloader."""
    name: str
    magic: int | None          # word at 0x40001000 (chips detected by it)
    chip_id: int | None        # GET_SECURITY_INFO chip id (chips detected by it)
    uart_clkdiv_reg: int
    spi_base: int
    spi_usr2: int              # offset of SPI_USR2 (command byte) in the SPI block
    spi_w0: int                # offset of SPI_W0 (data) in the SPI block
    fixed: dict = field(default_factory=dict)  # other registers with a fixed value

    def efuses(self, mac: bytes) -> dict:
        """eFuse words holding the MAC (and, on the ESP32, the chip revision)."""
        if self.name == "ESP32":
            base = 0x3FF5A000
            return {base + 4: int.from_bytes(mac[2:6], "big"),
                    base + 8: int.from_bytes(mac[0:2], "big"),
                    # word 3: revision bit 0, rated 240 MHz, package D0WD; word 5: revision bit 1
                    base + 12: (1 << 15) | (1 << 13) | (1 << 9),
                    base + 16: 1,  # CK8M frequency calibration, for the crystal estimate
                    base + 20: 1 << 20}
        mac_reg = 0x60007044
        return {mac_reg: int.from_bytes(mac[2:6], "big"), mac_reg + 4: int.from_bytes(mac[0:2], "big")}


CHIPS = {
    "esp32": Chip("ESP32", magic=0x00F01D83, chip_id=None, uart_clkdiv_reg=0x3FF40014,
                  spi_base=0x3FF42000, spi_usr2=0x24, spi_w0=0x80,
                  # APB_CTL_DATE: revision bit 2 (v3.0); RTCCALICFG1: the ROM's 40 MHz estimate
                  fixed={0x3FF6607C: 1 << 31, 0x3FF5F06C: (_XTAL_HZ * 40 // 15625) << 7}),
    "esp32s3": Chip("ESP32-S3", magic=None, chip_id=9, uart_clkdiv_reg=0x60000014,
                    spi_base=0x60002000, spi_usr2=0x20, spi_w0=0x58),
}


class RomError(Exception):
    """The flash file cannot be opened or created."""


class Flash:
    """The board's SPI flash: a file of FLASH_SIZE bytes, mapped into memory,
    created erased (all 0xFF). Changes reach the file as they are made."""

    def __init__(self, path: str | os.PathLike, size: int = FLASH_SIZE):
        self.path = Path(path)
        self.size = size
        try:
            if not self.path.exists() or self.path.stat().st_size != size:
                with open(self.path, "wb") as fh:
                    fh.write(b"\xff" * size)
            self._fh = open(self.path, "r+b")
            self.mem = mmap.mmap(self._fh.fileno(), size)
        except OSError as exc:
            raise RomError(f"{self.path}: cannot use as the flash image: {exc.strerror or exc}") from None

    def inside(self, offset: int, length: int) -> bool:
        return 0 <= offset and length >= 0 and offset + length <= self.size

    def read(self, offset: int, length: int) -> bytes:
        return self.mem[offset:offset + length]

    def write(self, offset: int, data: bytes) -> None:
        self.mem[offset:offset + len(data)] = data

    def erase(self, offset: int, length: int) -> None:
        """Set [offset, offset+length) to 0xFF, widened to whole sectors."""
        start = offset - offset % SECTOR
        end = min(self.size, -(-(offset + length) // SECTOR) * SECTOR)
        if end > start:
            self.mem[start:end] = b"\xff" * (end - start)

    def close(self) -> None:
        self.mem.flush()
        self.mem.close()
        self._fh.close()


def slip(packet: bytes) -> bytes:
    """One SLIP frame."""
    return b"\xc0" + packet.replace(b"\xdb", b"\xdb\xdd").replace(b"\xc0", b"\xdb\xdc") + b"\xc0"


def checksum(data: bytes, state: int = 0xEF) -> int:
    for b in data:
        state ^= b
    return state


class Rom:
    """One session of the ROM bootloader (and the stub once esptool loads it).

    ``feed(bytes)`` takes what the host sent and returns what the chip
    answers. ``on_erase_all`` is called after ERASE_FLASH (the vboard also
    wipes the MicroPython filesystem, which lives in the same flash on a
    board)."""

    def __init__(self, chip: Chip, flash: Flash, mac: bytes, on_erase_all=None):
        self.chip = chip
        self.flash = flash
        self.on_erase_all = on_erase_all
        self.regs = dict(chip.fixed)
        self.regs.update(chip.efuses(mac))
        if chip.magic is not None:
            self.regs[0x40001000] = chip.magic
        self.baud = 115200
        self.stub = False
        self.exit: str | None = None   # "run" or "reboot" once esptool leaves the loader
        self.stay = False              # --after no-reset from the stub: stay after the port closes
        self.active = False            # esptool has talked to this session
        self._frame: bytearray | None = None
        self._escape = False
        self._write: dict | None = None  # the FLASH_BEGIN / FLASH_DEFL_BEGIN in progress
        self._mem_entry = None

    # -- framing
    def feed(self, data: bytes) -> bytes:
        out = []
        for b in data:
            if self._frame is None:
                if b == 0xC0:
                    self._frame = bytearray()
                continue  # noise between frames is ignored, as the ROM does
            if b == 0xC0:
                frame, self._frame = bytes(self._frame), None
                if frame:
                    out.append(self._packet(frame))
                else:
                    self._frame = bytearray()  # two 0xC0 in a row: the second starts a frame
            elif self._escape:
                self._escape = False
                self._frame.append({0xDC: 0xC0, 0xDD: 0xDB}.get(b, b))
            elif b == 0xDB:
                self._escape = True
            else:
                self._frame.append(b)
        return b"".join(out)

    def _packet(self, p: bytes) -> bytes:
        if len(p) < 8 or p[0] != 0x00:
            return b""  # esptool's read-flash acknowledgements, or noise
        op, size, chk = struct.unpack_from("<BHI", p, 1)
        data = p[8:8 + size]
        self.active = True
        handler = self._HANDLERS.get(op)
        if handler is None or (op in self._STUB_ONLY and not self.stub) or \
                (op == _GET_SECURITY_INFO and self.chip.chip_id is None):
            return self._reply(op, error=_BAD_MESSAGE)
        try:
            return handler(self, op, data, chk)
        except (struct.error, ValueError):
            return self._reply(op, error=_BAD_MESSAGE)

    def _reply(self, op: int, val: int = 0, data: bytes = b"", error: int = 0) -> bytes:
        status = bytes([1 if error else 0, error]) + (b"" if self.stub else b"\x00\x00")
        body = data + status
        return slip(struct.pack("<BBHI", 1, op, len(body), val) + body)

    # -- commands
    def _sync(self, op, data, chk):
        val = 0 if self.stub else 0x20120707
        return self._reply(op, val) * 8  # the ROM answers a SYNC eight times

    def _read_reg(self, op, data, chk):
        (addr,) = struct.unpack_from("<I", data)
        return self._reply(op, self._reg(addr))

    def _reg(self, addr: int) -> int:
        if addr == self.chip.uart_clkdiv_reg:
            return _XTAL_HZ // self.baud
        return self.regs.get(addr, 0)

    def _write_reg(self, op, data, chk):
        for i in range(0, len(data) - 15, 16):
            addr, value, mask, _delay = struct.unpack_from("<IIII", data, i)
            self.regs[addr] = (self.regs.get(addr, 0) & ~mask & 0xFFFFFFFF) | (value & mask)
            if addr == self.chip.spi_base and value & _SPI_CMD_USR:
                self._spi_command()
        return self._reply(op)

    def _spi_command(self):
        # esptool's raw SPI flash commands: only the answers it looks at
        base = self.chip.spi_base
        command = self.regs.get(base + self.chip.spi_usr2, 0) & 0xFF
        self.regs[base + self.chip.spi_w0] = _FLASH_ID if command == 0x9F else 0
        self.regs[base] = 0  # done at once

    def _ok(self, op, data, chk):
        return self._reply(op)  # SPI_ATTACH, SPI_SET_PARAMS: nothing to do

    def _change_baudrate(self, op, data, chk):
        (baud,) = struct.unpack_from("<I", data)
        if baud:
            self.baud = baud
        return self._reply(op)

    def _security_info(self, op, data, chk):
        # flags, flash_crypt_cnt, 7 key purposes, chip id, API version: nothing secured
        return self._reply(op, data=struct.pack("<IBBBBBBBBII", 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                                self.chip.chip_id, 0))

    def _begin(self, op, data, chk):
        size, blocks, block_size, offset = struct.unpack_from("<IIII", data)
        if not self.flash.inside(offset, size):
            return self._reply(op, error=_WRITE_ERR)
        self.flash.erase(offset, size)
        self._write = {"offset": offset, "block": block_size, "seq": 0, "pos": offset,
                       "inflate": zlib.decompressobj() if op == _DEFL_BEGIN else None}
        return self._reply(op)

    def _data(self, op, data, chk):
        length, seq = struct.unpack_from("<II", data)
        block = data[16:16 + length]
        w = self._write
        if w is None or len(block) != length:
            return self._reply(op, error=_BAD_MESSAGE)
        if checksum(block) != chk & 0xFF:
            return self._reply(op, error=_BAD_CRC)
        if w["inflate"] is None:
            start = w["offset"] + seq * w["block"]
        else:
            try:
                block = w["inflate"].decompress(block)
            except zlib.error:
                return self._reply(op, error=_DEFLATE_ERR)
            start = w["pos"]
        if not self.flash.inside(start, len(block)):
            return self._reply(op, error=_WRITE_ERR)
        self.flash.write(start, block)
        w["pos"] = start + len(block)
        return self._reply(op)

    def _end(self, op, data, chk):
        (run_user_code,) = struct.unpack_from("<I", data) if len(data) >= 4 else (0,)
        answer = self._reply(op)
        self._write = None
        if self.stub:
            if not run_user_code:  # "reboot" from the stub: back to the ROM loader
                self.stub = False
                self.stay = True
        else:
            self.exit = "run" if run_user_code else "reboot"
        return answer

    def _mem_begin(self, op, data, chk):
        return self._reply(op)

    def _mem_data(self, op, data, chk):
        length, _seq = struct.unpack_from("<II", data)
        if checksum(data[16:16 + length]) != chk & 0xFF:
            return self._reply(op, error=_BAD_CRC)
        return self._reply(op)

    def _mem_end(self, op, data, chk):
        no_entry, entry = struct.unpack_from("<II", data)
        answer = self._reply(op)
        if no_entry or not entry:
            return answer
        # esptool jumped to the flasher stub it uploaded: from now on, answer as the stub
        self.stub = True
        self.stay = False
        return answer + slip(b"OHAI")

    def _md5(self, op, data, chk):
        addr, size = struct.unpack_from("<II", data)
        if not self.flash.inside(addr, size):
            return self._reply(op, error=_READ_ERR)
        digest = hashlib.md5(self.flash.read(addr, size))
        return self._reply(op, data=digest.digest() if self.stub else digest.hexdigest().encode())

    def _read_slow(self, op, data, chk):
        addr, size = struct.unpack_from("<II", data)
        if size > 64 or not self.flash.inside(addr, size):
            return self._reply(op, error=_READ_ERR)
        return self._reply(op, data=self.flash.read(addr, size).ljust(64, b"\xff"))

    def _read_flash(self, op, data, chk):
        # the stub streams sector-sized frames (esptool acknowledges each), then the MD5
        addr, size, sector, _in_flight = struct.unpack_from("<IIII", data)
        if not self.flash.inside(addr, size) or sector == 0:
            return self._reply(op, error=_READ_ERR)
        body = self.flash.read(addr, size)
        frames = [slip(body[i:i + sector]) for i in range(0, size, sector)]
        return self._reply(op) + b"".join(frames) + slip(hashlib.md5(body).digest())

    def _erase_flash(self, op, data, chk):
        self.flash.erase(0, self.flash.size)
        if self.on_erase_all is not None:
            self.on_erase_all()
        return self._reply(op)

    def _erase_region(self, op, data, chk):
        addr, size = struct.unpack_from("<II", data)
        if addr % SECTOR or size % SECTOR or not self.flash.inside(addr, size):
            return self._reply(op, error=_FAILED)
        self.flash.erase(addr, size)
        return self._reply(op)

    _HANDLERS = {
        _SYNC: _sync, _READ_REG: _read_reg, _WRITE_REG: _write_reg,
        _SPI_ATTACH: _ok, _SPI_SET_PARAMS: _ok, _CHANGE_BAUDRATE: _change_baudrate,
        _GET_SECURITY_INFO: _security_info,
        _FLASH_BEGIN: _begin, _FLASH_DATA: _data, _FLASH_END: _end,
        _DEFL_BEGIN: _begin, _DEFL_DATA: _data, _DEFL_END: _end,
        _MEM_BEGIN: _mem_begin, _MEM_DATA: _mem_data, _MEM_END: _mem_end,
        _SPI_FLASH_MD5: _md5, _READ_FLASH_SLOW: _read_slow,
        _READ_FLASH: _read_flash, _ERASE_FLASH: _erase_flash, _ERASE_REGION: _erase_region,
    }
    _STUB_ONLY = {_READ_FLASH, _ERASE_FLASH, _ERASE_REGION}
