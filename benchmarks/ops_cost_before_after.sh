#!/usr/bin/env bash
# What a change to the synced op costs on the CPU: benchmarks/compute_overhead.py (resnet18 64x64
# batch 8, one process, fake group of 2; stock inductor and bnpass in one process) run alternately
# from a checkout of BEFORE_REV and from this tree, two rounds each.
#     bash benchmarks/ops_cost_before_after.sh [BEFORE_REV]      (default: 37a9c5f, before issue 24)
set -euo pipefail
ROOT_DIR="$(cd "$(dirname "$0")/.." && pwd)"
REV="${1:-37a9c5f}"
BEFORE="$(mktemp -d)/before"
git -C "$ROOT_DIR" worktree add -q --detach "$BEFORE" "$REV"
trap 'git -C "$ROOT_DIR" worktree remove --force "$BEFORE"' EXIT
source "$ROOT_DIR/scripts/env.sh"
for round in 1 2; do
  for tree in "$BEFORE" "$ROOT_DIR"; do
    echo "== $tree, round $round"
    PYTHONPATH="$tree" python "$tree/benchmarks/compute_overhead.py" --rounds 5 --steps 5 | grep resnet18
  done
done
