"""What each rank runs (imported by name in the spawned processes; see tests/harness.py)."""

from __future__ import annotations

import torch
import torch._dynamo

import bnpass
from tests.models import Spec, memory_format
from tests.training import train


def graph_breaks() -> int:
    return sum(torch._dynamo.utils.counters["graph_break"].values())


def compile_and_train(spec: Spec, rank: int) -> dict:
    """Train ``spec`` on this rank under torch.compile(backend="bnpass"); results and records."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    bnpass.clear_records()
    model = spec.build()
    if spec.memory_format != "contiguous":
        model = model.to(memory_format=memory_format(spec.memory_format))
    compiled = torch.compile(model, backend="bnpass", options=dict(spec.options))
    out = train(spec, model, compiled, rank)
    out["records"] = [r.to_json() for r in bnpass.compile_records()]
    out["graph_breaks"] = graph_breaks()
    return out


def train_specs(rank: int, world_size: int, specs: list) -> dict:
    return {spec.name: compile_and_train(spec, rank) for spec in specs}
