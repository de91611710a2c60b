"""Host µs to issue and to wait one all_reduce, per path torch offers, on the CPU (issue 16, item 3).

Paths, each an all_reduce(sum) of one tensor and the wait for it:
* ``functional``: ``_c10d_functional.all_reduce`` (out of place) + ``wait_tensor``: what a traced
  graph holds before Inductor;
* ``functional_inplace``: ``_c10d_functional.all_reduce_`` + ``wait_tensor``: what Inductor's
  generated wrapper calls for bnpass's collectives (bnpass/schedule.py's lowering, then Inductor);
* ``c10d_async``: ``dist.all_reduce(t, async_op=True)`` + ``work.wait()``;
* ``c10d_blocking``: ``dist.all_reduce(t)``;
* ``pg_method``: ``ProcessGroup.allreduce([t])`` + ``work.wait()``: the C++ method that
  ``dist.all_reduce`` ends in, without its Python wrapper.

Setups: a fake group of 2 in one process (torch's ``fake`` backend: nothing moves, so only the host
cost of each path is left), gloo with one rank, gloo with 2 ranks (2 processes, one thread each;
rank 0 reported). Payloads: bnpass's forward (2C+1 float64) and backward (2C float32) statistics
for C = 64 and 1024. Per rep every path runs ``--iters`` times, paths interleaved (the rep's order
rotates), each rep after a barrier; the figure is the median over reps of the mean µs per call.

    python benchmarks/host_collective_cost.py [--iters 200] [--reps 7] [--setups fake,gloo1,gloo2] [--results FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from results_file import append_results  # benchmarks/, the script's own folder

PAYLOADS = [(f"fwd C={c}", 2 * c + 1, torch.float64) for c in (64, 1024)] + \
           [(f"bwd C={c}", 2 * c, torch.float32) for c in (64, 1024)]
SETUPS = {"fake": ("fake", 2, 1), "gloo1": ("gloo", 1, 1), "gloo2": ("gloo", 2, 2)}  # backend, world, processes
BASELINE = "functional_inplace"


def paths(group):
    """name -> (issue(t) -> handle, wait(handle))."""
    c10d, name = torch.ops._c10d_functional, group.group_name
    return {
        "functional": (lambda t: c10d.all_reduce(t, "sum", name), c10d.wait_tensor),
        "functional_inplace": (lambda t: c10d.all_reduce_(t, "sum", name), c10d.wait_tensor),
        "c10d_async": (lambda t: dist.all_reduce(t, group=group, async_op=True), lambda w: w.wait()),
        "c10d_blocking": (lambda t: dist.all_reduce(t, group=group), lambda _: None),
        "pg_method": (lambda t: group.allreduce([t]), lambda w: w.wait()),
    }


def measure(group, iters: int, reps: int) -> dict:
    """{(payload, path): (issue µs, wait µs)}: medians over reps of the mean per call."""
    table = paths(group)
    names = list(table)
    out = {}
    for label, numel, dtype in PAYLOADS:
        t = torch.randn(numel, dtype=dtype) * 1e-3
        for issue, wait in table.values():  # warm-up
            for _ in range(20):
                wait(issue(t))
        samples = {n: [] for n in names}
        for rep in range(reps):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                issue, wait = table[name]
                dist.barrier(group=group)
                issue_s = wait_s = 0.0
                for _ in range(iters):
                    start = time.perf_counter()
                    handle = issue(t)
                    mid = time.perf_counter()
                    wait(handle)
                    issue_s += mid - start
                    wait_s += time.perf_counter() - mid
                samples[name].append((issue_s / iters * 1e6, wait_s / iters * 1e6))
        for name, s in samples.items():
            out[(label, name)] = (statistics.median(i for i, _ in s), statistics.median(w for _, w in s))
    return out


def rank_main(rank, setup, store, args, queue):
    torch.set_num_threads(1)
    backend, world, _ = SETUPS[setup]
    if backend == "fake":
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    else:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        out = measure(dist.group.WORLD, args.iters, args.reps)
        if rank == 0:
            queue.put(out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_setup(setup: str, args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    store = tempfile.mktemp(prefix="bnpass-host-cost-")
    procs = [ctx.Process(target=rank_main, args=(r, setup, store, args, queue)) for r in range(SETUPS[setup][2])]
    for p in procs:
        p.start()
    try:
        return queue.get(timeout=900)
    finally:
        for p in procs:
            p.join(60)
        if os.path.exists(store):
            os.unlink(store)


def table(setup: str, out: dict) -> list[str]:
    backend, world, procs = SETUPS[setup]
    lines = []
    for label, numel, _ in PAYLOADS:
        base = sum(out[(label, BASELINE)])
        names = [n for (lab, n) in out if lab == label]
        for name in names:
            issue, wait = out[(label, name)]
            lines.append(f"| {backend}, {world} rank(s), {procs} process(es) | {label} ({numel}) | {name} | "
                         f"{issue:.1f} | {wait:.1f} | {issue + wait:.1f} | {(issue + wait) / base:.2f} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument("--results", help="append the table to this markdown file")
    args = parser.parse_args(argv)
    lines = [f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, load average at "
             f"the start {os.getloadavg()[0]:.2f}, torch {torch.__version__}; median of {args.reps} reps x "
             f"{args.iters} calls per path, rank 0", "",
             f"| setup | payload (values) | path | issue µs | wait µs | issue + wait µs | vs {BASELINE} |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    print("\n".join(lines), flush=True)
    for setup in (s.strip() for s in args.setups.split(",") if s.strip()):
        for line in table(setup, run_setup(setup, args)):
            lines.append(line)
            print(line, flush=True)
    lines.append(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    print(lines[-1])
    if args.results:
        append_results(args.results, "host_collective_cost.py", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
