"""Rank-side jobs of tests/test_agreement.py and tests/test_property.py: everyday situations in which
ranks' data differ (empty and one-sample ranks, evaluation on rank 0 only) and ranks that diverge."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

import bnpass
from bnpass import agree
from tests.models import Spec
from tests.rank_jobs import compile_and_train


def train_specs_reporting_errors(rank: int, world_size: int, specs: list) -> dict:
    """Each spec trained on this rank (tests/rank_jobs.py), or {"error": ...} with the time it took:
    a spec that raises does not stop the next one."""
    out = {}
    for spec in specs:
        start = time.monotonic()
        try:
            out[spec.name] = compile_and_train(spec, rank)
        except Exception as e:  # noqa: BLE001 - the test reads it
            out[spec.name] = {"error": f"{type(e).__name__}: {e}", "elapsed": time.monotonic() - start}
    return out


def rank0_evaluates(rank: int, world_size: int, models: dict, backend: str) -> dict:
    """For each model {name: sample shape}: every rank trains one step, then rank 0 alone evaluates (eval mode, no_grad)
    while the others wait at a barrier, then one more training step on every rank."""
    out = {}
    for name, shape in models.items():
        torch._dynamo.reset()
        bnpass.clear_records()
        spec = Spec(name, name, (3, 2), shape)
        model = spec.build()
        compiled = torch.compile(model, backend=backend)
        x = spec.local(spec.batch(0), rank, 0)
        compiled(x).square().sum().backward()
        before = len(agree.waits())
        elapsed = None
        if rank == 0:
            model.eval()
            start = time.monotonic()
            with torch.no_grad():
                compiled(x)
            elapsed = time.monotonic() - start
            model.train()
        dist.barrier()
        compiled(x).square().sum().backward()
        out[name] = {"eval_s": elapsed, "eval_waits": agree.waits()[before:before + 1] if rank == 0 else [],
                     "records": [r.to_json() for r in bnpass.compile_records()]}
    return out


def diverge(rank: int, world_size: int, cases: dict) -> dict:
    """For each case {name: (timeout_s, what)}, each rank compiles what the case says for it; what
    the step raised and when."""
    from tests.models import BN2d, TwoBranchBN

    out = {}
    for i, (case, timeout_s) in enumerate(cases.items()):
        torch._dynamo.reset()
        options = {"agree_timeout_s": timeout_s}
        # other channels in each case: no case's collectives are another case's (the store keeps
        # every meeting of the job)
        channels, dtype, train, model_cls, grad_input = 4 + 3 * i, torch.float32, True, BN2d, True
        if rank == 1:
            if case == "channels":
                channels += 2
            elif case == "eval":
                train = False
            elif case == "dtype":
                dtype = torch.bfloat16
            elif case == "packing":
                options["pack_collectives"] = False
            elif case == "backward_only":
                grad_input = False
        if case in ("packing", "backward_only"):
            model_cls = TwoBranchBN
        model = model_cls(channels).train(train)
        if case == "backward_only":  # a Conv first: its BNs' inputs need a gradient on every rank
            model = torch.nn.Sequential(torch.nn.BatchNorm2d(channels), torch.nn.Conv2d(channels, channels, 1),
                                        TwoBranchBN(channels))
        x = torch.randn(3, channels, 4, 4).to(dtype).requires_grad_(grad_input)
        start = time.monotonic()
        try:
            compiled = torch.compile(model, backend="bnpass_eager", options=options)
            compiled(x).square().sum().backward()
            out[case] = {"error": None, "elapsed": time.monotonic() - start}
        except Exception as e:  # noqa: BLE001 - the test reads it
            out[case] = {"error": str(e), "type": type(e).__name__, "elapsed": time.monotonic() - start,
                         "waits": agree.waits()}
    return out
