"""What each rank runs for tests/test_join.py: DDP's Join with bnpass on uneven epochs, and the
float64 reference over the batches that were really trained."""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F
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


class BrokenHead(MLPHead):
    """MLPHead with a graph break between its BatchNorms: two compiled graphs per step."""

    def forward(self, x):
        y = F.relu(self.bn1(self.fc1(x)))
        torch._dynamo.graph_break()
        return self.bn2(self.fc2(y))


def build(dtype=torch.float32, model: str = "MLPHead") -> torch.nn.Module:
    torch.manual_seed(0)
    return {"MLPHead": MLPHead, "BrokenHead": BrokenHead}[model]().to(dtype)


def _state(model: torch.nn.Module) -> dict:
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "buffers": {n: b.clone() for n, b in model.named_buffers()}}


def steps_of(epochs: tuple) -> list[list[int]]:
    """The global steps, each the ranks that still have a batch in it: ``epochs[e][r]`` batches of
    rank r in epoch e, one Join per epoch."""
    return [[r for r, n in enumerate(batches) if n > i] for batches in epochs for i in range(max(batches))]


def train_uneven(rank: int, epochs: tuple, backend: str = "bnpass_eager", options: dict | None = None,
                 divide: bool = True, bnpass_first: bool = True, eval_bn2_at: int | None = None,
                 broadcast_buffers: bool = True, model: str = "MLPHead", join_from_epoch: int = 0,
                 throw: bool = False) -> dict:
    """SGD steps of a DDP(compiled ``model``), each epoch under its own
    ``Join([bnpass.Joinable(ddp), ddp])`` (``bnpass_first`` false: the other order), rank r
    training ``epochs[e][r]`` batches in epoch e; from this rank's step ``eval_bn2_at`` on, bn2 in
    eval mode (a graph with other collectives); ``divide``: Join's divide_by_initial_world_size;
    ``broadcast_buffers``: DDP's; epochs before ``join_from_epoch`` run before any Joinable is made,
    without Join (their batches must be even); ``throw``: Join's throw_on_early_termination.
    ``y``: (global step, output) of each step run."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    bnpass.clear_records()
    model = build(model=model)
    ddp = DDP(torch.compile(model, backend=backend, options=options or {}), broadcast_buffers=broadcast_buffers)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    ys, answered, mine = [], {"steps": 0, "collectives": 0}, 0
    start = time.monotonic()
    global_step = 0
    for epoch, batches in enumerate(epochs):
        joined = epoch >= join_from_epoch
        context = contextlib.nullcontext()
        if joined:
            joinable = bnpass.Joinable(ddp)  # before the model's first call (and again each epoch)
            context = Join([joinable, ddp] if bnpass_first else [ddp, joinable],
                           throw_on_early_termination=throw, divide_by_initial_world_size=divide)
        with context:
            for i in range(batches[rank]):
                if mine == eval_bn2_at:
                    model.bn2.eval()
                x, w = data(global_step + i, rank)
                y = ddp(x)
                (y * w).sum().backward()
                opt.step()
                opt.zero_grad()
                ys.append((global_step + i, y.detach().clone()))
                mine += 1
        global_step += max(batches)
        if joined:
            answered = {k: answered[k] + joinable.answered[k] for k in answered}
    return {"y": ys, **_state(model), "records": [r.to_json() for r in bnpass.compile_records()],
            "graph_breaks": graph_breaks(), "answered": answered,
            "graph_break_reasons": {k[:400]: v for k, v in torch._dynamo.utils.counters["graph_break"].items()},
            "join_group": joinable.group.group_name, "seconds": time.monotonic() - start}


def join_cases(rank: int, world_size: int, cases: dict) -> dict:
    """Each case (name -> train_uneven's keyword arguments) in turn."""
    return {name: train_uneven(rank, **kwargs) for name, kwargs in cases.items()}


def join_refused(rank: int, world_size: int, kwargs: dict) -> dict:
    """A Join that bnpass refuses (a rank with no batch at all in this process, bnpass's Joinable
    not first, a step that compiles other collectives after a rank joined): what each rank raises
    (``bnpass``: whether a BNPassError), and how soon. ``kwargs``: train_uneven's."""
    start = time.monotonic()
    try:
        train_uneven(rank, **kwargs)
    except Exception as e:  # noqa: BLE001 - reported to the test
        return {"error": str(e), "bnpass": isinstance(e, bnpass.BNPassError),
                "seconds": time.monotonic() - start, "exit_now": True}
    return {"error": None, "seconds": time.monotonic() - start}


def reference(epochs: tuple, divide: bool) -> dict:
    """float64, one process: each step on the concatenation of the batches of the ranks that still
    have one; gradients summed over those ranks and divided as DDP under Join divides them (by the
    initial world size, or by the ranks still training). ``y``: per step, rank -> its output;
    ``buffers_after``: the buffers after each step."""
    model = build(torch.float64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ys, buffers_after = [], []
    for step, active in enumerate(steps_of(epochs)):
        xs, ws = zip(*(data(step, r) for r in active))
        y = model(torch.cat(xs).double())
        (y * torch.cat(ws).double()).sum().backward()
        for p in model.parameters():
            p.grad /= len(epochs[0]) if divide else len(active)
        opt.step()
        opt.zero_grad()
        ys.append(dict(zip(active, y.detach().split([BATCH_SIZES[r] for r in active]))))
        buffers_after.append(_state(model)["buffers"])
    return {"y": ys, **_state(model), "buffers_after": buffers_after}
