"""FSDP2 and autocast around bnpass, on 2 gloo ranks: nothing bnpass-specific is needed, and this
pins it. ``fully_shard(model)`` then ``torch.compile(model, backend="bnpass")``, in float32 and
under ``MixedPrecisionPolicy(param_dtype=torch.bfloat16)``, and a forward under
``torch.autocast("cpu", dtype=torch.bfloat16)``: running statistics identical on both ranks and
equal to the float64 model on the global batch (the bf16 cases within 10x eager bf16's own error
on the same global batch, tests/checks.py); counts of synced sites and collectives."""

from __future__ import annotations

import pytest
import torch

from tests.checks import assert_counts, assert_matches_reference
from tests.fsdp_jobs import BF16_POLICY, autocast_forward
from tests.harness import run_ranks
from tests.models import Spec
from tests.training import train

TOL = 2e-5
# FSDP2 under real Inductor once (float32); the mixed-precision and autocast cases are decided
# before code generation (the dtypes of the traced graph) and run on bnpass_eager.
FSDP_CASES = [
    (Spec("fsdp_fp32", "linear_bn", (3, 5), (4,), steps=2), ""),
    (Spec("fsdp_bf16", "linear_bn", (3, 5), (4,), steps=2, backend="bnpass_eager"), BF16_POLICY),
    (Spec("fsdp_mlp1d_bf16", "mlp1d", (5, 3), (3, 7), steps=2, backend="bnpass_eager"), BF16_POLICY),
]
AUTOCAST = [Spec("autocast_bf16", "convnet", (3, 2), (3, 5, 5), steps=2, backend="bnpass_eager")]
BY_NAME = {s.name: s for s in [spec for spec, _ in FSDP_CASES] + AUTOCAST}


@pytest.fixture(scope="module")
def runs():
    results = run_ranks("tests.fsdp_jobs:all_cases", 2, FSDP_CASES, AUTOCAST, deadline_s=600)
    return {name: [r[name] for r in results] for name in BY_NAME}


def _buffers_identical(per_rank):
    first = per_rank[0]["buffers"]
    for rank, r in enumerate(per_rank[1:], 1):
        for name, b in first.items():
            assert torch.equal(r["buffers"][name], b), f"rank {rank}'s {name} differs from rank 0's"


def _eager_bf16(spec):
    """Eager bf16 on the global batch, one process: the model and its input in bf16. (Eager FSDP2
    with this policy cannot be the yardstick: stock BatchNorm raises "expected scalar type BFloat16
    but found Float" on bf16 weights with float32 running statistics.)"""
    model = spec.build(torch.bfloat16)
    return train(spec, model, lambda x: model(x.bfloat16()), rank=None, float64=False)


def test_fsdp2_fully_shard_float32_under_inductor(runs):
    per_rank = runs["fsdp_fp32"]
    _buffers_identical(per_rank)
    assert_matches_reference(per_rank, BY_NAME["fsdp_fp32"], TOL)
    assert_counts(per_rank, sites=1, synced=1, forward=1, backward=1)


@pytest.mark.parametrize("name", ["fsdp_bf16", "fsdp_mlp1d_bf16"])
def test_fsdp2_bf16_mixed_precision_policy(runs, name):
    """param_dtype=bf16: FSDP2 casts the parameters and the inputs to bf16, the BN buffers stay
    float32 (they are not sharded) and get global statistics. Eager FSDP2 raises here (see
    _eager_bf16); bnpass computes the statistics of bf16 inputs in float32/float64."""
    per_rank = runs[name]
    _buffers_identical(per_rank)
    assert per_rank[0]["y"][0].dtype == torch.bfloat16
    assert per_rank[0]["buffers"]["bn.running_mean"].dtype == torch.float32
    assert_matches_reference(per_rank, BY_NAME[name], TOL, eager=_eager_bf16(BY_NAME[name]))
    if name == "fsdp_bf16":
        assert_counts(per_rank, sites=1, synced=1, forward=1, backward=1)
    else:  # mlp1d's two BNs are independent: one packed collective per direction
        assert_counts(per_rank, sites=2, synced=2, forward=1, backward=1, unpacked=(2, 2))


def test_autocast_bf16_forward(runs):
    spec = BY_NAME["autocast_bf16"]
    per_rank = runs["autocast_bf16"]
    _buffers_identical(per_rank)
    assert {s["dtype"] for s in per_rank[0]["records"][0]["sites"]} == {"bfloat16"}
    model = spec.build()  # eager autocast on the global batch: eager bf16's own error
    eager = train(spec, model, autocast_forward(model), rank=None, float64=False)
    assert_matches_reference(per_rank, spec, TOL, eager=eager)
    assert_counts(per_rank, sites=4, synced=4, forward=4, backward=4)
