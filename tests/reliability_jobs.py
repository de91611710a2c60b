"""Rank-side jobs of tests/test_reliability.py: ranks that disagree, die, or meet a bad group."""

from __future__ import annotations

import os
import time

import torch

from tests.models import BN2d


def _step(model, x, options, backend="bnpass"):
    compiled = torch.compile(model, backend=backend, options=options)
    compiled(x.requires_grad_()).square().sum().backward()


def dead_rank(rank: int, world_size: int) -> dict:
    """Both ranks take a step; then rank 1 dies and rank 0 takes another."""
    model = BN2d(4)
    compiled = torch.compile(model, backend="bnpass")
    compiled(torch.randn(3, 4, 4, 4)).sum().backward()
    if rank == 1:
        os._exit(3)
    start = time.monotonic()
    try:
        compiled(torch.randn(3, 4, 4, 4)).sum().backward()
        error = None
    except Exception as e:  # noqa: BLE001 - the test reads it
        error = f"{type(e).__name__}: {e}"
    return {"error": error, "elapsed": time.monotonic() - start, "exit_now": True}


def group_without_cpu_backend(rank: int, world_size: int) -> str | None:
    """The default group was created as "cuda:gloo": it has no backend for CPU tensors."""
    try:
        _step(BN2d(4), torch.randn(3, 4, 4, 4), {"force_sync": True})
    except Exception as e:  # noqa: BLE001 - the test reads it
        return str(e)
    return None


def rank_fails_before_compiling(rank: int, world_size: int, options: dict | None = None,
                                backend: str = "bnpass") -> dict:
    """Rank 1 raises before it compiles anything; the others compile (with ``options``) and must
    not wait for ever."""
    if rank == 1:
        raise RuntimeError("rank 1 fails in user code")
    start = time.monotonic()
    try:
        _step(BN2d(4), torch.randn(3, 4, 4, 4), {"agree_timeout_s": 5.0, **(options or {})}, backend)
        error = None
    except Exception as e:  # noqa: BLE001 - the test reads it
        error = str(e)
    return {"error": error, "elapsed": time.monotonic() - start, "exit_now": True}
