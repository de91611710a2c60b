"""benchmarks/gpu_check.py (and its parts in benchmarks/gpu/) without a GPU: the dry run, and the
pure logic: bytes model, arguments, the budget, kernel sums from profile events, the kernel-to-site
map and the per-site table, host µs per collective, target verdicts, the auto table. The GPU figures
themselves come only from a GPU run.

Default tier: the dry run's sections 1 and 2 (eager only, seconds) and the logic on constructed
inputs, the kernel-to-site map included (an inspect-format graph dict). Slow tier: the whole dry
run, whose section 3 compiles a one-site model with stock Inductor and bnpass on the CPU (tens of
seconds cold) and maps the generated C++ kernels to the site."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.gpu import common, device_time, site_kernels, targets

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"

_spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)  # a script, not a package module
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def _dry_run(tmp_path, *extra):
    out = tmp_path / "dry.md"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("## DRY RUN") == 1
    return out.read_text()


def _table_rows(text: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()
            if line.startswith(f"| {first_cell} |")]


def _target_rows(text: str) -> list[list[str]]:
    part = text.split("### Targets", 1)[1]
    return [[c.strip() for c in line.split("|")[1:-1]] for line in part.splitlines()
            if line.startswith("| ") and not line.startswith("| target |")]


def test_dry_run_reference_and_bn_table(tmp_path):
    text = _dry_run(tmp_path, "--sections", "1,2")
    assert text.splitlines()[2] == "## DRY RUN on the CPU: no GPU figures here; the real ones come from a run on a GPU"
    assert "CPU wall time (dry run on the CPU: NOT device figures)" in text
    # every quantity of the conv-BN model, judged against float64 with the fp32 bound
    assert [r[-1] for r in _table_rows(text, "fp32_nchw eager (cpu)")] == ["ok"] * 12
    rows = [r for r in (_table_rows(text, "bf16_cl") + _table_rows(text, "fp32_nchw")) if r[2] == "eager-cudnn"]
    assert [r[0] for r in rows] == ["bf16_cl", "fp32_nchw"]
    for row in rows:  # the bytes model behind the GB/s columns
        size = 2 * 8 * 6 * 6 * (2 if row[0] == "bf16_cl" else 4)
        assert math.isclose(float(row[4]), 3 * size / (float(row[3]) * 1e-3) / 1e9, rel_tol=0.01)
        assert math.isclose(float(row[8]), 8 * size / (float(row[7]) * 1e-3) / 1e9, rel_tol=0.01)
        assert row[10] == "n/a"  # no CUDA graphs on the CPU
    verdicts = [r[2] for r in _target_rows(text)]
    assert len(verdicts) == 4 and set(verdicts) <= {"not measured", "no verdict (CPU figures)"}


@pytest.mark.slow
def test_dry_run_end_to_end_maps_kernels_to_the_site(tmp_path):
    text = _dry_run(tmp_path, "--sections", "3")
    site = _table_rows(text, "0")
    assert len(site) == 1
    # bnpass: stats + normalize forward, reduce + dx backward; stock: one fused kernel each way
    assert [int(float(site[0][i])) for i in (3, 5, 7, 9)] == [2, 2, 1, 1]
    host = [r for r in _table_rows(text, "bnpass") if len(r) == 10]  # one collective per direction
    assert [(r[1], float(r[2]), r[8]) for r in host] == [("forward", 1.0, "1"), ("backward", 1.0, "1")]
    assert "inductor-cudagraphs | skipped (no CUDA graphs on the CPU)" in text
    verdicts = [r[2] for r in _target_rows(text)]  # device time per step and host µs were measured
    assert verdicts == ["no verdict (CPU figures)", "not measured", "not measured", "no verdict (CPU figures)"]


def test_arguments():
    args = gpu_check.parse_args(["--bf16-cl-shapes", "8x64x56x56", "--providers", "eager-cudnn,inductor"])
    assert args.shapes["bf16_cl"] == [(8, 64, 56, 56)]
    assert args.shapes["fp32_nchw"] == [(64, 64, 112, 112), (64, 2048, 7, 7)]
    assert args.providers == ["eager-cudnn", "inductor"] and args.sections == {"1", "2", "3"}
    assert args.e2e_variants == ["inductor", "bnpass", "inductor-cudagraphs", "bnpass-cudagraphs"]
    assert args.out == ROOT / "benchmarks" / "gpu_results.md"
    for bad in (["--providers", "cudnn"], ["--bf16-cl-shapes", "8x64"], ["--e2e-variants", "bnpass,x"]):
        with pytest.raises(SystemExit):
            gpu_check.parse_args(bad)


def test_bytes_model():
    n = 64 * 64 * 112 * 112
    assert common.bytes_model((64, 64, 112, 112), torch.bfloat16) == (3 * 2 * n, 5 * 2 * n)
    assert common.bytes_model((2, 3, 4, 5, 6), torch.float32) == (3 * 4 * 720, 5 * 4 * 720)
    assert common.gbps(10**9, 1000.0) == 1.0


def test_budget_skips_and_remembers():
    now = [0.0]
    budget = common.Budget(100.0, clock=lambda: now[0])
    half = budget.until(0.5)
    now[0] = 45.0
    assert half.allows("a", 5.0) and not half.allows("b", 6.0)
    assert budget.allows("c", 55.0) and not budget.allows("d", 56.0)
    assert budget.skipped == ["b", "d"] and budget.elapsed() == 45.0


def test_kernel_sums_from_profile_events():
    events = [("graph_0_cpp_fused_a_0", 3.0), ("triton_b_1", 4.0), ("graph_1_cpp_fused_a_0", 1.0),
              ("fill", 2.0), ("fill", 2.0)]
    totals = device_time.add_up([(device_time.kernel_name(n), us) for n, us in events], reps=2)
    assert totals == {"cpp_fused_a_0": [1.0, 2.0], "triton_b_1": [0.5, 2.0], "fill": [1.0, 2.0]}
    flush = device_time.add_up([("fill", 1.5), ("fill", 1.5)], reps=2)
    assert device_time.minus(totals, flush) == {"cpp_fused_a_0": [1.0, 2.0], "triton_b_1": [0.5, 2.0]}
    assert device_time.total_ms({"a": [1, 1500.0], "b": [2, 500.0]}) == 2.0


def test_host_per_collective():
    host = {"forward:_c10d_functional::all_reduce_": [4, 400.0], "forward:_c10d_functional::wait_tensor": [4, 100.0],
            "backward:_c10d_functional::all_reduce_": [3, 90.0], "backward:_c10d_functional::wait_tensor": [3, 30.0]}
    h = device_time.host_per_collective(host, "forward")
    assert (h["collectives_per_step"], h["issue_us"], h["wait_us"], h["per_collective_us"], h["per_step_us"]) == \
        (4, 100.0, 25.0, 125.0, 500.0)
    assert math.isnan(h["blocking_us"])
    assert device_time.host_per_collective(host, "backward")["per_collective_us"] == 40.0
    shm = device_time.host_per_collective({"backward:bnpass::shm_all_reduce": [2, 60.0]}, "backward")
    assert (shm["collectives_per_step"], shm["per_collective_us"]) == (2, 30.0)


def _graph(site_offset, calls_fw, calls_bw, digest_fw, digest_bw):
    return {"site_offset": site_offset, "graphs": {"forward": digest_fw, "backward": digest_bw},
            "kernels": {"forward": {"calls": calls_fw}, "backward": {"calls": calls_bw}}}


def test_kernel_map_and_site_table():
    node = lambda name, site, phase: {"name": name, "site": site, "phase": phase}  # noqa: E731
    graph = _graph(0, {"k_stats:1": ["var"], "k_norm:2": ["mul", "relu"], "extern_kernels.convolution:3": ["conv"],
                       "k_fused:4": ["mul", "var1"]},
                   {"k_dx:1": ["dx"]},
                   [node("var", 0, "stats"), node("mul", 0, "normalize"), node("relu", None, None),
                    node("conv", None, None), node("var1", 1, "stats")],
                   [node("dx", 1, "backward")])
    kmap = site_kernels.kernel_map([graph])
    assert kmap["k_stats"] == {"direction": "forward", "sites": {0}}
    assert kmap["k_fused"]["sites"] == {0, 1} and kmap["k_dx"] == {"direction": "backward", "sites": {1}}
    assert kmap["extern_kernels.convolution"]["sites"] == set()
    kernels = {"k_stats": [1, 10.0], "graph_0_k_norm": [1, 20.0], "k_fused": [1, 8.0], "k_dx": [2, 30.0],
               "ncclDevKernel_AllReduce": [2, 5.0], "cudnn_conv": [1, 100.0]}
    got = site_kernels.attribute(kmap, kernels)
    assert got["sites"] == {(0, "forward"): [3, 34.0], (1, "forward"): [1, 4.0], (1, "backward"): [1, 30.0]}
    assert (got["collective_us"], got["other_us"]) == (5.0, 100.0)
    stock = {"sites": {(0, "forward"): [1, 12.0], (1, "backward"): [1, 20.0]}, "collective_us": 0.0, "other_us": 90.0}
    headers, rows = site_kernels.site_table([(0, "bn1", 16), (1, "bn2", 16)], got, stock)
    assert headers[-1] == "bnpass adds µs" and len(headers) == len(rows[0])
    assert rows[0] == [0, "bn1", 16, 3, 34.0, 0, 0.0, 1, 12.0, 0, 0.0, 22.0]
    assert rows[1] == [1, "bn2", 16, 1, 4.0, 1, 30.0, 0, 0.0, 1, 20.0, 14.0]
    assert rows[2][-1] == 36.0 and rows[3][-1] == 5.0 and rows[4][-1] == 10.0


def _row(provider, shape, total_ms, x_bytes, gbps, config="bf16_cl"):
    return {"config": config, "shape": shape, "provider": provider, "x_bytes": x_bytes,
            "total_ms": total_ms, "total_gbps": gbps}


def test_target_verdicts():
    big, mid, small = 128 << 20, 64 << 20, 1 << 20
    rows = [_row("bnpass-triton", "A", 1.0, big, 2900.0), _row("bnpass-inductor", "A", 0.9, big, 3000.0),
            _row("bnpass-triton", "B", 0.5, mid, 2400.0), _row("bnpass-inductor", "B", 0.6, mid, 2000.0),
            _row("bnpass-inductor", "C", 0.2, small, 100.0), _row("bnpass-inductor", "D", 0.3, mid // 2, 2500.0),
            _row("inductor", "E", 0.1, big * 2, 3300.0), _row("bnpass-inductor", "F", 1.0, big * 4, 3300.0, "fp32_nchw")]
    e2e = {"inductor": {"device_ms": 10.0, "step_ms": 30.0}, "bnpass": {"device_ms": 10.4, "step_ms": 40.0},
           "inductor-cudagraphs": {"step_ms": 11.0}, "bnpass-cudagraphs": {"step_ms": 12.0}}
    got = {r[0]: (r[1], r[2]) for r in targets.evaluate_targets(rows, 3300.0, e2e, 55.0)}
    assert got["device time per step: bnpass <= 1.05x inductor"] == ("1.040x (10.4 / 10 ms)", "met")
    assert got["CUDA-graph step: bnpass <= 1.05x inductor"][1] == "NOT met"
    copy_key = next(k for k in got if k.startswith("BN fwd+bwd"))
    # the three largest bf16 channels_last shapes A, B, D at the better bnpass choice; B is the worst
    assert got[copy_key] == ("worst 73% of 3300 GB/s (A bnpass-inductor 91%; B bnpass-triton 73%; "
                             "D bnpass-inductor 76%)", "met")
    assert got["host µs per synced site per direction <= 40 (out of graphs)"] == ("55.0 µs (the worse direction)",
                                                                                "NOT met")
    nothing = {r[0]: r[2] for r in targets.evaluate_targets(rows[:2], 3300.0, {}, None)}
    assert set(nothing.values()) == {"not measured"}
    cpu = {r[0]: r[2] for r in targets.evaluate_targets(rows, 3300.0, e2e, 55.0, device_figures=False)}
    assert set(cpu.values()) == {"no verdict (CPU figures)"}
    assert targets.auto_table(rows[:4]) == [["bf16_cl", "A", "1.000", "0.900", "inductor"],
                                            ["bf16_cl", "B", "0.500", "0.600", "triton"]]


def test_no_cuda_without_dry_run_says_so(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the script would measure it")
    out = tmp_path / "r.md"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device: nothing measured" in out.read_text()


class _Event:
    def __init__(self, name, parent=None, activity_type=None, is_user_annotation=False):
        self.name, self.cpu_parent = name, parent
        self.activity_type, self.is_user_annotation = activity_type, is_user_annotation


def test_profile_event_classification():
    backward = _Event("CompiledFunctionBackward", _Event("autograd::engine::evaluate_function: CompiledFunctionBackward"))
    wrapper = _Event("## Call CompiledFxGraph abc ##", backward)
    assert device_time.direction_of(_Event("_c10d_functional::wait_tensor", wrapper)) == "backward"
    assert device_time.direction_of(_Event("_c10d_functional::all_reduce_", _Event("CompiledFunction"))) == "forward"
    assert device_time._device_work(_Event("triton_per_fused_0", activity_type="kernel"))
    assert device_time._device_work(_Event("Memset (Device)", activity_type="gpu_memset"))
    assert device_time._device_work(_Event("k"))  # older torch: no activity type
    assert not device_time._device_work(_Event("## Call CompiledFxGraph", activity_type="gpu_user_annotation"))
    assert not device_time._device_work(_Event("range", is_user_annotation=True))
