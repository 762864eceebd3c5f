# A tiny HTTP/1.1 GET client for OTA downloads (docs/ota.md), over the same
# `connect(host, port) -> (reader, writer)` the MQTT client uses:
# asyncio.open_connection on a board and under CPython, sim.vmnet in the VM.
# One request per connection ("Connection: close"), plain http:// only (the
# content is signed, so TLS is not what protects it), a Range header to
# resume, and bodies sized by Content-Length or chunked encoding.
import asyncio

from micropython import const

_LINE_MAX = const(1024)
_HEADERS_MAX = const(40)


class HTTPError(Exception):
    """A request that failed: args[0] says why. status is the HTTP status, or
    0 when the network failed (refused, reset, timed out, closed early)."""

    def __init__(self, reason, status=0):
        super().__init__(reason)
        self.status = status


def split_url(url):
    """'http://host[:port]/path' -> (host, port, path); HTTPError if it is not one."""
    if not isinstance(url, str) or not url.startswith("http://"):
        raise HTTPError("not an http:// URL: %r" % (url,))
    rest = url[7:]
    i = rest.find("/")
    hostport, path = (rest, "/") if i < 0 else (rest[:i], rest[i:])
    host, port = hostport, 80
    if ":" in hostport:
        host, p = hostport.rsplit(":", 1)
        try:
            port = int(p)
        except ValueError:
            port = 0
        if not 0 < port < 65536:
            raise HTTPError("bad port in URL %r" % url)
    if not host or " " in host or " " in path:
        raise HTTPError("bad host or path in URL %r" % url)
    return host, port, path


class Response:
    """An open response: status, headers (lower-case names), start (the file
    offset of the first body byte: the Range start on a 206, else 0), length
    (body bytes to come, None when chunked). Read the body with read(n);
    close() when done."""

    def __init__(self, r, w, timeout_ms):
        self._r = r
        self._w = w
        self._t = timeout_ms
        self.status = 0
        self.headers = {}
        self.start = 0
        self.length = None
        self._left = 0  # bytes left in the body (or in the current chunk)
        self._chunked = False
        self._end = False

    async def _exactly(self, n):
        try:
            return await asyncio.wait_for_ms(self._r.readexactly(n), self._t)
        except asyncio.TimeoutError:
            raise HTTPError("no data from the server within %d ms" % self._t)
        except (OSError, EOFError) as e:
            raise HTTPError("connection lost: %r" % (e,))

    async def _line(self):
        # readline where the stream has it (board, CPython), else byte by byte (VM bridge)
        rl = getattr(self._r, "readline", None)
        if rl is not None:
            try:
                line = await asyncio.wait_for_ms(rl(), self._t)
            except asyncio.TimeoutError:
                raise HTTPError("no data from the server within %d ms" % self._t)
            except (OSError, EOFError) as e:
                raise HTTPError("connection lost: %r" % (e,))
            if not line.endswith(b"\n"):
                raise HTTPError("connection closed in the middle of the headers")
        else:
            line = b""
            while not line.endswith(b"\n"):
                line += await self._exactly(1)
                if len(line) > _LINE_MAX:
                    break
        if len(line) > _LINE_MAX:
            raise HTTPError("header line longer than %d bytes" % _LINE_MAX)
        return line.rstrip(b"\r\n")

    async def _head(self, asked_start):
        parts = (await self._line()).split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise HTTPError("not an HTTP response")
        try:
            self.status = int(parts[1])
        except ValueError:
            raise HTTPError("bad status line")
        h = self.headers
        while True:
            line = await self._line()
            if not line:
                break
            if len(h) >= _HEADERS_MAX:
                raise HTTPError("more than %d headers" % _HEADERS_MAX)
            i = line.find(b":")
            if i > 0:
                h[line[:i].strip().decode().lower()] = line[i + 1:].strip().decode()
        self._chunked = "chunked" in h.get("transfer-encoding", "").lower()
        if self.status == 206:
            # Content-Range: bytes N-M/T
            try:
                self.start = int(h["content-range"].split()[1].split("-")[0])
            except (KeyError, IndexError, ValueError):
                raise HTTPError("206 without a usable Content-Range", 206)
            if self.start != asked_start:
                raise HTTPError("server answered from byte %d, asked %d" % (self.start, asked_start), 206)
        if not self._chunked:
            try:
                self.length = self._left = int(h["content-length"])
            except (KeyError, ValueError):
                raise HTTPError("response without Content-Length", self.status)

    async def read(self, n):
        """Up to n bytes of the body; b"" at its end."""
        if self._end:
            return b""
        if self._chunked and not self._left:
            size = (await self._line()).split(b";")[0]
            try:
                self._left = int(size, 16)
            except ValueError:
                raise HTTPError("bad chunk size")
            if not self._left:
                self._end = True
                return b""
        if not self._left:
            self._end = True
            return b""
        rd = getattr(self._r, "read", None)
        if rd is None:  # the VM bridge: whole reads only
            data = await self._exactly(min(n, self._left))
        else:  # what has arrived, so that a cut connection loses nothing received
            try:
                data = await asyncio.wait_for_ms(rd(min(n, self._left)), self._t)
            except asyncio.TimeoutError:
                raise HTTPError("no data from the server within %d ms" % self._t)
            except (OSError, EOFError) as e:
                raise HTTPError("connection lost: %r" % (e,))
            if not data:
                raise HTTPError("connection closed with %d bytes still to come" % self._left)
        self._left -= len(data)
        if self._chunked and not self._left:
            await self._line()  # the CRLF after each chunk
        return data

    def close(self):
        try:
            self._w.close()
        except Exception:
            pass


async def get(connect, url, start=0, timeout_ms=15000):
    """GET url, from byte `start` (a Range request) when start > 0.

    Returns an open Response for a 200 or 206 (on a 200 the server ignored
    the range: resp.start is 0). Raises HTTPError for any other status
    (status set) and for network failures (status 0)."""
    host, port, path = split_url(url)
    try:
        r, w = await asyncio.wait_for_ms(connect(host, port), timeout_ms)
    except asyncio.TimeoutError:
        raise HTTPError("no connection to %s:%d within %d ms" % (host, port, timeout_ms))
    except (OSError, EOFError) as e:
        raise HTTPError("cannot connect to %s:%d: %r" % (host, port, e))
    resp = Response(r, w, timeout_ms)
    try:
        req = "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUser-Agent: iwaki-node\r\nConnection: close\r\n" % (
            path, host, port)
        if start:
            req += "Range: bytes=%d-\r\n" % start
        w.write((req + "\r\n").encode())
        await asyncio.wait_for_ms(w.drain(), timeout_ms)
        await resp._head(start)
    except asyncio.TimeoutError:
        resp.close()
        raise HTTPError("no answer from %s:%d within %d ms" % (host, port, timeout_ms))
    except (OSError, EOFError) as e:
        resp.close()
        raise HTTPError("connection to %s:%d lost: %r" % (host, port, e))
    except HTTPError:
        resp.close()
        raise
    if resp.status not in (200, 206):
        resp.close()
        raise HTTPError("HTTP %d for %s" % (resp.status, path), resp.status)
    return resp


async def fetch(connect, url, limit, timeout_ms=15000):
    """The whole body of url as bytes; HTTPError if it is longer than limit."""
    resp = await get(connect, url, 0, timeout_ms)
    try:
        if resp.length is not None and resp.length > limit:
            raise HTTPError("%s is %d bytes, more than %d" % (url, resp.length, limit), resp.status)
        out = b""
        while True:
            data = await resp.read(4096)
            if not data:
                return out
            out += data
            if len(out) > limit:
                raise HTTPError("%s is more than %d bytes" % (url, limit), resp.status)
    finally:
        resp.close()
