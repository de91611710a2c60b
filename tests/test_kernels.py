"""Kernels per synced BatchNorm site in Inductor's generated C++ (benchmarks/kernel_counts.py: one
training step, one process on a fake 2-rank group, a fresh cache), against stock Inductor's for
the same model and Inductor configuration.

On the CPU stock Inductor computes a BatchNorm's statistics and normalizes in one kernel (forward)
and reduces and computes dx in one (backward); bnpass's all_reduce sits between the two halves, so
each synced site costs one kernel more per direction plus the collective's own call, and nothing
else: running-statistics updates, num_batches_tracked, the weight and bias gradients and the
float64 statistics math are in those kernels, not in kernels of their own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_each_synced_site_costs_one_kernel_more_per_direction():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_counts.py"), "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    sites = counts["synced"]
    assert sites == 2
    for direction in ("forward", "backward"):
        stock, ours = counts["inductor"][direction], counts["bnpass"][direction]
        assert stock["all_reduces"] == 0 and ours["all_reduces"] == sites, (direction, counts)
        assert ours["calls"] == stock["calls"] + sites, (direction, counts)
        assert ours["kernels"] <= stock["kernels"] + sites, (direction, counts)
