"""Collective latency on this host: gloo all_reduce vs bnpass's shared-memory all_reduce
(``torch.ops.bnpass.shm_all_reduce``, bnpass/transport), for resnet18's statistics payloads, 2, 3
and 4 ranks x 1 thread. One blocking all_reduce at a time, as in a synced step: forward 2C+1 float64
and backward 2C float32 for C = 64, 128, 256, 512 (the packed downsample payloads are about twice
these). Median over repetitions of the mean time per all_reduce, rank 0.

    python benchmarks/shm_allreduce_latency.py [--ranks 2,3,4] [--iters 200] [--reps 5] [--results benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from results_file import append_results  # benchmarks/, the script's own folder

PAYLOADS = [(f"fwd C={c}", 2 * c + 1, torch.float64) for c in (64, 128, 256, 512)] + \
           [(f"bwd C={c}", 2 * c, torch.float32) for c in (64, 512)]


def rank_main(rank, world, store, args, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    from bnpass.transport import SHM_ALL_REDUCE
    from bnpass.transport.channel import channel_for

    group = dist.group.WORLD.group_name
    assert channel_for(group, 60.0) is not None, "no shared-memory channel on this host"
    transports = {"gloo": lambda t: (dist.all_reduce(t), t)[1],
                  "shm": lambda t: SHM_ALL_REDUCE(t, "sum", group)}
    out = {}
    for label, numel, dtype in PAYLOADS:
        t = torch.randn(numel, dtype=dtype)
        for name, fn in transports.items():
            for _ in range(20):
                fn(t)
            reps = []
            for _ in range(args.reps):
                dist.barrier()
                start = time.perf_counter()
                for _ in range(args.iters):
                    fn(t)
                reps.append((time.perf_counter() - start) / args.iters)
            out[(label, name)] = statistics.median(reps)
    if rank == 0:
        queue.put(out)
    dist.barrier()
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", default="2,3,4")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--results", help="append the table to this markdown file")
    args = parser.parse_args()
    lines = [f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, load "
             f"average at the start {os.getloadavg()[0]:.2f}, torch {torch.__version__}; median of "
             f"{args.reps} x {args.iters} blocking all_reduces, rank 0", "",
             "| ranks | payload | values | gloo µs | shm µs | gloo / shm |",
             "| --- | --- | --- | --- | --- | --- |"]
    print("\n".join(lines), flush=True)
    for world in map(int, args.ranks.split(",")):
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        store = tempfile.mktemp(prefix="bnpass-latency-")
        procs = [ctx.Process(target=rank_main, args=(r, world, store, args, queue)) for r in range(world)]
        for p in procs:
            p.start()
        out = queue.get(timeout=600)
        for p in procs:
            p.join()
        for label, numel, _ in PAYLOADS:
            gloo, shm = out[(label, "gloo")] * 1e6, out[(label, "shm")] * 1e6
            lines.append(f"| {world} | {label} | {numel} | {gloo:.0f} | {shm:.1f} | {gloo / shm:.0f} |")
            print(lines[-1], flush=True)
    lines.append(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    print(lines[-1])
    if args.results:
        append_results(args.results, "shm_allreduce_latency.py", lines)


if __name__ == "__main__":
    main()
