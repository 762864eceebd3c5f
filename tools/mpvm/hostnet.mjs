// TCP for the MicroPython VM: the VM has no socket module, so firmware
// running there reaches a real broker through these awaitable functions.
// Each returns a Promise, which a MicroPython coroutine can await.
import net from "node:net";

const conns = new Map();
let nextId = 1;

export const hostnet = {
  // -> connection id; rejects with an Error whose message is the errno code
  connect(host, port) {
    return new Promise((resolve, reject) => {
      const sock = net.createConnection({ host, port });
      const id = nextId++;
      const st = { sock, chunks: [], size: 0, waiter: null, closed: false, error: null };
      sock.setNoDelay(true);
      sock.on("connect", () => { conns.set(id, st); resolve(id); });
      sock.on("data", (d) => { st.chunks.push(d); st.size += d.length; wake(st); });
      sock.on("error", (e) => { st.error = e.code || String(e); if (!conns.has(id)) reject(new Error(st.error)); wake(st); });
      sock.on("close", () => { st.closed = true; wake(st); });
    });
  },
  // -> up to n bytes as an array of numbers; empty array at EOF
  read(id, n) {
    const st = conns.get(id);
    if (!st) return Promise.resolve([]);
    return new Promise((resolve) => {
      const tryTake = () => {
        if (st.size > 0) {
          const all = Buffer.concat(st.chunks);
          const take = all.subarray(0, n);
          const rest = all.subarray(take.length);
          st.chunks = rest.length ? [rest] : [];
          st.size = rest.length;
          resolve(Array.from(take));
          return true;
        }
        if (st.closed || st.error) { resolve([]); return true; }
        return false;
      };
      if (!tryTake()) st.waiter = () => { if (tryTake()) st.waiter = null; };
    });
  },
  write(id, data) {
    const st = conns.get(id);
    if (!st || st.closed) return Promise.reject(new Error("ENOTCONN"));
    const buf = Buffer.from(typeof data === "string" ? data : Array.from(data));
    return new Promise((resolve, reject) => st.sock.write(buf, (e) => (e ? reject(new Error(e.code || String(e))) : resolve(buf.length))));
  },
  close(id) {
    const st = conns.get(id);
    if (st) { st.sock.destroy(); conns.delete(id); }
    return 0;
  },
};

function wake(st) { if (st.waiter) st.waiter(); }
