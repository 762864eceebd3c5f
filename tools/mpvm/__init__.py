"""The pinned MicroPython VM (WebAssembly port under Node.js) as a host tool.

Used by the firmware test harness, the benchmarks and the virtual board:
`run_script(code)` runs MicroPython source with `firmware/` importable from
/lib and TCP bridged to the host (module `hostnet`, see `sim/vmnet.py`).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).with_name("runner.mjs")
VM_PACKAGE = REPO / "node_modules" / "@micropython" / "micropython-webassembly-pyscript"
VM_VERSION = "1.27.0"


class VMError(Exception):
    """The VM is missing or could not run the code at all."""


def vm_available() -> str | None:
    """Return why the VM cannot run here, or None when it can."""
    if shutil.which("node") is None:
        return "node is not installed (the MicroPython VM runs under Node.js)"
    if not VM_PACKAGE.exists():
        return "the MicroPython VM is not installed: run `make test` (it runs npm ci)"
    return None


def run_script(code: str, lib_dirs: list[Path] | None = None, timeout: float = 600,
               heapsize: int = 8 * 1024 * 1024) -> str:
    """Run MicroPython `code` in a fresh VM; return what it printed.
    An `async def main()` in the code is awaited. Raises VMError on failure."""
    why = vm_available()
    if why:
        raise VMError(why)
    req = {"lib_dirs": [str(REPO / "firmware")] + [str(p) for p in (lib_dirs or [])],
           "script": code, "heapsize": heapsize}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(req, fh)
    try:
        proc = subprocess.run(["node", str(RUNNER), fh.name], capture_output=True, text=True,
                              timeout=timeout, cwd=str(REPO))
    except subprocess.TimeoutExpired as exc:
        raise VMError(f"the VM did not finish within {timeout:.0f} s") from exc
    finally:
        os.unlink(fh.name)
    if proc.returncode != 0:
        tail = "\n".join(l[:400] for l in (proc.stdout + proc.stderr).splitlines()[-30:])
        raise VMError(f"MicroPython failed:\n{tail}")
    return proc.stdout
