"""The vboard's USB serial port: a pseudo-terminal whose slave side host tools
(mpremote, esptool, a terminal) open like /dev/ttyUSB0.

The vboard keeps only the master side, so it sees the host open and close
the port: with no one on the slave side the master reports a hang-up, and
what the board prints then is dropped, as a UART's output is when no one
listens. ``unplug()`` closes the master: the host's open port fails (EIO) as
when the USB cable is pulled; ``plug()`` makes a new pty, whose path may
differ, like a device that comes back as another /dev/ttyUSBn. ``link`` is a
symlink kept pointing at the current one (a stable name, like
/dev/serial/by-id/...).
"""
from __future__ import annotations

import errno
import os
import select
import tty
from pathlib import Path


class Port:
    def __init__(self, link: str | os.PathLike | None = None):
        self.link = Path(link) if link else None
        self.master: int | None = None
        self.path: str | None = None
        self._out = bytearray()

    @property
    def plugged(self) -> bool:
        return self.master is not None

    def plug(self) -> str:
        """Make the pty; return the path host tools open."""
        master, slave = os.openpty()
        tty.setraw(slave)  # no echo, no line editing: a byte is a byte, both ways
        self.path = os.ttyname(slave)
        os.close(slave)
        os.set_blocking(master, False)
        self.master = master
        self._out.clear()
        if self.link is not None:
            tmp = self.link.with_name(self.link.name + ".new")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(self.path)
            tmp.replace(self.link)
        return self.path

    def unplug(self) -> None:
        if self.master is not None:
            os.close(self.master)
            self.master = None
            self._out.clear()

    def host_present(self) -> bool:
        """True while some host program has the port open."""
        if self.master is None:
            return False
        p = select.poll()
        p.register(self.master, select.POLLIN)
        return not any(ev & select.POLLHUP for _fd, ev in p.poll(0))

    def read(self) -> bytes | None:
        """What the host sent; None when the host closed the port."""
        try:
            return os.read(self.master, 65536)
        except BlockingIOError:
            return b""
        except OSError as exc:
            if exc.errno == errno.EIO:
                return None
            raise

    def send(self, data: bytes) -> None:
        """Queue bytes for the host (dropped if no one has the port open)."""
        if data and self.master is not None and self.host_present():
            self._out += data
            self.flush()

    def pending(self) -> bool:
        return bool(self._out)

    def flush(self) -> None:
        while self._out and self.master is not None:
            try:
                n = os.write(self.master, self._out)
            except BlockingIOError:
                return
            except OSError:
                self._out.clear()  # the host went away
                return
            del self._out[:n]
