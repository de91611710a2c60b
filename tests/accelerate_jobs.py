"""Rank-side job of tests/test_accelerate.py: Hugging Face Accelerate on 2 CPU processes, the
model compiled with bnpass before ``accelerator.prepare`` (Accelerate's ``dynamo_backend`` takes
only its own list of names)."""

from __future__ import annotations

import torch

import bnpass
from tests.lightning_jobs import _torchrun_environment
from tests.models import Spec
from tests.rank_jobs import graph_breaks
from tests.training import train


def prepare_compiled(rank: int, world_size: int, spec: Spec) -> dict:
    from accelerate import Accelerator

    _torchrun_environment(rank, world_size)  # Accelerate reads torchrun's variables, reuses the group
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    bnpass.clear_records()
    accelerator = Accelerator(cpu=True)
    model = spec.build()
    prepared = accelerator.prepare(torch.compile(model, backend=spec.backend))
    out = train(spec, model, prepared, rank, ddp=prepared)  # prepared: DDP(compiled), averaging
    out["wrapped"] = type(prepared).__name__
    out["records"] = [r.to_json() for r in bnpass.compile_records()]
    out["graph_breaks"] = graph_breaks()
    out["graph_break_reasons"] = {k[:400]: v for k, v in torch._dynamo.utils.counters["graph_break"].items()}
    return out
