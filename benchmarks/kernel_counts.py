"""Kernels per synced BatchNorm site: Inductor's generated code for one training step, stock
Inductor against bnpass, per direction. One process on torch's fake process group of 2 ranks
(bnpass emits its collectives, which complete at once), a fresh Inductor cache directory.

    python benchmarks/kernel_counts.py [--model tiny|resnet18|...] [--json]

``kernels``: kernel definitions in the generated code (on the CPU each is one C++ build, the cold
compile's main cost; identical kernels are built once); ``calls``: kernel calls per step (on a GPU
each is a launch). bnpass's extra per site per direction is (bnpass - inductor) / synced sites.
On the CPU, Inductor emits each run of fusable work between two extern calls as one C++ kernel, and
stock Inductor computes a BatchNorm's statistics and normalizes in one; bnpass's collective sits
between the two, so 1 kernel per site per direction more than stock is the floor there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile

_DEFINITION = re.compile(r"^(\w+) = async_compile\.\w+\(", re.M)
_ALL_REDUCE = "torch.ops._c10d_functional.all_reduce_.default("


def tiny():
    """Two Conv-BN-ReLU blocks, 16 channels (the fusion heuristics treat much narrower per-channel
    buffers differently)."""
    import torch.nn as nn

    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())


def _model_and_input(name: str):
    import torch

    torch.manual_seed(0)
    if name == "tiny":
        return tiny(), torch.randn(4, 3, 8, 8)
    import torchvision

    return getattr(torchvision.models, name)(num_classes=10), torch.randn(8, 3, 64, 64)


def _code_counts(code: str) -> dict:
    names = _DEFINITION.findall(code)
    calls = sum(len(re.findall(rf"^\s+{re.escape(n)}\(", code, re.M)) for n in names)
    return {"kernels": len(names), "calls": calls, "all_reduces": code.count(_ALL_REDUCE)}


def count_step(name: str, backend: str, options: dict) -> dict:
    """{"forward": {...}, "backward": {...}} for one training step of model ``name``."""
    import torch
    from torch._inductor.utils import run_and_get_code

    model, x = _model_and_input(name)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, options=options)
    _, codes = run_and_get_code(lambda: compiled(x).sum().backward())
    if len(codes) != 2:
        raise RuntimeError(f"{name} under {backend}: expected one forward and one backward graph, got {len(codes)}")
    return dict(zip(("forward", "backward"), map(_code_counts, codes)))


def measure(name: str) -> dict:
    """Counts for stock Inductor (with the Inductor configuration bnpass picks for the CPU, so
    that only the BatchNorms differ) and bnpass, and bnpass's synced sites."""
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import bnpass
    from bnpass.backends.inductor import device_inductor_config

    bnpass.register()
    torch.set_num_threads(1)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        out = {"model": name, "inductor": count_step(name, "inductor", device_inductor_config("cpu"))}
        bnpass.clear_records()
        out["bnpass"] = count_step(name, "bnpass", {})
        out["synced"] = sum(r.count("sync") for r in bnpass.compile_records())
    finally:
        dist.destroy_process_group()
    return out


def report(c: dict) -> str:
    lines = [f"{c['model']}: {c['synced']} synced sites, one training step, fake group of 2 "
             "(inductor: with bnpass's CPU configuration)",
             "| direction | inductor kernels / calls | bnpass kernels / calls | all_reduces | "
             "extra calls per site |", "| --- | --- | --- | --- | --- |"]
    for d in ("forward", "backward"):
        i, b = c["inductor"][d], c["bnpass"][d]
        extra = (b["calls"] - i["calls"]) / max(c["synced"], 1)
        lines.append(f"| {d} | {i['kernels']} / {i['calls']} | {b['kernels']} / {b['calls']} | "
                     f"{b['all_reduces']} | {extra:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny, or a torchvision model name")
    parser.add_argument("--json", action="store_true", help="print the counts as one JSON line")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bnpass-kernels-") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # before Inductor reads it: a cold compile
        counts = measure(args.model)
    print(json.dumps(counts) if args.json else report(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
