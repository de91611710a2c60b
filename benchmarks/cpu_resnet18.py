"""CPU benchmark: resnet18 training-step time, eager vs inductor (both unsynced) vs bnpass (synced).

torchvision resnet18 (10 classes), 64x64 images, batch 8 per rank, 2 gloo ranks x 1 thread, DDP in
every variant, SGD. All variants run in one process tree, interleaved in rounds (eager, inductor,
bnpass, eager, ...) so that machine noise hits them alike; the figure is the median over rounds of
the mean step time of a round, on rank 0.

    python benchmarks/cpu_resnet18.py [--rounds 7 --steps 10] [--results benchmarks/RESULTS.md]
    python benchmarks/cpu_resnet18.py --variants eager,inductor,bnpass,bnpass-pg,bnpass-local,bnpass_eager
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

VARIANTS = ("eager", "inductor", "bnpass")
# bnpass-group: statistics reduced over a process group of their own (options["process_group"]),
# so that they do not queue behind DDP's gradient buckets on the default group.
# bnpass-unscheduled: one all_reduce per BatchNorm per direction, in traced order, each waited for at
# once (options pack_collectives=False, overlap=False: bnpass before its schedule, bnpass/schedule.py).
# bnpass-nosplit: convolution backwards kept whole (bnpass splits them on the CPU so that a weight
# gradient runs while a collective is in flight: backends/inductor.py split_conv_backwards).
# bnpass-layout: Inductor's layout optimization on (bnpass turns it off on the CPU).
# bnpass-pg: the statistics through the process group (gloo) instead of shared memory
# (options transport="process_group", bnpass/transport); bnpass-local: the same compiled work with
# each rank's own statistics and no collective (group_size=1): bnpass / bnpass-local is the sync tax.
EXTRA_VARIANTS = ("bnpass-group", "bnpass-unscheduled", "bnpass-nosplit", "bnpass-layout", "bnpass-pg",
                  "bnpass-local", "bnpass_eager")
OPTIONS = {"bnpass-pg": {"transport": "process_group"}, "bnpass-local": {"group_size": 1},
           "bnpass-unscheduled": {"pack_collectives": False, "overlap": False},
           "bnpass-layout": {"inductor_config": {"layout_optimization": True}}}


def build(variant: str, stats_group=None):
    import torchvision

    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(torchvision.models.resnet18(num_classes=10))
    if variant == "eager":
        return model, model
    if variant == "bnpass-group":
        return model, torch.compile(model, backend="bnpass", options={"process_group": stats_group})
    if variant in OPTIONS:
        return model, torch.compile(model, backend="bnpass", options=OPTIONS[variant])
    if variant == "bnpass-nosplit":
        return model, torch.compile(model, backend="bnpass")
    return model, torch.compile(model, backend=variant)


@contextlib.contextmanager
def compiling(variant: str):
    """Around a variant's first steps (its compile): bnpass-nosplit's schedule keeps convolution
    backwards whole."""
    import bnpass.backends.inductor as lowering

    keep = lowering.split_conv_backwards
    if variant == "bnpass-nosplit":
        lowering.split_conv_backwards = lambda device: False
    try:
        yield
    finally:
        lowering.split_conv_backwards = keep


def step(model, compiled, opt, images, labels):
    loss = F.cross_entropy(compiled(images), labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def rank_main(rank, world, store, args, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(rank)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    labels = torch.randint(0, 10, (args.batch,), generator=g)
    runs = {}
    compile_s = {}
    stats_group = dist.new_group() if "bnpass-group" in args.variants else None
    import bnpass

    records = {}
    for variant in args.variants:
        model, compiled = build(variant, stats_group)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        start = time.perf_counter()
        seen = len(bnpass.compile_records())
        with compiling(variant):
            for _ in range(2):  # the first step compiles; the second settles allocations
                step(model, compiled, opt, images, labels)
        compile_s[variant] = time.perf_counter() - start
        records[variant] = bnpass.compile_records()[seen:]
        runs[variant] = (model, compiled, opt)
    times = {v: [] for v in args.variants}
    for _ in range(args.rounds):
        for variant in args.variants:
            model, compiled, opt = runs[variant]
            dist.barrier()
            start = time.perf_counter()
            for _ in range(args.steps):
                step(model, compiled, opt, images, labels)
            times[variant].append((time.perf_counter() - start) / args.steps)
    if rank == 0:
        mine = records["bnpass"] if "bnpass" in records else next(
            (r for v, r in records.items() if v.startswith("bnpass")), [])
        queue.put({
            "times": times, "compile_s": compile_s,
            "sites": sum(len(r.sites) for r in mine),
            "synced": sum(r.count("sync") for r in mine),
            "collectives": {d: sum(r.collectives[d] for r in mine) for d in ("forward", "backward")},
            "unpacked": {d: sum(r.collectives_unpacked[d] for r in mine) for d in ("forward", "backward")},
            "transports": {v: sorted({c["transport"] for r in recs for seq in r.sequence.values() for c in seq})
                           for v, recs in records.items()},
        })
    dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--results", help="append the table to this markdown file")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from {', '.join(VARIANTS + EXTRA_VARIANTS)} (inductor is required)")
    args = parser.parse_args(argv)
    args.variants = tuple(args.variants.split(","))
    unknown = set(args.variants) - set(VARIANTS + EXTRA_VARIANTS)
    if unknown or "inductor" not in args.variants:
        parser.error(f"--variants: unknown {sorted(unknown)} or no inductor (the baseline)")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=rank_main, args=(r, 2, os.path.join(tmp, "store"), args, queue))
                 for r in range(2)]
        for p in procs:
            p.start()
        result = queue.get(timeout=3600)
        for p in procs:
            p.join()
    median = {v: statistics.median(result["times"][v]) * 1e3 for v in args.variants}
    lines = [
        f"resnet18, {args.size}x{args.size}, batch {args.batch} per rank, 2 gloo ranks x 1 thread, DDP; "
        f"median of {args.rounds} rounds x {args.steps} steps; torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; load average at the "
        f"end {os.getloadavg()[0]:.2f}",
        "",
        "| variant | BN | transport | step time (ms) | vs eager | vs inductor | first 2 steps (s, compile) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for v in args.variants:
        bn = "local" if v == "bnpass-local" else "synced" if v.startswith("bnpass") else "unsynced"
        transport = ", ".join(result["transports"].get(v, [])) or "-"
        vs_eager = f"{median[v] / median['eager']:.3f}" if "eager" in median else "-"
        lines.append(f"| {v} | {bn} | {transport} | {median[v]:.1f} | {vs_eager} | "
                     f"{median[v] / median['inductor']:.3f} | {result['compile_s'][v]:.1f} |")
    if "bnpass" in median and "bnpass-local" in median:
        lines += ["", f"sync tax (bnpass / bnpass-local): {median['bnpass'] / median['bnpass-local']:.3f}"]
    lines += ["", f"bnpass: {result['sites']} BN sites, {result['synced']} synced, collectives per step: "
              f"forward {result['collectives']['forward']}, backward {result['collectives']['backward']} "
              f"(unpacked: {result['unpacked']['forward']}, {result['unpacked']['backward']}). "
              f"Rounds (ms): " + "; ".join(
                  f"{v} " + " ".join(f"{t * 1e3:.0f}" for t in result["times"][v]) for v in args.variants)]
    text = "\n".join(lines)
    print(text)
    if args.results:
        with open(args.results, "a") as f:
            f.write(f"\n### {time.strftime('%Y-%m-%d')}: `python benchmarks/cpu_resnet18.py"
                    f"{' ' + ' '.join(argv or sys.argv[1:])}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
