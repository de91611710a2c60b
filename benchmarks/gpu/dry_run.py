"""``gpu_check.py --dry-run``: every section's logic on the CPU, on tiny shapes and a tiny model,
with CPU timings labelled as such (``device_time.CpuClock``): the float64 reference comparison, the
BN table and its bytes model, a training step compiled by stock Inductor and by bnpass (a one-rank
gloo group, ``force_sync``, ``transport="process_group"`` as on CUDA) with Inductor's generated code
mapped to the BatchNorm site, the per-site table, the host time of the collectives, and the targets
(never given a verdict on these figures)."""

from __future__ import annotations

import tempfile

import torch

from .bn_shapes import bn_section, bn_table
from .common import Budget, format_table
from .correctness import ERROR_HEADERS, errors, global_batch, reference, build_model, run_step
from .device_time import CpuClock, copy_bandwidth
from .end_to_end import e2e_section, host_us_per_site, site_report, tiny_workload
from .targets import auto_table, evaluate_targets

DRY_SHAPES = {"bf16_cl": [(2, 8, 6, 6)], "fp32_nchw": [(2, 8, 6, 6)]}
# C++ kernels named in the profile (the CPU's stand-in for device kernels); Inductor's CPU layout
# optimization off for stock too, as bnpass has it on the CPU, so that only the BatchNorms differ.
DRY_CONFIG = {"cpp.enable_kernel_profile": True, "layout_optimization": False}
DRY_VARIANTS = ("inductor", "bnpass", "inductor-cudagraphs", "bnpass-cudagraphs")


def dry_run(args, report) -> int:
    report.add("## DRY RUN on the CPU: no GPU figures here; the real ones come from a run on a GPU")
    torch.set_num_threads(1)  # a shared machine: one thread times more steadily
    budget = Budget(args.budget_s)
    clock = CpuClock()
    device = torch.device("cpu")
    ok, bn_rows, copy, e2e = True, [], 0.0, {}
    if "1" in args.sections:
        ok = reference_check(report, device)
    if "2" in args.sections:
        copy = copy_bandwidth(clock, device, 64 << 20)
        bn_rows = bn_section(report, DRY_SHAPES, ["eager-cudnn"], None, device, clock, budget)
        report.add(f"### BN table (CPU eager BN, tiny shape; {clock.label})")
        report.add(f"copy bandwidth (cpu, 64 MiB): {copy:.1f} GB/s")
        report.add(bn_table(bn_rows, copy))
        report.add(format_table(["config", "shape", "triton ms", "inductor ms", "faster"], auto_table(bn_rows)))
        ok = ok and bool(bn_rows)
    if "3" in args.sections:
        e2e = end_to_end(report, clock, budget)
        ok = ok and all("kmap" in e2e.get(v, {}) for v in ("inductor", "bnpass"))
    if budget.skipped:
        report.add(f"skipped for the time budget: {', '.join(budget.skipped)}")
    report.add("### Targets (CPU figures: no verdict)")
    report.add(format_table(["target", "measured", "verdict"],
                            evaluate_targets(bn_rows, copy, e2e, host_us_per_site(e2e), device_figures=False)))
    return 0 if ok else 1


def reference_check(report, device) -> bool:
    x, dy = global_batch(device)
    ref = reference(device, x, dy)
    model = build_model(device, torch.float32, torch.contiguous_format)
    out = run_step(model, model, x, dy, torch.float32, torch.contiguous_format)
    # eager := the reference itself, so "allowed" is the fp32 bound 2e-5 x scale alone: a real check
    rows = [["fp32_nchw eager (cpu)"] + r for r in errors(out, ref, ref, True)]
    report.add("### Reference comparison (eager fp32 on the CPU vs float64, bound 2e-5 x scale)")
    report.add(format_table(ERROR_HEADERS, rows))
    return all(r[-1] == "ok" for r in rows)


def end_to_end(report, clock, budget) -> dict:
    import torch.distributed as dist

    report.add("### End to end (tiny model on the CPU, one-rank gloo group, force_sync)")
    with tempfile.NamedTemporaryFile(prefix="bnpass-gpu-dry-") as store:
        dist.init_process_group("gloo", init_method=f"file://{store.name}", rank=0, world_size=1)
        try:
            e2e = e2e_section(report, tiny_workload(), DRY_VARIANTS, dist.group.WORLD, clock, budget,
                              steps=3, config=DRY_CONFIG, options={"transport": "process_group"})
            site_report(report, e2e)
        finally:
            dist.destroy_process_group()
    return e2e
