// Runs firmware code inside the pinned MicroPython VM (tools/mpvm/__init__.py).
//
//   node runner.mjs <request.json>
//
// The request names library dirs copied to /lib, and either a test module
// with its test names (in source order) or a script. Test results come
// back on stdout as lines starting with "@@" followed by JSON; everything
// else is passed through.
import { readFileSync, readdirSync, statSync } from "node:fs";
import { join, basename } from "node:path";
import { loadMicroPython } from "@micropython/micropython-webassembly-pyscript";
import { hostnet } from "./hostnet.mjs";

const req = JSON.parse(readFileSync(process.argv[2], "utf8"));
const mp = await loadMicroPython({
  heapsize: req.heapsize || 8 * 1024 * 1024,
  stdout: (line) => process.stdout.write(line + "\n"),
  stderr: (line) => process.stdout.write(line + "\n"),
});

function copyTree(fs, src, dst) {
  try { fs.mkdir(dst); } catch (e) { /* exists */ }
  for (const name of readdirSync(src)) {
    if (name === "__pycache__" || name.startsWith(".")) continue;
    const s = join(src, name), d = dst + "/" + name;
    if (statSync(s).isDirectory()) copyTree(fs, s, d);
    else if (name.endsWith(".py") || name.endsWith(".json")) fs.writeFile(d, readFileSync(s));
  }
}

// firmware packages (node/, sim/) and test helpers become importable from /lib
try { mp.FS.mkdir("/lib"); } catch (e) { /* exists */ }
for (const dir of req.lib_dirs) {
  for (const name of readdirSync(dir)) {
    const s = join(dir, name);
    if (name === "__pycache__" || name.startsWith(".")) continue;
    if (statSync(s).isDirectory()) copyTree(mp.FS, s, "/lib/" + name);
    else if (name.endsWith(".py")) mp.FS.writeFile("/lib/" + name, readFileSync(s));
  }
}
for (const [dst, src] of Object.entries(req.data_files || {})) {
  const dir = dst.substring(0, dst.lastIndexOf("/"));
  if (dir) { try { mp.FS.mkdir(dir); } catch (e) { /* exists */ } }
  mp.FS.writeFile(dst, readFileSync(src));
}
mp.FS.mkdir("/flash");
mp.FS.writeFile("/fwtest_env.json", JSON.stringify(req.env || {}));
if (req.script !== undefined) {
  // script mode: run the code as a task, print its errors, exit 1 on failure
  mp.registerJsModule("hostnet", hostnet);
  let finished;
  const done = new Promise((resolve) => { finished = resolve; });
  globalThis.__script_done = (ok) => finished(ok);
  mp.FS.writeFile("/lib/__script__.py", req.script);
  mp.runPython(`
import asyncio, sys, js
async def _main():
    ok = False
    try:
        import __script__
        if hasattr(__script__, "main"):
            await __script__.main()
        ok = True
    except BaseException as e:
        sys.print_exception(e)
    js.__script_done(ok)
asyncio.create_task(_main())
`);
  const ok = await done;
  process.exit(ok ? 0 : 1);
}
mp.FS.writeFile("/lib/" + req.module + ".py", readFileSync(req.test_file));
mp.registerJsModule("hostnet", hostnet);
globalThis.__fwtest_names = req.tests;

const driver = `
import sys, io, json
def _emit(kind, **kw):
    kw["kind"] = kind
    print("@@" + json.dumps(kw))
try:
    import ${req.module} as _m
except BaseException as e:
    _b = io.StringIO()
    sys.print_exception(e, _b)
    _emit("import_error", traceback=_b.getvalue())
    _m = None
async def _run_all():
    import js
    names = list(js.__fwtest_names)
    for name in names:
        _emit("start", name=name)
        fn = getattr(_m, name, None)
        if fn is None:
            _emit("result", name=name, ok=False, traceback="test %s not found in the module" % name)
            continue
        try:
            r = fn()
            if r is not None and hasattr(r, "send"):
                await r
            _emit("result", name=name, ok=True)
        except BaseException as e:
            b = io.StringIO()
            sys.print_exception(e, b)
            _emit("result", name=name, ok=False, traceback=b.getvalue())
async def _main():
    import js
    try:
        if _m is not None:
            await _run_all()
    finally:
        _emit("done")
        js.__fwtest_done()
import asyncio
asyncio.create_task(_main())
`;
// Tests run inside a real asyncio Task (not the VM's top-level coroutine,
// which cannot take exceptions thrown into it by wait_for or cancel).
let finished;
const done = new Promise((resolve) => { finished = resolve; });
globalThis.__fwtest_done = () => finished();
try {
  mp.runPython(driver);
  await done;
} catch (e) {
  process.stdout.write("@@" + JSON.stringify({ kind: "vm_error", traceback: String(e.message || e) }) + "\n");
}
process.exit(0);
