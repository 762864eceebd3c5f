"""A simulated ``esp32`` module for image updates: ``Partition`` over the app
partitions of one board's SPI flash, and the second-stage bootloader's
rollback rule (ESP-IDF with CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE, as
MicroPython's ESP32 builds have it).

    flash = Flash("/flash/n1-partitions", size=65536)   # one per board
    node = Node(..., esp32=flash)                       # flash.Partition is esp32.Partition
    flash.boot()                                        # at every (simulated) reset

Partitions are files under the given directory, so they survive a reset the
way flash does: ``ota_0.bin``, ``ota_1.bin`` and ``otadata.json`` (which one
boots, its state and the previous one; replaced atomically, as the two
otadata sectors are). The rollback rule: ``set_boot()`` marks the new
partition "new"; the bootloader turns "new" into "pending_verify" when it
starts it; if it finds "pending_verify" at the next reset (the app never
called ``mark_app_valid_cancel_rollback()``), it marks it "aborted" and boots
the previous partition again. ``set_boot()`` refuses an image that does not
start with the ESP image magic byte 0xE9, as esp_ota_set_boot_partition does.
Counters ``writes`` (blocks written) and ``erases`` measure flash wear.
"""
import json
import os

TYPE_APP = 0
TYPE_DATA = 1
_MAGIC = 0xE9
_EINVAL = 22


def _exists(p):
    try:
        os.stat(p)
        return True
    except OSError:
        return False


class Partition:
    BOOT = 0
    RUNNING = 1
    TYPE_APP = TYPE_APP
    TYPE_DATA = TYPE_DATA
    _flash = None  # bound per Flash

    def __init__(self, id, block_size=4096):
        f = self._flash
        if id == Partition.BOOT:
            id = f._otadata()["boot"]
        elif id == Partition.RUNNING:
            id = f.running
        if id not in f.labels:
            raise ValueError("partition not found")
        self.label = id
        self.block_size = block_size
        self._path = f.path + "/" + id + ".bin"

    @classmethod
    def find(cls, type=TYPE_APP, subtype=0xFF, label=None, block_size=4096):
        if type != TYPE_APP:
            return []
        return [cls(n, block_size) for n in cls._flash.labels if label is None or n == label]

    def info(self):
        """(type, subtype, address, size, label, encrypted)"""
        i = self._flash.labels.index(self.label)
        return (TYPE_APP, 0x10 + i, 0x10000 + i * self._flash.size, self._flash.size, self.label, False)

    def _io(self, block_num, buf, offset):
        pos = block_num * self.block_size + (offset or 0)
        if block_num < 0 or pos + len(buf) > self._flash.size:
            raise OSError(_EINVAL)
        return pos

    def readblocks(self, block_num, buf, offset=0):
        pos = self._io(block_num, buf, offset)
        with open(self._path, "rb") as f:
            f.seek(pos)
            f.readinto(buf)

    def writeblocks(self, block_num, buf, offset=None):
        """Without offset, the blocks are erased first (MicroPython's rule)."""
        pos = self._io(block_num, buf, offset)
        fl = self._flash
        with open(self._path, "r+b") as f:
            if offset is None:
                n = (len(buf) + self.block_size - 1) // self.block_size
                f.seek(pos)
                f.write(b"\xff" * (n * self.block_size))
                fl.erases += n
            f.seek(pos)
            f.write(buf)
        fl.writes += 1

    def ioctl(self, cmd, arg):
        if cmd == 4:
            return self._flash.size // self.block_size
        if cmd == 5:
            return self.block_size
        if cmd == 6:
            self.writeblocks(arg, b"\xff" * self.block_size, 0)
            self._flash.erases += 1
        return 0

    def set_boot(self):
        """Boot this partition from the next reset, on trial (state "new")."""
        with open(self._path, "rb") as f:
            if f.read(1) != bytes([_MAGIC]):
                raise OSError(-5379)  # ESP_ERR_OTA_VALIDATE_FAILED
        fl = self._flash
        fl._save({"boot": self.label, "state": "new", "previous": fl.running})

    def get_next_update(self):
        """The app partition an update should go to (after this one, wrapping)."""
        labels = self._flash.labels
        return type(self)(labels[(labels.index(self.label) + 1) % len(labels)], self.block_size)

    @classmethod
    def mark_app_valid_cancel_rollback(cls):
        fl = cls._flash
        d = fl._otadata()
        if d["boot"] == fl.running and d["state"] == "pending_verify":
            d["state"] = "valid"
            fl._save(d)

    def __repr__(self):
        return "<Partition %s>" % self.label


class Flash:
    """The app partitions and otadata of one simulated board, under path."""

    def __init__(self, path, size=65536, labels=("ota_0", "ota_1"), image=None):
        self.path = path
        self.size = size
        self.labels = list(labels)
        self.writes = 0
        self.erases = 0
        self.rolled_back = None
        try:
            os.mkdir(path)
        except OSError:
            pass
        for n in self.labels:
            p = path + "/" + n + ".bin"
            if not _exists(p):
                with open(p, "wb") as f:
                    f.write(b"\xff" * size)
        if not _exists(path + "/otadata.json"):
            first = self.labels[0]
            if image is not None:  # the factory-flashed firmware in the first slot
                with open(path + "/" + first + ".bin", "r+b") as f:
                    f.write(image)
            self._save({"boot": first, "state": "valid", "previous": None})
        self.running = None

        class _Partition(Partition):
            _flash = self

        self.Partition = _Partition
        self.boot()

    def _otadata(self):
        with open(self.path + "/otadata.json") as f:
            return json.loads(f.read())

    def _save(self, d):
        tmp = self.path + "/otadata.tmp"
        with open(tmp, "w") as f:
            f.write(json.dumps(d))
        os.rename(tmp, self.path + "/otadata.json")

    def boot(self):
        """The bootloader at reset: returns the label of the partition it starts."""
        d = self._otadata()
        self.rolled_back = None
        if d["state"] == "pending_verify" and d.get("previous"):
            # started once and never confirmed: roll back
            self.rolled_back = d["boot"]
            d = {"boot": d["previous"], "state": "valid", "previous": None, "aborted": d["boot"]}
            self._save(d)
        elif d["state"] == "new":
            d["state"] = "pending_verify"
            self._save(d)
        self.running = d["boot"]
        return self.running

    def state(self):
        """The otadata as a dict: boot, state, previous (and aborted)."""
        return self._otadata()

    def image(self, label, n):
        """The first n bytes of partition label (the simulation's side)."""
        with open(self.path + "/" + label + ".bin", "rb") as f:
            return f.read(n)
