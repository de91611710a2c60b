"""CPU benchmark: resnet18 training-step time, eager vs inductor (both unsynced) vs bnpass (synced).

torchvision resnet18 (10 classes), 64x64 images, batch 8 per rank, 2 gloo ranks x 1 thread, DDP in
every variant, SGD. All variants run in one process tree, interleaved in rounds (eager, inductor,
bnpass, eager, ...) so that machine noise hits them alike; the figure is the median over rounds of
the mean step time of a round, on rank 0.

    python benchmarks/cpu_resnet18.py [--rounds 7 --steps 10] [--results benchmarks/RESULTS.md]
    python benchmarks/cpu_resnet18.py --variants eager,inductor,bnpass,bnpass-pg,bnpass-local,bnpass_eager

The variants are benchmarks/cpu_variants.py's (bnpass-pg: the statistics through gloo; bnpass-local:
no collective, the sync tax's baseline; bnpass-nosplit; bnpass-blocking; ``@whole``: no DDPOptimizer
graph split; ...). Per variant the table gives the step time, its forward / backward / optimizer
phases (backward includes the wait for DDP's gradient all_reduce), the time per step rank 0 spent in
the same-host transport's calls (bnpass/transport/channel.py: almost all of it waiting for the other
rank), the graphs compiled (AOTAutograd's count: DDP's graph split shows here) and the convolution
backwards bnpass split. ``--grad-comm none`` gives every variant's DDP a communication hook that
moves nothing (no gradient all_reduce: what the gradient traffic costs each variant).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cpu_variants import NAMES, build, compiling, spec, step  # benchmarks/, the script's own folder
from results_file import append_results

VARIANTS = ("eager", "inductor", "bnpass")


def _time_transport(spent: list) -> None:
    """Add the wall time of every same-host transport call of this process to ``spent[0]``."""
    from bnpass.transport.channel import Channel

    for name in ("all_reduce_sum", "issue", "wait"):
        def timed(self, tensor, inner=getattr(Channel, name)):
            start = time.perf_counter()
            try:
                return inner(self, tensor)
            finally:
                spent[0] += time.perf_counter() - start

        setattr(Channel, name, timed)


def _no_gradient_traffic(state, bucket):
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


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

    spent = [0.0]
    _time_transport(spent)
    hook = _no_gradient_traffic if args.grad_comm == "none" else None
    records, graphs = {}, {}
    for variant in args.variants:
        model, compiled = build(variant, True, stats_group, hook)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        start = time.perf_counter()
        seen = len(bnpass.compile_records())
        torch._dynamo.utils.counters.clear()
        with compiling(variant):
            for _ in range(2):  # the first step compiles; the second settles allocations
                step(compiled, opt, images, labels)
        compile_s[variant] = time.perf_counter() - start
        records[variant] = bnpass.compile_records()[seen:]
        graphs[variant] = torch._dynamo.utils.counters["aot_autograd"]["total"]  # compiled graphs
        runs[variant] = (compiled, opt)
    times = {v: [] for v in args.variants}
    phases = {v: [] for v in args.variants}
    transport = {v: [] for v in args.variants}
    for _ in range(args.rounds):
        for variant in args.variants:
            compiled, opt = runs[variant]
            dist.barrier()
            spent[0] = 0.0
            start = time.perf_counter()
            acc = [0.0, 0.0, 0.0]
            for _ in range(args.steps):
                acc = [a + t for a, t in zip(acc, step(compiled, opt, images, labels))]
            times[variant].append((time.perf_counter() - start) / args.steps)
            transport[variant].append(spent[0] / args.steps)
            phases[variant].append([a / args.steps for a in acc])
    if rank == 0:
        mine = records["bnpass"] if "bnpass" in records else next(
            (r for v, r in records.items() if v.startswith("bnpass")), [])
        queue.put({
            "times": times, "phases": phases, "transport_s": transport, "compile_s": compile_s, "graphs": graphs,
            "sites": sum(len(r.sites) for r in mine),
            "synced": sum(r.count("sync") for r in mine),
            "collectives": {d: sum(r.collectives[d] for r in mine) for d in ("forward", "backward")},
            "unpacked": {d: sum(r.collectives_unpacked[d] for r in mine) for d in ("forward", "backward")},
            "transports": {v: sorted({c["transport"] for r in recs for seq in r.sequence.values() for c in seq})
                           for v, recs in records.items()},
            "split": {v: sum(rep.split_conv_backwards for r in recs for rep in r.schedules.values())
                      for v, recs in records.items()},
        })
    dist.destroy_process_group()


def _first_result(queue, procs, deadline_s: float = 3600.0):
    """Rank 0's result; a RuntimeError naming the rank as soon as one exits without it (its
    traceback is above, on stderr), or at the deadline."""
    import queue as queues

    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            return queue.get(timeout=2)
        except queues.Empty:
            dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"rank(s) {[r for r, _ in dead]} exited with {[c for _, c in dead]} "
                                   "before the results (their traceback is above)")
    for p in procs:
        p.kill()
    raise RuntimeError(f"no result within {deadline_s:g} s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--results", help="append the table to this markdown file")
    parser.add_argument("--grad-comm", choices=("ddp", "none"), default="ddp",
                        help="none: DDP's gradient all_reduce replaced by a hook that moves nothing")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, inductor among them: {', '.join(NAMES)}, "
                        "bnpass-<inductor key>=<value>, each optionally @whole (benchmarks/cpu_variants.py)")
    args = parser.parse_args(argv)
    args.variants = tuple(args.variants.split(","))
    if "inductor" not in args.variants:
        parser.error("--variants: inductor (the baseline) is required")
    try:
        for variant in args.variants:
            spec(variant)
    except ValueError as e:
        parser.error(f"--variants: {e}")
    load_start, started = os.getloadavg()[0], time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=rank_main, args=(r, 2, os.path.join(tmp, "store"), args, queue))
                 for r in range(2)]
        for p in procs:
            p.start()
        result = _first_result(queue, procs)
        for p in procs:
            p.join()
    median = {v: statistics.median(result["times"][v]) * 1e3 for v in args.variants}
    lines = [
        f"resnet18, {args.size}x{args.size}, batch {args.batch} per rank, 2 gloo ranks x 1 thread, DDP; "
        f"median of {args.rounds} rounds x {args.steps} steps; torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; started {started}, load "
        f"average {load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end (the run's own 2 ranks "
        "count: a quiet machine ends near 2)" + ("; DDP's gradient all_reduce replaced by a hook that moves "
                                                 "nothing" if args.grad_comm == "none" else ""),
        "",
        "| variant | BN | transport | step time (ms) | vs eager | vs inductor | forward / backward / optimizer (ms) "
        "| in shared memory (ms) | graphs | conv backwards split | first 2 steps (s, compile) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for v in args.variants:
        bn = "local" if v.startswith("bnpass-local") else "synced" if v.startswith("bnpass") else "unsynced"
        phase = " / ".join(f"{statistics.median(p[i] for p in result['phases'][v]) * 1e3:.1f}" for i in range(3))
        split = result["split"][v] if v.startswith("bnpass") else "-"
        transport = ", ".join(result["transports"].get(v, [])) or "-"
        vs_eager = f"{median[v] / median['eager']:.3f}" if "eager" in median else "-"
        lines.append(f"| {v} | {bn} | {transport} | {median[v]:.1f} | {vs_eager} | "
                     f"{median[v] / median['inductor']:.3f} | {phase} | "
                     f"{statistics.median(result['transport_s'][v]) * 1e3:.1f} | {result['graphs'][v] or '-'} | {split} | "
                     f"{result['compile_s'][v]:.1f} |")
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
        append_results(args.results, "cpu_resnet18.py", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
