"""What the CLI's `list` actions print: a JSON list with --json, else one line per row,
or "(no <things>)" when there are none."""
from __future__ import annotations

import json
from typing import Callable


def print_rows(rows: list[dict], as_json: bool, things: str, line: Callable[[dict], str]) -> None:
    if as_json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"(no {things})")
    else:
        for row in rows:
            print(line(row))
