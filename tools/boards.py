"""Board profiles: check boards/*.toml and compile them to the compact JSON a node loads.

    python -m tools.boards check [boards/*.toml]        # all of boards/ when no file is named
    python -m tools.boards compile boards/env-station.toml -o board.json

The rules live in one place, ``firmware/node/config.py``: the node runs the
same ``check_profile`` on the JSON it loads. This module only parses TOML,
calls the checker and writes the result; a refused profile is a
``BoardError`` naming the file, the field and the reason.
"""
from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BOARDS = REPO / "boards"
PROG = "tools.boards"

_FIRMWARE = str(REPO / "firmware")
if _FIRMWARE not in sys.path:
    sys.path.insert(0, _FIRMWARE)

from node import config  # noqa: E402  (firmware code, shared with the node)


class BoardError(Exception):
    """A board file that cannot be read, parsed or accepted."""

    def __init__(self, path, reason: str, field: str | None = None):
        self.path = str(path)
        self.field = field
        self.reason = reason
        super().__init__(f"{self.path}: {field}: {reason}" if field else f"{self.path}: {reason}")


def compile_board(toml_path) -> dict:
    """Parse a board file and check it; return the profile with every default filled."""
    try:
        with open(toml_path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise BoardError(toml_path, "file not found") from None
    except OSError as exc:
        raise BoardError(toml_path, f"cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise BoardError(toml_path, f"not valid TOML: {exc}") from None
    try:
        return config.check_profile(raw)
    except config.ConfigError as exc:
        raise BoardError(toml_path, exc.reason, exc.field) from None


def compact_json(d: dict) -> str:
    """The compact JSON form of a profile (sorted keys, no spaces, UTF-8)."""
    return json.dumps(d, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def write_compact(d: dict, out_path) -> int:
    """Write a checked profile as compact JSON to out_path; return the number of bytes."""
    data = compact_json(d).encode("utf-8")
    try:
        Path(out_path).write_bytes(data)
    except OSError as exc:
        raise BoardError(out_path, f"cannot write: {exc.strerror or exc}") from None
    return len(data)


def profile_hash(d: dict) -> str:
    """The config hash the node reports for this profile (see node.config.profile_hash)."""
    return config.profile_hash(d)


def board_files() -> list[Path]:
    """Every board file in the repository's boards/ folder."""
    return sorted(BOARDS.glob("*.toml"))


def _shown(path: Path) -> Path:
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def _check(args) -> int:
    status = 0
    for path in args.files or [_shown(p) for p in board_files()]:
        try:
            d = compile_board(path)
        except BoardError as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            status = 1
            continue
        print(f"{path}: ok (config hash {profile_hash(d)})")
    return status


def _compile(args) -> int:
    d = compile_board(args.file)
    if args.output == "-":
        sys.stdout.write(compact_json(d) + "\n")
    else:
        size = write_compact(d, args.output)
        print(f"{args.output}: {size} bytes (config hash {profile_hash(d)})")
    return 0


COMMANDS = {"check": _check, "compile": _compile}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="Check and compile board profiles (boards/*.toml).")
    sub = ap.add_subparsers(dest="command", required=True, metavar="command")
    p = sub.add_parser("check", help="check board files; all of boards/ when none is named")
    p.add_argument("files", nargs="*", metavar="board.toml")
    p = sub.add_parser("compile", help="compile one board file to compact JSON for the node")
    p.add_argument("file", metavar="board.toml")
    p.add_argument("-o", "--output", default="-", metavar="out.json",
                   help="where to write the JSON (default: standard output)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except BoardError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
