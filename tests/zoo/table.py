"""tests/zoo/expected.csv: one row per model, the graph-level columns and the parity verdict."""

from __future__ import annotations

import csv
import difflib
import io
from pathlib import Path

from tests.zoo.sweep import GRAPH_COLUMNS

EXPECTED = Path(__file__).with_name("expected.csv")
# parity: the sweep of every model under bnpass_eager; parity_inductor: under Inductor, where run.
PARITY_COLUMNS = ["parity", "parity_detail", "parity_inductor", "parity_inductor_detail"]
COLUMNS = GRAPH_COLUMNS + PARITY_COLUMNS


def read(path: Path = EXPECTED) -> dict[str, dict]:
    """model -> row (all values as strings); {} when the file does not exist."""
    if not path.exists():
        return {}
    with path.open(newline="") as f:
        return {row["model"]: row for row in csv.DictReader(f)}


def render(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") for c in COLUMNS})
    return buf.getvalue()


def graph_columns(row: dict) -> dict:
    """The columns a graph-level sweep regenerates, as strings (the CSV's form)."""
    return {c: str(row.get(c, "")) for c in GRAPH_COLUMNS}


def diff(old_text: str, new_text: str, path: Path = EXPECTED) -> str:
    return "".join(difflib.unified_diff(old_text.splitlines(True), new_text.splitlines(True),
                                        f"{path} (expected)", f"{path} (regenerated)"))
