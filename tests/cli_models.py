"""Tiny models for the ``bnpass inspect`` tests (tests/test_inspect_*.py), and the 2-rank job that compiles
the same models for real to check the CLI's collective counts.

Factories take no arguments (TARGET ``tests/cli_models.py:NAME`` or ``tests.cli_models:NAME``).
"""

from __future__ import annotations

import torch
import torch._dynamo
import torch.nn as nn
import torch.nn.functional as F


class Tiny(nn.Module):
    """Conv-BN-ReLU, Conv-BN(momentum=None), a functional batch_norm, and a BN kept in eval mode:
    three sites to sync (on a group of 2) and one to skip."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4, momentum=None)
        self.frozen = nn.BatchNorm2d(4)
        self.weight = nn.Parameter(torch.ones(4))

    def train(self, mode: bool = True):
        super().train(mode)
        self.frozen.eval()
        return self

    def forward(self, x):
        a = F.relu(self.bn1(self.conv1(x)))
        b = self.bn2(self.conv2(a)) + a
        c = F.batch_norm(b, None, None, self.weight, None, True, 0.0, 1e-5)
        return self.frozen(c)


class Broken(nn.Module):
    """One BN on each side of a graph break: two compiled graphs."""

    def __init__(self):
        super().__init__()
        self.bn_a = nn.BatchNorm2d(3)
        self.bn_b = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.bn_a(x)
        torch._dynamo.graph_break()
        return self.bn_b(y * 2)


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return Tiny().train()


def tiny_eval() -> nn.Module:
    """The same model, handed over in eval mode (the CLI keeps a factory's train/eval state)."""
    return tiny().eval()


def broken() -> nn.Module:
    torch.manual_seed(0)
    return Broken()


def no_bn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.LayerNorm([4, 4, 4]))


def not_a_module():
    return 3


def raises() -> nn.Module:
    raise RuntimeError("this factory fails on purpose")


def _train_step(rank: int, factory: str, input_shape: tuple) -> dict:
    """One training step of ``factory()`` on this rank under ``torch.compile(backend="bnpass")``, as
    ``bnpass inspect`` runs it (loss = sum of the output); bnpass's records and the graph breaks."""
    import bnpass

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    bnpass.clear_records()
    compiled = torch.compile(globals()[factory](), backend="bnpass")
    x = torch.randn(input_shape, generator=torch.Generator().manual_seed(rank))
    compiled(x).sum().backward()
    return {
        "records": [r.to_json() for r in bnpass.compile_records()],
        "graph_breaks": int(sum(torch._dynamo.utils.counters["graph_break"].values())),
    }


def rank_jobs(rank: int, world_size: int, jobs: dict) -> dict:
    """tests/harness.py job: {name: (input shape, factory)} -> {name: _train_step(...)} on this rank."""
    return {name: _train_step(rank, factory, shape) for name, (shape, factory) in jobs.items()}
