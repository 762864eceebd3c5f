// The console of a virtual board (tools/vboard): one boot of MicroPython in
// the pinned VM, from a reset to the next one.
//
//   node repl.mjs '<boot configuration JSON from console.py>'
//
// stdin/stdout are the board's UART0: bytes from and to the host's serial
// port. The socket on cfg.ctl_fd carries JSON lines to and from tools/vboard:
// heartbeats and the reset that ends this boot go out, rig commands come in
// and are answered. A reset ends the process; its exit code says which
// (10/11 soft reboot to the friendly/raw REPL, 20 + reset cause, 30 bootloader,
// 40 the VM itself failed).
//
// The board's filesystem is the state directory: it is copied into the VM at
// boot and every file closed, removed, renamed or made there is written back
// at once, so what a power cut loses is what was not yet closed.
//
// The friendly REPL is the VM's own (replProcessChar). The raw REPL that
// mpremote uses is answered here, so that a command which calls asyncio.run
// finishes (and its output ends) before the prompt returns, as on a board; a
// raw-paste request is declined as firmware without raw-paste does.
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import { loadMicroPython } from "@micropython/micropython-webassembly-pyscript";
import { hostnet } from "../mpvm/hostnet.mjs";

const cfg = JSON.parse(process.argv[2]);
const CTRL_A = 1, CTRL_B = 2, CTRL_C = 3, CTRL_D = 4;
const EXIT_SOFT = 10, EXIT_SOFT_RAW = 11, EXIT_PANIC = 40;
const RAW_BANNER = "raw REPL; CTRL-B to exit\r\n>";

// -- console output: \n becomes \r\n as on a board's UART; flushed after each VM call
let out = [];
let lastCR = false;
let mute = false;
let flushQueued = false;

function emit(bytes) {
  if (mute) return;
  for (const b of bytes) {
    if (b === 10 && !lastCR) out.push(13);
    out.push(b);
    lastCR = b === 13;
  }
  if (!flushQueued) {
    flushQueued = true;
    setImmediate(flush);
  }
}

function emitText(s) {
  emit(Buffer.from(s, "utf8"));
}

function flush() {
  flushQueued = false;
  if (!out.length) return;
  const text = Buffer.from(out).toString("latin1").replace("JS with Emscripten", cfg.machine);
  out = [];
  const buf = Buffer.from(text, "latin1");
  for (let off = 0; off < buf.length;) {
    try {
      off += fs.writeSync(1, buf, off);
    } catch (e) {
      if (e.code !== "EAGAIN") process.exit(0); // the vboard went away
    }
  }
}

function tell(msg) {
  try {
    fs.writeSync(cfg.ctl_fd, JSON.stringify(msg) + "\n");
  } catch (e) {
    /* the vboard went away, or is busy: a heartbeat is not worth waiting for */
  }
}

// a reset: the process ends here (vmboard.py calls this for machine.reset() & co)
function reset(code, delayMs = 0) {
  flush();
  tell({ reset: code, delay_ms: delayMs });
  process.exit(code);
}
globalThis.vboardExit = (code, delayMs) => reset(code, delayMs || 0);

process.on("uncaughtException", (e) => {
  // a fault in the VM itself (not in Python code): the board panics and restarts
  emitText("\r\n[vboard] the MicroPython VM failed: " + String(e.message || e).split("\n")[0] + "\r\n");
  process.stderr.write(String(e.stack || e) + "\n");
  reset(EXIT_PANIC);
});

// -- the VM and its filesystem
const mp = await loadMicroPython({
  heapsize: cfg.heap,
  linebuffer: false,
  stdout: (b) => emit(b),
  stderr: (b) => emit(b),
});
mp.registerJsModule("hostnet", hostnet);
const FS = mp.FS;

function copyIn(src, dst, filter) {
  try { FS.mkdir(dst); } catch (e) { /* exists */ }
  for (const name of fs.readdirSync(src)) {
    if (filter && !filter(name)) continue;
    const s = path.join(src, name), d = dst + "/" + name;
    if (fs.statSync(s).isDirectory()) copyIn(s, d, filter);
    else FS.writeFile(d, fs.readFileSync(s));
  }
}

copyIn(cfg.fs, "/board");
FS.mkdir("/vboard");
copyIn(cfg.sim, "/vboard/sim", (n) => n !== "__pycache__" && (n.endsWith(".py") || !n.includes(".")));
FS.writeFile("/vboard/vmboard.py", fs.readFileSync(cfg.vmboard));
writeThrough();

// os.rename for vmboard.py: errno (Emscripten's numbering) or 0
globalThis.vboardRename = (a, b) => {
  try {
    FS.rename(a, b);
    return 0;
  } catch (e) {
    if (e.name !== "ErrnoError") throw e;
    return e.errno;
  }
};

function hostPath(p) {
  p = path.posix.resolve(FS.cwd(), p); // rmdir hands over paths relative to the VM's cwd
  if (p === "/board") return cfg.fs;
  return p.startsWith("/board/") ? path.join(cfg.fs, p.slice("/board/".length)) : null;
}

function writeThrough() {
  const orig = { close: FS.close, unlink: FS.unlink, rmdir: FS.rmdir, mkdir: FS.mkdir, rename: FS.rename };
  const onHost = (what, p, fn) => {
    const h = hostPath(p);
    if (h === null) return;
    try {
      fn(h);
    } catch (e) {
      process.stderr.write(`vboard: cannot ${what} ${h}: ${e.message}\n`);
    }
  };
  FS.close = (stream) => {
    const p = stream.path, written = (stream.flags & 3) !== 0;
    const r = orig.close(stream);
    if (written) onHost("write", p, (h) => fs.writeFileSync(h, FS.readFile(p)));
    return r;
  };
  FS.unlink = (p) => { const r = orig.unlink(p); onHost("remove", p, (h) => fs.rmSync(h, { force: true })); return r; };
  FS.rmdir = (p) => { const r = orig.rmdir(p); onHost("remove", p, (h) => fs.rmSync(h, { recursive: true, force: true })); return r; };
  FS.mkdir = (p, mode) => { const r = orig.mkdir(p, mode); onHost("make", p, (h) => fs.mkdirSync(h, { recursive: true })); return r; };
  FS.rename = (a, b) => {
    const r = orig.rename(a, b);
    const ha = hostPath(a);
    onHost("rename", b, (hb) => { if (ha !== null && fs.existsSync(ha)) fs.renameSync(ha, hb); });
    return r;
  };
}

mp.runPython("import sys\nsys.path.insert(0, '/vboard')\nimport vmboard\nsys.path.remove('/vboard')");
const vb = mp.pyimport("vmboard");
vb.setup(JSON.stringify(cfg.board));

// -- rig commands and heartbeats
const ctl = new net.Socket({ fd: cfg.ctl_fd, readable: true, writable: false });
let ctlBuf = "";
ctl.on("data", (d) => {
  ctlBuf += d.toString("utf8");
  let i;
  while ((i = ctlBuf.indexOf("\n")) >= 0) {
    const line = ctlBuf.slice(0, i);
    ctlBuf = ctlBuf.slice(i + 1);
    const req = JSON.parse(line);
    const error = vb.control(JSON.stringify(req));
    tell({ id: req.id, error: error || null });
  }
});
ctl.on("end", () => process.exit(0));
setInterval(() => {
  tell({ hb: 1 });
  if (state === "running" && vb.watchdog()) {
    emitText("\r\n[vboard] watchdog: the firmware stopped feeding machine.WDT\r\n");
    reset(20 + 3); // WDT_RESET
  }
}, 250);

// -- the console's states: "boot", "running" (asyncio.run tasks), "friendly", "raw"
let state = "boot";
let rawLine = [];
let onDone = null;
const input = [];

process.stdin.on("data", (d) => {
  for (const b of d) input.push(b);
  pump();
});
process.stdin.on("end", () => process.exit(0));

globalThis.vboardDone = (text) => setImmediate(() => {
  const next = onDone;
  onDone = null;
  if (next) next(text);
  else emitText(text.replace("\x1aexit", ""));
  pump();
});

function running(next) {
  state = "running";
  onDone = next;
}

function pump() {
  while (input.length) {
    if (state === "boot") return;
    if (state === "running") {
      // a board buffers what comes in while its program runs; Ctrl-C interrupts it
      const i = input.indexOf(CTRL_C);
      if (i >= 0) {
        input.splice(0, i + 1);
        vb.interrupt();
      }
      if (input.length > 256) input.splice(0, input.length - 256);
      return;
    }
    const b = input.shift();
    if (state === "raw") rawChar(b);
    else friendlyChar(b);
  }
}

function softReboot(raw) {
  reset(raw ? EXIT_SOFT_RAW : EXIT_SOFT);
}

function friendlyChar(b) {
  if (b === CTRL_A) {
    state = "raw";
    rawLine = [];
    emitText("\r\n" + RAW_BANNER);
    return;
  }
  if (mp.replProcessChar(b) !== 0) return softReboot(false); // Ctrl-D, sys.exit()
  if (vb.pending()) {
    // the line started asyncio.run: hold the prompt until its tasks finish
    const prompt = [62, 62, 62, 32];
    if (out.length >= 4 && prompt.every((c, k) => out[out.length - 4 + k] === c)) out.length -= 4;
    running((text) => {
      if (text.includes("\x1aexit")) return softReboot(false);
      emitText(text + ">>> ");
      state = "friendly";
    });
  }
}

function rawChar(b) {
  if (b === CTRL_A) {
    // also the answer to a raw-paste request (Ctrl-E 'A' Ctrl-A) from firmware without it
    rawLine = [];
    emitText(RAW_BANNER);
  } else if (b === CTRL_B) {
    state = "friendly";
    mute = true;
    mp.replProcessChar(CTRL_C); // clear whatever the friendly line held
    mute = false;
    mp.replProcessChar(CTRL_B); // banner and prompt
  } else if (b === CTRL_C) {
    rawLine = [];
  } else if (b === CTRL_D) {
    if (!rawLine.length) {
      emitText("OK\r\n");
      return softReboot(true);
    }
    emitText("OK");
    const code = Buffer.from(rawLine).toString("utf8");
    rawLine = [];
    rawResult(vb.run_raw(code));
  } else {
    rawLine.push(b);
  }
}

function rawResult(r) {
  if (r === "wait") return running((text) => rawResult(text));
  state = "raw";
  if (r.includes("\x1aexit")) {
    emitText("\x04\x04");
    return softReboot(true);
  }
  emitText("\x04" + r + "\x04>");
}

// -- boot: boot.py, then main.py (not after a soft reboot into the raw REPL)
function runFile(name, next) {
  const r = vb.run_file(name);
  if (r === "wait") {
    running((text) => {
      emitText(text.replace("\x1aexit", ""));
      next();
    });
  } else next();
}

function friendlyRepl() {
  state = "friendly";
  mp.replInit(); // banner and prompt
  pump();
}

function rawRepl() {
  state = "raw";
  rawLine = [];
  mute = true;
  mp.replInit();
  mute = false;
  emitText(RAW_BANNER);
  pump();
}

emitText(cfg.banner);
if (cfg.interrupted) {
  friendlyRepl();
} else {
  runFile("boot.py", () => (cfg.raw ? rawRepl() : runFile("main.py", friendlyRepl)));
}
