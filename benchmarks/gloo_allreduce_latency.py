"""What bnpass's collectives cost on this machine: 20 blocking gloo all_reduces of resnet18's forward
payloads (2C+1 float64 for its 20 BatchNorms), 2 ranks x 1 thread, time per training-step direction.

    python benchmarks/gloo_allreduce_latency.py
"""

from __future__ import annotations

import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

RESNET18_BN_CHANNELS = [64] * 5 + [128] * 5 + [256] * 5 + [512] * 5


def rank_main(rank: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    payloads = [torch.randn(2 * c + 1, dtype=torch.float64) for c in RESNET18_BN_CHANNELS]
    for _ in range(20):  # warm-up
        for t in payloads:
            dist.all_reduce(t)
    dist.barrier()
    start, steps = time.perf_counter(), 50
    for _ in range(steps):
        for t in payloads:
            dist.all_reduce(t)
    per_direction = (time.perf_counter() - start) / steps
    if rank == 0:
        print(f"{len(payloads)} blocking gloo all_reduces (resnet18's forward payloads), 2 ranks x 1 "
              f"thread: {per_direction * 1e3:.1f} ms per step direction, "
              f"{per_direction / len(payloads) * 1e3:.2f} ms each")
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(rank_main, args=(tempfile.mktemp(prefix="bnpass-gloo-"),), nprocs=2)
