# TCP streams for firmware running in the MicroPython VM on the host: the VM
# has no socket module, so this bridges to Node.js (tools/mpvm/hostnet.mjs).
# Same shape as asyncio.open_connection's streams: readexactly/write/drain/close.
import hostnet


class Stream:
    def __init__(self, cid):
        self.cid = cid
        self.buf = b""
        self.out = []

    async def readexactly(self, n):
        while len(self.buf) < n:
            chunk = await hostnet.read(self.cid, 4096)
            data = bytes(chunk)
            if not data:
                raise EOFError("connection closed")
            self.buf += data
        d = self.buf[:n]
        self.buf = self.buf[n:]
        return d

    def write(self, data):
        self.out.append(bytes(data))

    async def drain(self):
        if self.out:
            data = b"".join(self.out)
            self.out = []
            await hostnet.write(self.cid, list(data))

    def close(self):
        hostnet.close(self.cid)

    async def wait_closed(self):
        pass


async def open_connection(host, port):
    try:
        cid = await hostnet.connect(host, port)
    except Exception as e:
        raise OSError("connect to %s:%d failed: %s" % (host, port, e))
    s = Stream(cid)
    return s, s
