"""Run firmware test modules inside the pinned MicroPython VM.

Every ``test_*.py`` under ``tests/firmware/`` is a *firmware* test module:
pytest never imports it under CPython. Instead the whole module is run once
in the MicroPython WebAssembly VM (``runner.mjs`` under Node.js) with
``firmware/`` and ``tests/firmware/support`` on its import path, and each
module-level ``test_*`` function (plain or ``async``) becomes its own pytest
item whose failure shows the MicroPython traceback.
"""
from __future__ import annotations

import ast
import re
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tools.mpvm import REPO, RUNNER, VMError, vm_available

TIMEOUT_S = float(os.environ.get("FWTEST_TIMEOUT", "300"))


def firmware_test_names(path: Path) -> list[str]:
    """Module-level test functions, in source order."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [
        node.name
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_")
    ]


def needs(path: Path) -> set[str]:
    """What a firmware module asks the harness for: `FWTEST_NEEDS = ("broker",)`."""
    m = re.search(r"^FWTEST_NEEDS\s*=\s*\(([^)]*)\)", path.read_text(encoding="utf-8"), re.M)
    return {w.strip().strip("'\"") for w in m.group(1).split(",") if w.strip()} if m else set()


def run_module(path: Path, names: list[str], lib_dirs: list[Path] | None = None) -> dict:
    """Run one firmware test module in the VM; return {name: (ok, traceback, output)}.

    A module with `FWTEST_NEEDS = ("broker",)` gets a real mosquitto on a free
    loopback port, named in /fwtest_env.json inside the VM; with "ota", signed
    test releases served over HTTP on loopback (tests/harness/ota.py), as
    env()["ota"]."""
    env = {}
    broker = None
    releases = None
    if "broker" in needs(path):
        from fleet.mosquitto import Mosquitto
        broker = Mosquitto(tempfile.mkdtemp(prefix="fwtest-broker-")).start()
        env["broker_host"], env["broker_port"] = broker.host, broker.port
    ota_dir = None
    try:
        if "ota" in needs(path):
            from tests.harness.ota import vm_releases
            ota_dir = Path(tempfile.mkdtemp(prefix="fwtest-ota-"))
            env["ota"], releases = vm_releases(ota_dir)
        return _run_module(path, names, lib_dirs, env)
    finally:
        if releases:
            releases.stop()
        if ota_dir:
            shutil.rmtree(ota_dir, ignore_errors=True)
        if broker:
            broker.stop()
            shutil.rmtree(broker.state_dir, ignore_errors=True)


_BOARDS: dict = {}


def compiled_boards(out_dir: Path) -> dict:
    """Every boards/*.toml compiled to the JSON a node reads, for /boards/ in
    the VM (compiled once per test run)."""
    from tools.boards import board_files, compile_board, write_compact
    if _BOARDS:
        shutil.rmtree(out_dir, ignore_errors=True)
        return dict(_BOARDS)
    files = _BOARDS
    for toml in board_files():
        dst = out_dir / (toml.stem + ".json")
        write_compact(compile_board(toml), dst)
        files["/boards/" + dst.name] = str(dst)
    return dict(files)


def _run_module(path: Path, names: list[str], lib_dirs, env: dict) -> dict:
    why = vm_available()
    if why:
        raise VMError(why)
    libs = [REPO / "firmware"] + [Path(p) for p in (lib_dirs or [])]
    support = path.parent / "support"
    if support.is_dir():
        libs.append(support)
    request = {
        "lib_dirs": [str(p) for p in libs],
        "test_file": str(path),
        "module": "fwtest_" + path.stem,
        "tests": names,
        "env": env,
        "data_files": compiled_boards(Path(tempfile.mkdtemp(prefix="fwtest-boards-"))),
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(request, fh)
        req_path = fh.name
    try:
        proc = subprocess.run(
            ["node", str(RUNNER), req_path],
            capture_output=True, text=True, timeout=TIMEOUT_S, cwd=str(REPO),
        )
    except subprocess.TimeoutExpired as exc:
        raise VMError(f"the VM did not finish {path.name} within {TIMEOUT_S:.0f} s") from exc
    finally:
        os.unlink(req_path)
    return parse_output(proc.stdout + proc.stderr, names, proc.returncode)


def _clip(line: str, width: int = 400) -> str:
    # minified VM sources make Node's own stack lines enormous
    return line if len(line) <= width else line[:width] + " ...[clipped]"


def parse_output(text: str, names: list[str], returncode: int) -> dict:
    results: dict[str, tuple[bool, str, str]] = {}
    current = None
    output: dict[str, list[str]] = {}
    stray: list[str] = []
    done = False
    for line in text.splitlines():
        if line.startswith("@@{"):
            msg = json.loads(line[2:])
            kind = msg["kind"]
            if kind == "start":
                current = msg["name"]
                output[current] = []
            elif kind == "result":
                results[msg["name"]] = (msg["ok"], msg.get("traceback", ""), "\n".join(output.get(msg["name"], [])))
                current = None
            elif kind in ("import_error", "vm_error"):
                for n in names:
                    results.setdefault(n, (False, f"{kind}:\n{msg['traceback']}", "\n".join(stray)))
            elif kind == "done":
                done = True
            continue
        (output[current] if current else stray).append(_clip(line))
    if not done:
        tail = "\n".join((output.get(current) or stray)[-40:])
        for n in names:
            results.setdefault(n, (False, f"the VM stopped before this test finished (exit {returncode}):\n{tail}", ""))
    return results


class FirmwareTestFailure(Exception):
    pass


class FirmwareModule(pytest.File):
    """A firmware test module: collected by reading its source, run in the VM."""

    def collect(self):
        self._results = None
        for name in firmware_test_names(self.path):
            yield FirmwareItem.from_parent(self, name=name)

    def results(self) -> dict:
        if self._results is None:
            names = [item.name for item in self.session.items if item.parent is self] or firmware_test_names(self.path)
            try:
                self._results = run_module(self.path, names)
            except VMError as exc:
                self._results = {n: (False, f"VM error: {exc}", "") for n in names}
        return self._results


class FirmwareItem(pytest.Item):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.add_marker(pytest.mark.vm)

    def runtest(self):
        why = vm_available()
        if why:
            pytest.fail(why, pytrace=False)
        ok, tb, out = self.parent.results().get(self.name, (False, "no result from the VM", ""))
        if out:
            self.add_report_section("call", "MicroPython output", out)
        if not ok:
            raise FirmwareTestFailure(tb)

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, FirmwareTestFailure):
            return "MicroPython traceback (in the VM):\n" + str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, 0, f"[micropython] {self.name}"


def is_firmware_test(path: Path) -> bool:
    return path.suffix == ".py" and path.name.startswith("test_") and path.parent.name == "firmware" \
        and path.parent.parent.name in ("tests", "fwtests")


def pytest_pycollect_makemodule(module_path, parent):
    if is_firmware_test(Path(module_path)):
        return FirmwareModule.from_parent(parent, path=Path(module_path))
    return None
