"""What each rank runs for tests/test_join.py: DDP's Join with bnpass on uneven epochs, and the
float64 reference over the batches that were really trained."""

from __future__ import annotations

import time

import torch
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel as DDP

import bnpass
from tests.models import MLPHead
from tests.rank_jobs import graph_breaks

BATCH_SIZES = (4, 3, 2)  # samples per batch on ranks 0, 1, 2


def data(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s batch of step ``step`` and its loss weights (loss = sum(y * w))."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    n = BATCH_SIZES[rank]
    return torch.randn(n, 5, generator=g) * 2 + 1, torch.randn(n, 6, generator=g)


def build(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return MLPHead().to(dtype)


def _state(model: torch.nn.Module) -> dict:
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "buffers": {n: b.clone() for n, b in model.named_buffers()}}


def train_uneven(rank: int, batches: tuple, backend: str, options: dict, divide: bool,
                 bnpass_first: bool = True) -> dict:
    """``batches[rank]`` SGD steps of a DDP(compiled MLPHead) under Join([bnpass.Joinable, DDP])
    (``bnpass_first`` false: Join([DDP, bnpass.Joinable]))."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    bnpass.clear_records()
    model = build()
    ddp = DDP(torch.compile(model, backend=backend, options=options))
    joinable = bnpass.Joinable(ddp)  # before the model's first call
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    ys = []
    start = time.monotonic()
    with Join([joinable, ddp] if bnpass_first else [ddp, joinable], divide_by_initial_world_size=divide):
        for step in range(batches[rank]):
            x, w = data(step, rank)
            y = ddp(x)
            (y * w).sum().backward()
            opt.step()
            opt.zero_grad()
            ys.append(y.detach().clone())
    return {"y": ys, **_state(model), "records": [r.to_json() for r in bnpass.compile_records()],
            "graph_breaks": graph_breaks(), "answered": dict(joinable.answered),
            "join_group": joinable.group.group_name, "seconds": time.monotonic() - start}


def join_cases(rank: int, world_size: int, cases: list) -> dict:
    """Each case (name, batches per rank, backend, options, divide_by_initial_world_size) in turn."""
    return {name: train_uneven(rank, batches, backend, options, divide)
            for name, batches, backend, options, divide in cases}


def join_refused(rank: int, world_size: int, batches: tuple, bnpass_first: bool = True) -> dict:
    """A Join that bnpass refuses (a rank with no batch at all in this process, or bnpass's
    Joinable not first): what every rank raises, and how soon."""
    start = time.monotonic()
    try:
        train_uneven(rank, batches, "bnpass_eager", {}, True, bnpass_first)
    except bnpass.BNPassError as e:
        return {"error": str(e), "seconds": time.monotonic() - start, "exit_now": True}
    return {"error": None, "seconds": time.monotonic() - start}


def reference(batches: tuple, divide: bool) -> dict:
    """float64, one process: each step on the concatenation of the batches of the ranks that still
    have one; gradients summed over those ranks and divided as DDP under Join divides them (by the
    initial world size, or by the ranks still training)."""
    model = build(torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ys = []
    for step in range(max(batches)):
        active = [r for r, n in enumerate(batches) if n > step]
        xs, ws = zip(*(data(step, r) for r in active))
        y = model(torch.cat(xs).double())
        (y * torch.cat(ws).double()).sum().backward()
        for p in model.parameters():
            p.grad /= len(batches) if divide else len(active)
        opt.step()
        opt.zero_grad()
        ys.append(dict(zip(active, y.detach().split([BATCH_SIZES[r] for r in active]))))
    return {"y": ys, **_state(model)}
