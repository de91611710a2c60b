"""Hugging Face Accelerate with bnpass: compile before ``prepare`` (2 CPU processes, against
float64 on the global batch; counts); ``dynamo_backend="bnpass"`` is refused by Accelerate."""

from __future__ import annotations

import pytest

pytest.importorskip("accelerate")

from tests.checks import assert_counts, assert_matches_reference  # noqa: E402
from tests.harness import run_ranks  # noqa: E402
from tests.models import Spec  # noqa: E402

# What is checked (the wrap order DDP(compiled) and the sites) is decided before code generation.
SPEC = Spec("accelerate", "convnet", (3, 5), (3, 5, 5), steps=2, backend="bnpass_eager")


def test_compile_before_prepare():
    per_rank = run_ranks("tests.accelerate_jobs:prepare_compiled", 2, SPEC, deadline_s=600)
    assert {r["wrapped"] for r in per_rank} == {"DistributedDataParallel"}
    assert_matches_reference(per_rank, SPEC, 2e-5)
    assert_counts(per_rank, sites=4, synced=4, forward=4, backward=4)


def test_dynamo_backend_is_a_closed_list():
    from accelerate import Accelerator

    with pytest.raises(ValueError):
        Accelerator(cpu=True, dynamo_backend="bnpass")
