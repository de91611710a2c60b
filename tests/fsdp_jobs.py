"""Rank-side jobs of tests/test_fsdp_autocast.py: FSDP2 ``fully_shard`` and CPU autocast around a
bnpass-compiled model, trained with the protocol of tests/training.py."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import bnpass
from tests.models import Spec
from tests.rank_jobs import graph_breaks
from tests.training import train

BF16_POLICY = "bf16"  # MixedPrecisionPolicy(param_dtype=torch.bfloat16)


def _policy(name: str) -> dict:
    return {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16)} if name == BF16_POLICY else {}


def _full(out: dict) -> dict:
    """FSDP2's gradients are DTensor shards: the whole tensors (a collective, same order on every rank)."""
    out["grads"] = [{n: g.full_tensor() if hasattr(g, "full_tensor") else g for n, g in step.items()}
                    for step in out["grads"]]
    return out


def _records(out: dict) -> dict:
    out["records"] = [r.to_json() for r in bnpass.compile_records()]
    out["graph_breaks"] = graph_breaks()
    out["graph_break_reasons"] = {k[:400]: v for k, v in torch._dynamo.utils.counters["graph_break"].items()}
    return out


def _reset() -> None:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    bnpass.clear_records()


def fsdp(rank: int, world_size: int, spec: Spec, policy: str) -> dict:
    """``fully_shard(model)`` then ``torch.compile(model, backend=spec.backend)``; FSDP2 averages
    the gradients, train() scales them back to the sum the reference takes (as for DDP)."""
    _reset()
    model = spec.build()
    fully_shard(model, **_policy(policy))
    compiled = torch.compile(model, backend=spec.backend)
    return _records(_full(train(spec, model, compiled, rank, ddp=model)))


def autocast_forward(compiled):
    def forward(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return compiled(x)
    return forward


def autocast(rank: int, world_size: int, spec: Spec) -> dict:
    """A forward under ``torch.autocast("cpu", dtype=torch.bfloat16)`` of a bnpass-compiled model
    (the backward outside it, as autocast's docs say)."""
    _reset()
    model = spec.build()
    compiled = torch.compile(model, backend=spec.backend)
    return _records(train(spec, model, autocast_forward(compiled), rank))


def all_cases(rank: int, world_size: int, fsdp_cases: list, autocast_specs: list) -> dict:
    out = {spec.name: fsdp(rank, world_size, spec, policy) for spec, policy in fsdp_cases}
    out.update({spec.name: autocast(rank, world_size, spec) for spec in autocast_specs})
    assert dist.get_world_size() == world_size
    return out
