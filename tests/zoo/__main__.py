"""Regenerate tests/zoo/expected.csv and show the difference from the file in the tree.

    python -m tests.zoo                   # graph-level columns of every model; print the diff
    python -m tests.zoo --parity          # also the parity sweep on 2 gloo ranks (bnpass_eager)
    python -m tests.zoo --models resnet18,densenet121 --parity-inductor   # parity under Inductor
    python -m tests.zoo --write           # write the file (review the diff: a torch upgrade is a change)

Exit status 0 when the regenerated table equals the file (or --write wrote it), 1 when they differ.
Parity columns of models not re-run are kept from the file.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
    import torch

    from tests.zoo import table
    from tests.zoo.models import ZOO
    from tests.zoo.parity import run_parity
    from tests.zoo.sweep import graph_rows

    p = argparse.ArgumentParser(prog="python -m tests.zoo", description=__doc__.splitlines()[0])
    p.add_argument("--models", help="comma-separated names (default: the whole zoo)")
    p.add_argument("--parity", action="store_true", help="run the parity sweep (2 gloo ranks, bnpass_eager)")
    p.add_argument("--parity-inductor", action="store_true",
                   help="run parity under Inductor (backend bnpass; cold compiles take minutes per model)")
    p.add_argument("--write", action="store_true", help="write tests/zoo/expected.csv")
    p.add_argument("--no-graph", action="store_true", help="keep the graph-level columns (parity runs only)")
    args = p.parse_args(argv)
    known = [m.name for m in ZOO]
    names = args.models.split(",") if args.models else known
    unknown = [n for n in names if n not in known]
    if unknown:
        p.error(f"unknown model(s) {unknown}; the zoo has {known}")

    old = table.read()
    start = time.monotonic()
    fresh = {} if args.no_graph else {r["model"]: r for r in graph_rows(names, progress=True)}
    if fresh:
        print(f"graph-level sweep of {len(names)} model(s): {time.monotonic() - start:.0f} s", file=sys.stderr)
    parity = {}
    for flag, backend, column in ((args.parity, "bnpass_eager", "parity"),
                                  (args.parity_inductor, "bnpass", "parity_inductor")):
        if flag:
            start = time.monotonic()
            parity[column] = run_parity(names, backend, deadline_s=3600 * 3)
            print(f"parity of {len(names)} model(s) under {backend}: {time.monotonic() - start:.0f} s "
                  f"(torch {torch.__version__})", file=sys.stderr)
    rows = []
    for name in known:  # the zoo's order; models not re-run keep their row
        row = dict(old.get(name, {"model": name}))
        for column in ("parity", "parity_inductor"):
            row[column] = row.get(column) or "not run"
        if name in fresh:
            row.update(table.graph_columns(fresh[name]))
        for column, results in parity.items():
            if name in results:
                row.update({column: results[name]["verdict"], f"{column}_detail": results[name]["detail"]})
        rows.append(row)
    old_text = table.EXPECTED.read_text() if table.EXPECTED.exists() else ""
    new_text = table.render(rows)
    change = table.diff(old_text, new_text)
    sys.stdout.write(change or f"{table.EXPECTED}: no change\n")
    if args.write and change:
        table.EXPECTED.write_text(new_text)
        print(f"wrote {table.EXPECTED}", file=sys.stderr)
        return 0
    return 1 if change else 0


if __name__ == "__main__":
    sys.exit(main())
