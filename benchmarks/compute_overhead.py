"""What bnpass costs apart from communication: resnet18 training-step time in ONE process on torch's
fake process group of 2 ranks (bnpass emits its collectives, which complete at once without moving
data), stock inductor vs bnpass, interleaved in rounds; no DDP. The difference from the 2-rank gloo
benchmark (cpu_resnet18.py) is what the collectives cost.

    python benchmarks/compute_overhead.py [--rounds 5 --steps 5] [--variants inductor,bnpass]

Variants: inductor, bnpass (each with its defaults: bnpass turns Inductor's layout optimization off
on the CPU, backends/inductor.py), and for that choice inductor-nolayout (stock Inductor with
layout_optimization=False) and bnpass-layout (bnpass with layout_optimization=True, Inductor's
default).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from cpu_variants import build, compiling, step  # noqa: E402 - benchmarks/ is on the path

VARIANTS = ("inductor", "bnpass", "inductor-nolayout", "bnpass-layout")  # cpu_variants.py's names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--variants", default="inductor,bnpass", help=", ".join(VARIANTS))
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    if set(variants) - set(VARIANTS) or "inductor" not in variants or len(variants) < 2:
        parser.error(f"--variants: two or more of {', '.join(VARIANTS)}, inductor among them")
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import bnpass  # noqa: F401 - the backend, also without the package installed

    bnpass.register()
    torch.set_num_threads(1)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    x, labels = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))
    runs, times = {}, {}
    for variant in variants:
        model, compiled = build(variant, ddp=False)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        runs[variant] = (compiled, opt)
        with compiling(variant):
            for _ in range(2):  # compile, then settle
                step(compiled, opt, x, labels)
    for _ in range(args.rounds):
        for variant, (compiled, opt) in runs.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step(compiled, opt, x, labels)
            times.setdefault(variant, []).append((time.perf_counter() - start) / args.steps * 1e3)
    median = {b: statistics.median(t) for b, t in times.items()}
    print(f"resnet18 64x64 batch 8, one process, fake group of 2, 1 thread; median of {args.rounds} "
          f"rounds x {args.steps} steps (load average {os.getloadavg()[0]:.1f}): "
          + ", ".join(f"{v} {median[v]:.1f} ms ({median[v] / median['inductor']:.3f} x inductor)"
                      for v in variants)
          + ". Rounds (ms): " + "; ".join(f"{b} " + " ".join(f"{t:.0f}" for t in ts) for b, ts in times.items()))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
