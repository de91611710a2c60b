"""Where a CPU training step's time goes: resnet18 64x64 batch 8, ONE process, 1 thread, torch's fake
process group of 2 (collectives, bnpass's and DDP's, complete at once without moving data), so what
is measured is the compiled work alone. Per variant, interleaved in rounds: forward (model + loss),
backward, optimizer (step + zero_grad), median ms of each; then, with ``--profile``, the torch
profiler's CPU ops of a few steps per variant, grouped (convolution forward, convolution backward,
other aten ops, Inductor's C++ kernels, the rest).

    python benchmarks/profile_cpu_step.py [--variants eager,inductor,bnpass-local,bnpass] [--ddp] [--profile]

Variants: benchmarks/cpu_variants.py's (bnpass: synced on the fake group, the collective calls cost
their dispatch only, through the process group: the fake group has no shared memory; bnpass-local:
the same compiled work, no collective; bnpass-nosplit, bnpass-<inductor key>=<value>, @whole, ...).
``--ddp`` wraps every model in DDP (DDP's buckets and Dynamo's DDPOptimizer graph split; a
communication hook that moves nothing). "graphs": AOTAutograd's count of compiled graphs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict

import torch
import torch.distributed as dist

from cpu_variants import build, compiling, spec, step  # noqa: E402 - benchmarks/ is on the path

def _no_transfer(state, bucket):
    """DDP communication hook: the bucket as it is (DDP's bucketing and copies, no all_reduce: the
    fake group's all_reduce has no result for DDP's default hook)."""
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def group_op(name: str) -> str:
    """The profile's op groups."""
    if name in ("aten::convolution_backward", "aten::mkldnn_convolution_backward",
                "aten::mkldnn_convolution_backward_input", "aten::mkldnn_convolution_backward_weights"):
        return "convolution backward"
    if name in ("aten::convolution", "aten::_convolution", "aten::mkldnn_convolution",
                "aten::conv2d"):
        return "convolution forward"
    if "cpp_fused" in name or "Compiled" in name or name.startswith("## Call CompiledFxGraph"):
        return "compiled graphs' own (Inductor's C++ kernels, wrapper)"
    if "all_reduce" in name or "wait_tensor" in name or "c10d" in name or "bnpass::shm" in name:
        return "collectives (fake)"
    if name.startswith("aten::"):
        return "other aten"
    return "other"


def profile(runs, x, labels, steps: int) -> list[str]:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    lines = []
    for variant, (compiled, opt) in runs.items():
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step(compiled, opt, x, labels)
        rows = prof.key_averages()
        groups = defaultdict(float)
        top = []
        for row in rows:
            self_ms = row.self_cpu_time_total / 1e3 / steps
            groups[group_op(row.key)] += self_ms
            top.append((self_ms, row.key, row.count // steps))
        top.sort(reverse=True)
        total = sum(groups.values())
        lines.append(f"{variant}: profiled {total:.1f} ms/step (self CPU time, profiler overhead included): "
                     + ", ".join(f"{g} {ms:.1f}" for g, ms in sorted(groups.items(), key=lambda kv: -kv[1])))
        lines += [f"    {ms:7.2f} ms  x{n:<3d} {key}" for ms, key, n in top[:12]]
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="eager,inductor,bnpass-local,bnpass")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--ddp", action="store_true", help="wrap every model in DDP (fake group)")
    parser.add_argument("--profile", action="store_true", help="then the torch profiler's CPU ops")
    parser.add_argument("--profile-steps", type=int, default=3)
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    for v in variants:
        try:
            spec(v)
        except ValueError as e:
            parser.error(str(e))
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import bnpass

    bnpass.register()
    torch.set_num_threads(1)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    x, labels = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))
    runs, graphs, compile_s = {}, {}, {}
    for variant in variants:
        model, compiled = build(variant, args.ddp, hook=_no_transfer)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        torch._dynamo.utils.counters.clear()
        start = time.perf_counter()
        with compiling(variant):
            for _ in range(2):  # compile, then settle
                step(compiled, opt, x, labels)
        compile_s[variant] = time.perf_counter() - start
        graphs[variant] = torch._dynamo.utils.counters["aot_autograd"]["total"]  # compiled graphs
        runs[variant] = (compiled, opt)
    times = {v: ([], [], []) for v in variants}
    for _ in range(args.rounds):
        for variant, (compiled, opt) in runs.items():
            acc = [0.0, 0.0, 0.0]
            for _ in range(args.steps):
                for i, t in enumerate(step(compiled, opt, x, labels)):
                    acc[i] += t
            for i in range(3):
                times[variant][i].append(acc[i] / args.steps * 1e3)
    med = {v: [statistics.median(t) for t in ts] for v, ts in times.items()}
    base = sum(med[variants[0]])
    lines = [f"resnet18 64x64 batch 8, one process, 1 thread, fake group of 2{', DDP' if args.ddp else ''}; "
             f"median of {args.rounds} rounds x {args.steps} steps; torch {torch.__version__}; load average "
             f"{os.getloadavg()[0]:.2f} at the end; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             "", f"| variant | forward ms | backward ms | optimizer ms | step ms | vs {variants[0]} | "
             "graphs | first 2 steps (s) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for v in variants:
        f, b, o = med[v]
        lines.append(f"| {v} | {f:.1f} | {b:.1f} | {o:.1f} | {f + b + o:.1f} | {(f + b + o) / base:.3f} | "
                     f"{graphs[v] if v != 'eager' else '-'} | {compile_s[v]:.1f} |")
    lines.append("")
    lines.append("Rounds (step ms): " + "; ".join(
        f"{v} " + " ".join(f"{sum(r):.0f}" for r in zip(*times[v])) for v in variants))
    print("\n".join(lines), flush=True)
    if args.profile:
        print("\n".join([""] + profile(runs, x, labels, args.profile_steps)))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
