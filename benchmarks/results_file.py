"""Append a benchmark's table to a results file (benchmarks/RESULTS.md), under a heading that names
the date and the command that made it."""

from __future__ import annotations

import sys
import time


def append_results(path: str, script: str, lines: list[str]) -> None:
    """Append ``lines`` under ``### <date>: `python benchmarks/<script> <this process's arguments>```."""
    args = " " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""
    with open(path, "a") as f:
        f.write(f"\n### {time.strftime('%Y-%m-%d')}: `python benchmarks/{script}{args}`\n\n" + "\n".join(lines) + "\n")
