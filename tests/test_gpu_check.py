"""benchmarks/gpu_check.py without a GPU: its dry run end to end, and its pure logic (bytes model,
argument parsing, target verdicts, auto table). The GPU figures themselves come only from a GPU run."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_writes_its_report(tmp_path):
    out = tmp_path / "dry.md"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert text.splitlines()[2] == "## DRY RUN on the CPU: no GPU figures here; the real ones come from a run on a GPU"
    # every quantity of the conv-BN model, judged against float64 with the fp32 bound
    verdicts = [line.split("|")[-2].strip() for line in text.splitlines() if line.startswith("| fp32_nchw eager (cpu)")]
    assert verdicts == ["ok"] * 12
    # the BN table: one row per config, bytes model behind the GB/s column
    rows = [line.split("|")[1:-1] for line in text.splitlines() if "| eager-cudnn |" in line]
    assert [r[0].strip() for r in rows] == ["bf16_cl", "fp32_nchw"]
    for row in rows:
        dtype = torch.bfloat16 if row[0].strip() == "bf16_cl" else torch.float32
        fwd_ms, fwd_gbps = float(row[3]), float(row[4])
        expected = 3 * 2 * 8 * 6 * 6 * torch.empty((), dtype=dtype).element_size() / (fwd_ms * 1e-3) / 1e9
        assert math.isclose(fwd_gbps, expected, rel_tol=0.01)
    assert proc.stdout.count("## DRY RUN") == 1


def test_bytes_model(gpu_check):
    n = 64 * 64 * 112 * 112
    assert gpu_check.bytes_model((64, 64, 112, 112), torch.bfloat16) == (3 * 2 * n, 5 * 2 * n)
    assert gpu_check.bytes_model((2, 3, 4, 5, 6), torch.float32) == (3 * 4 * 720, 5 * 4 * 720)
    assert gpu_check.gbps(10**9, 1000.0) == 1.0


def test_arguments(gpu_check):
    args = gpu_check.parse_args(["--bf16-cl-shapes", "8x64x56x56", "--providers", "eager-cudnn,inductor"])
    assert args.shapes["bf16_cl"] == [(8, 64, 56, 56)]
    assert args.shapes["fp32_nchw"] == [(64, 64, 112, 112), (64, 2048, 7, 7)]
    assert args.providers == ["eager-cudnn", "inductor"] and args.sections == {"1", "2", "3"}
    assert args.out == ROOT / "benchmarks" / "gpu_results.md"
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--providers", "cudnn"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--bf16-cl-shapes", "8x64"])


def _row(provider, shape, total_ms, x_bytes, gbps):
    return {"config": "bf16_cl", "shape": shape, "provider": provider, "x_bytes": x_bytes,
            "total_ms": total_ms, "total_gbps": gbps}


def test_target_verdicts(gpu_check):
    big, small = 128 << 20, 1 << 20
    rows = [_row("bnpass-triton", "A", 1.0, big, 2900.0), _row("eager-syncbn-kernels", "A", 1.5, big, 1900.0),
            _row("bnpass-triton", "B", 0.1, small, 300.0), _row("eager-syncbn-kernels", "B", 0.12, small, 250.0),
            _row("bnpass-inductor", "A", 0.9, big, 3200.0), _row("bnpass-inductor", "B", 0.2, small, 150.0)]
    got = {r[0]: (r[1], r[2]) for r in gpu_check.evaluate_targets(rows, 3300.0, {"inductor": 100.0, "bnpass": 102.0})}
    assert got["bnpass-triton fwd+bwd >= 85% of copy bandwidth (large shapes)"] == ("worst 88% of 3300 GB/s", "met")
    assert got["bnpass-triton >= 1.3x eager SyncBatchNorm kernel path (every shape)"] == ("worst 1.20x, best 1.50x", "NOT met")
    assert got["bnpass-inductor >= 1.3x eager SyncBatchNorm kernel path (every shape)"][1] == "NOT met"
    assert got["end to end bnpass <= 1.03x inductor unsynced"] == ("1.020x", "met")
    assert "end to end bnpass-triton <= 1.03x inductor unsynced" not in got
    assert gpu_check.auto_table(rows) == [["bf16_cl", "A", "1.000", "0.900", "inductor"],
                                          ["bf16_cl", "B", "0.100", "0.200", "triton"]]


def test_no_cuda_without_dry_run_says_so(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the script would measure it")
    out = tmp_path / "r.md"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device: nothing measured" in out.read_text()
