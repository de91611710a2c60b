"""One command that checks and measures bnpass on one GPU (H100/H200), in device time, in <= 5 minutes.

    PYTHONPATH=. python benchmarks/gpu_check.py [--out benchmarks/gpu_results.md] [--budget-s 290]
    python benchmarks/gpu_check.py --dry-run --out /tmp/dry.md      # no GPU: the CPU-side logic only

Needs torch (2.11 on the GPU machine), triton, torchvision; no network, no pip install (bnpass runs
from this source tree: ``import bnpass; bnpass.register()``). Results go to stdout and to ``--out``.
The sections live in ``benchmarks/gpu/`` (one job per file):

1. ``correctness``: compiled bnpass against float64 on CUDA: a world-size-1 NCCL group with
   ``force_sync``, the same step in CUDA graphs, 2 ranks sharing the GPU over gloo.
2. ``bn_shapes``: BatchNorm forward+backward on ResNet-50's shapes per provider (bnpass-triton,
   bnpass-inductor, inductor, eager cuDNN, eager SyncBatchNorm's kernels) in **device time**: the sum
   of kernel durations from torch.profiler, and the CUDA-graph replay of forward+backward; GB/s
   against the bytes model (3|x| forward, 5|x| backward) and the copy bandwidth in the same time.
3. ``end_to_end``: resnet50 bf16 channels_last batch 64, one-rank NCCL group, ``force_sync``: step
   time out of graphs and in CUDA graphs, **device time per step**, the per-site table of bnpass's
   kernels and µs against stock Inductor's for the same BatchNorm (``site_kernels``), and the host
   µs of each collective out of graphs.

Then issue 16's targets against the figures (``targets``). Sections and rows that would overrun
``--budget-s`` are reported as skipped. All three sections do not fit 5 minutes on an H200 (the
2026-11-27 runs: section 1 about a minute, section 2's compiles and section 3's four resnet50
compiles several minutes); for a 15-minute device session run ``--sections 2,3`` (the targets'
figures; ``--fp32-nchw-shapes`` with no shape drops the fp32 rows) and ``--sections 1`` as two runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.gpu import correctness  # noqa: E402 - after the path
from benchmarks.gpu.bn_shapes import bn_section, bn_table  # noqa: E402
from benchmarks.gpu.common import DEFAULT_SHAPES, PROVIDERS, Budget, Report, format_table, parse_shape  # noqa: E402
from benchmarks.gpu.device_time import DeviceClock, copy_bandwidth  # noqa: E402
from benchmarks.gpu.end_to_end import (DEFAULT_E2E, E2E_VARIANTS, e2e_section, host_us_per_site,  # noqa: E402
                                       resnet50_workload, site_report)
from benchmarks.gpu.targets import auto_table, evaluate_targets  # noqa: E402

# With section 3 to come, section 2 ends by this fraction of the budget (section 3's four resnet50
# compiles took 45-70 s each on the H200 in the 2026-11-27 runs).
SECTION2_SHARE = 0.4


def _names(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "gpu_results.md")
    p.add_argument("--budget-s", type=float, default=290.0, help="wall-clock budget; later items skip")
    p.add_argument("--dry-run", action="store_true", help="no GPU: CPU-side logic on tiny shapes")
    p.add_argument("--sections", default="1,2,3", help="comma-separated: 1 correctness, 2 BN, 3 e2e")
    p.add_argument("--bf16-cl-shapes", type=parse_shape, nargs="*", default=None)
    p.add_argument("--fp32-nchw-shapes", type=parse_shape, nargs="*", default=None)
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--e2e-batch", type=int, default=64)
    p.add_argument("--e2e-steps", type=int, default=10)
    p.add_argument("--e2e-variants", default=",".join(DEFAULT_E2E),
                   help=f"comma-separated, from {', '.join(E2E_VARIANTS)}")
    p.add_argument("--profile", default="", help="comma-separated e2e variants to profile (3 steps)")
    args = p.parse_args(argv)
    args.sections = set(_names(args.sections))
    args.providers = _names(args.providers)
    args.e2e_variants = _names(args.e2e_variants)
    args.profile = set(_names(args.profile))
    bad_e2e = sorted((set(args.e2e_variants) | args.profile) - set(E2E_VARIANTS))
    if bad_e2e:
        p.error(f"unknown e2e variants {bad_e2e}; valid: {', '.join(E2E_VARIANTS)}")
    bad = sorted(set(args.providers) - set(PROVIDERS))
    if bad:
        p.error(f"unknown providers {bad}; valid: {', '.join(PROVIDERS)}")
    given = {"bf16_cl": args.bf16_cl_shapes, "fp32_nchw": args.fp32_nchw_shapes}
    args.shapes = {cfg: given[cfg] if given[cfg] is not None else [parse_shape(s) for s in DEFAULT_SHAPES[cfg]]
                   for cfg in DEFAULT_SHAPES}
    return args


def correctness_sections(report, group, budget) -> bool:
    ok = True
    for title, fn in (
            ("## 1a. Correctness: world-size-1 NCCL group, force_sync", lambda: correctness.correctness_ws1(report, group)),
            ("## 1b. CUDA graphs: captured synced step, no host sync",
             lambda: correctness.correctness_cudagraphs(report, group)),
            ("## 1c. Correctness: 2 ranks on one GPU over gloo",
             lambda: correctness.correctness_two_ranks(report, max(60.0, budget.left() - 150)))):
        report.add(title)
        try:
            ok = fn() and ok
        except Exception:  # noqa: BLE001
            ok = False
            report.add("FAILED:\n```\n" + traceback.format_exc()[-3000:] + "\n```")
    return ok


def measure(args, report, group, budget) -> bool:
    ok = correctness_sections(report, group, budget) if "1" in args.sections else True
    clock, device = DeviceClock(), torch.device("cuda")
    bn_rows, copy, e2e = [], 0.0, {}
    if "2" in args.sections:
        report.add("## 2. BatchNorm forward+backward, ResNet-50 shapes, device time")
        report.add(f"timing: {clock.label}. Bytes model: forward = 3 x |x| (read x twice, write y), backward = "
                   "5 x |x| (read x and dy twice, write dx), |x| in x's dtype")
        copy = copy_bandwidth(clock, device, 1 << 30)
        report.add(f"copy bandwidth (1 GiB device-to-device, read+write, kernel time): {copy:.0f} GB/s")
        bn_rows = bn_section(report, args.shapes, args.providers, group, device, clock,
                             budget.until(SECTION2_SHARE if "3" in args.sections else 0.95))
        report.add(bn_table(bn_rows, copy))
        report.add("### auto table (faster of the two bnpass kernel choices in device time; feed into "
                   "backends/triton_bn_op.py AUTO_RULES)")
        report.add(format_table(["config", "shape", "triton ms", "inductor ms", "faster"], auto_table(bn_rows)))
    if "3" in args.sections:
        report.add("## 3. End to end: one training step")
        e2e = e2e_section(report, resnet50_workload(args.e2e_batch), args.e2e_variants, group, clock, budget,
                          args.e2e_steps, args.profile)
        site_report(report, e2e)
    if budget.skipped:
        report.add(f"skipped for the time budget: {', '.join(budget.skipped)}")
    report.add("## Targets (issue 16, item 4)")
    report.add(format_table(["target", "measured", "verdict"],
                            evaluate_targets(bn_rows, copy, e2e, host_us_per_site(e2e))))
    report.add(f"correctness: {'all ok' if ok else 'FAILURES above'}; total {budget.elapsed():.0f} s")
    return ok


def main(argv=None) -> int:
    args = parse_args(argv)
    report = Report(args.out)
    report.add(f"# bnpass GPU check ({time.strftime('%Y-%m-%d %H:%M:%S')})")
    report.add(f"torch {torch.__version__}, python {sys.version.split()[0]}")
    if args.dry_run:
        from benchmarks.gpu.dry_run import dry_run

        return dry_run(args, report)
    if not torch.cuda.is_available():
        report.add("no CUDA device: nothing measured (use --dry-run to check the CPU-side logic)")
        return 2
    import torch.distributed as dist
    import triton

    import bnpass

    bnpass.register()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    budget = Budget(args.budget_s)
    report.add(f"device {torch.cuda.get_device_name()}, triton {triton.__version__}, budget {args.budget_s:.0f} s")
    store = tempfile.NamedTemporaryFile(prefix="bnpass-gpu-check-", delete=False).name
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    try:
        ok = measure(args, report, dist.group.WORLD, budget)
    finally:
        dist.destroy_process_group()
        os.unlink(store)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
