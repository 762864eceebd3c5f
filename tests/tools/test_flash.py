"""tools.flash: bad images, missing ports and silent boards are clear errors; against the virtual
board the real esptool detects the chip, erases, writes, verifies and the image reads back."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hil_tests.rig import VirtualBoard, vboard_unavailable
from tools import flash as F

REPO = Path(__file__).resolve().parents[2]


def esp_image(chip_id: int = 0, size: int = 64 * 1024, seed: int = 1) -> bytes:
    """An ESP image header (magic 0xE9, one segment, chip id at byte 12) and `size` bytes of pattern."""
    header = bytes([F.ESP_IMAGE_MAGIC, 1, 2, 0x20]) + (0x40080000).to_bytes(4, "little") + bytes(4)
    header += chip_id.to_bytes(2, "little") + bytes(10)
    body = bytes((i * 31 + seed) & 0xFF for i in range(size - len(header)))
    return header + body


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tools.flash", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=60)


@pytest.mark.parametrize("content,message", [
    (None, "file not found"),
    (b"", "the file is empty"),
    (b":020000040000FA\n", "not an ESP image (first byte 0x3a"),
    (bytes([0xE9, 1]), "not an ESP image"),  # too short for a header
])
def test_bad_images_are_refused_before_the_port_is_touched(tmp_path, content, message):
    image = tmp_path / "firmware.bin"
    if content is not None:
        image.write_bytes(content)
    with pytest.raises(F.FlashError, match=message.replace("(", r"\(")):
        F.flash("/dev/ttyUSB-nonexistent", image)
    res = run_cli("--port", "/dev/ttyUSB-nonexistent", "--image", str(image))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.startswith(f"tools.flash: image {image}: ")


def test_an_unreadable_image_says_so(tmp_path):
    (tmp_path / "downloads").write_bytes(esp_image())  # a file where a folder should be
    with pytest.raises(F.FlashError, match=r"cannot read it \(Not a directory\)"):
        F.read_image(tmp_path / "downloads" / "firmware.bin")
    with pytest.raises(F.FlashError, match="is a directory"):
        F.read_image(tmp_path)


def test_a_missing_port_and_a_bad_offset(tmp_path):
    image = tmp_path / "firmware.bin"
    image.write_bytes(esp_image())
    res = run_cli("--port", "/dev/ttyUSB-nonexistent", "--image", str(image))
    assert res.returncode == 1
    assert "port /dev/ttyUSB-nonexistent: no such device; is the board plugged in?" in res.stderr
    with pytest.raises(F.FlashError, match="multiple of 0x1000"):
        F.flash(os.devnull, image, offset=0x1234)


def test_a_port_where_no_bootloader_answers(tmp_path):
    """A pseudo-terminal nobody answers on: esptool gives up and the technician is told what to do."""
    image = tmp_path / "firmware.bin"
    image.write_bytes(esp_image())
    master, slave = os.openpty()
    try:
        with pytest.raises(F.FlashError, match="no answer from the ROM bootloader .* hold BOOT"):
            F.flash(os.ttyname(slave), image, before="no-reset", stub=False)
    finally:
        os.close(master)
        os.close(slave)


def test_the_chip_is_read_from_the_image_header():
    assert F.image_chip_id(esp_image(chip_id=9)) == 9 and F.chip_key("ESP32-S3") == "esp32s3"
    assert F._chip_name(9) == "ESP32-S3" and F._chip_name(0) == "ESP32"


def test_the_progress_bar_draws_on_a_stream():
    import io
    out = io.StringIO()
    draw = F.progress_bar(out)
    for done in range(0, 101 * 1024, 1024):
        draw(done, 100 * 1024)
    lines = out.getvalue().splitlines()  # not a terminal: a line per 10 %
    assert len(lines) == 11 and lines[-1].startswith("writing [" + "#" * 30 + "] 100%")


# -- against the virtual board -------------------------------------------------------

@pytest.fixture
def vboard(tmp_path):
    """A virtual ESP32 (the EV charger's board) on a pty: the real esptool talks to its ROM bootloader."""
    why = vboard_unavailable()
    if why:
        pytest.skip(why)
    with VirtualBoard(REPO / "boards" / "ev-charger.toml", tmp_path / "vb") as vb:
        yield vb


def mpremote(port, *args):
    res = subprocess.run([sys.executable, "-m", "mpremote", "connect", port, *args], capture_output=True,
                         text=True, timeout=60, cwd=REPO)
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.mark.vm
def test_the_real_esptool_erases_writes_and_verifies_the_virtual_board(vboard, tmp_path):
    mpremote(vboard.port, "exec", "with open('keep.txt', 'w') as f:\n    f.write('old files')")
    assert "keep.txt" in mpremote(vboard.port, "ls", ":")
    image = tmp_path / "ESP32_GENERIC.bin"
    image.write_bytes(esp_image(chip_id=0, size=200 * 1024))
    res = run_cli("--port", vboard.port, "--image", str(image), "--chip", "esp32", "--before", "no-reset")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"{image}: {200 * 1024} bytes written to the ESP32 on {vboard.port} at 0x1000 "
                                 "and verified in ")
    assert "writing [" + "#" * 30 + "] 100%" in res.stderr and "Traceback" not in res.stderr
    flash = (vboard.state / "flash.bin").read_bytes()  # the board's SPI flash
    assert flash[0x1000:0x1000 + 200 * 1024] == image.read_bytes()
    # the whole flash was erased (the files with it), and the board runs MicroPython again
    assert "keep.txt" not in mpremote(vboard.port, "ls", ":")
    assert vboard.control("status")["mode"] == "micropython"


@pytest.mark.vm
def test_the_rom_alone_writes_only_the_image(vboard, tmp_path):
    image = tmp_path / "fw.bin"
    image.write_bytes(esp_image(chip_id=0, size=64 * 1024, seed=7))
    out = F.flash(vboard.port, image, offset=0x10000, before="no-reset", stub=False)
    assert out["chip"] == "ESP32" and out["offset"] == 0x10000 and out["erased"] is False
    assert out["reset"] is False  # a pty has no RTS line: the board resets when the port closes
    assert (vboard.state / "flash.bin").read_bytes()[0x10000:0x20000] == image.read_bytes()


@pytest.mark.vm
def test_an_image_or_a_board_for_another_chip_is_refused(vboard, tmp_path):
    image = tmp_path / "ESP32_GENERIC_S3.bin"
    image.write_bytes(esp_image(chip_id=9))
    with pytest.raises(F.FlashError, match="built for ESP32-S3, but the board is an ESP32; download the "
                                           "MicroPython image for ESP32"):
        F.flash(vboard.port, image, before="no-reset")
    with pytest.raises(F.FlashError, match="is an ESP32, not esp32s3: is this the right board"):
        F.flash(vboard.port, image, chip="esp32s3", before="no-reset")
    assert not (vboard.state / "flash.bin").read_bytes()[:0x10000].strip(b"\xff")  # nothing written
