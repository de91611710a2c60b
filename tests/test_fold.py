"""Eval mode: a BatchNorm on running statistics whose input is a Conv or Linear output used only by
it is folded into that layer's weight and bias (action "fold"); the others are left alone, and say why.

Judged against the float64 eval model (same parameters and running statistics), before and after a
training step that changes them: the fold is computed in the graph from the current tensors, so it
never serves stale parameters, and nothing is modified in place.
"""

from __future__ import annotations

import pytest
import torch

from tests.harness import run_ranks
from tests.models import FoldNet, Spec

SPEC = Spec("fold", "fold", (3,), (3, 6, 6), train=False)
TOL = 1e-5  # of the output's largest value: float32 rounding


@pytest.fixture(scope="module")
def runs():
    (result,) = run_ranks("tests.rank_jobs:fold_eval_checks", 0, SPEC)
    return result


def _float64_eval(state: dict) -> torch.Tensor:
    model = FoldNet().double().eval()
    model.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in state.items()})
    with torch.no_grad():
        return model(SPEC.batch(0).double())


def _assert_close(actual, expected):
    err = float((actual.double() - expected).abs().max())
    assert err <= TOL * float(expected.abs().max()), f"error {err:.3g} vs scale {float(expected.abs().max()):.3g}"


@pytest.mark.parametrize("fold", [True, False])
def test_eval_outputs_match_float64_before_and_after_training(runs, fold):
    run = runs[fold]
    assert run["unchanged"], "compiling or running the eval graph modified the model"
    start = SPEC.build().eval().state_dict()
    _assert_close(run["first"], _float64_eval(start))
    _assert_close(run["again"], _float64_eval(run["state_after"]))
    assert not torch.equal(run["first"], run["again"])  # the training step did change the model


def test_fold_decisions_and_counts(runs):
    (record,) = runs[True]["records"]
    got = [(s["name"], s["action"]) for s in record["sites"]]
    assert got == [("bn1", "fold"), ("bn2", "fold"), ("bn3", "skip"), ("bn4", "fold")]
    reasons = {s["name"]: s["reason"] for s in record["sites"]}
    assert reasons["bn4"] == "eval mode: folded into the linear's weight and bias"
    assert reasons["bn3"].endswith("not folded: the conv2d output has other users than this BN")
    assert record["collectives"] == {"forward": 0, "backward": 0}
    assert runs[True]["graph_breaks"] == 0

    (unfolded,) = runs[False]["records"]
    assert [s["action"] for s in unfolded["sites"]] == ["skip"] * 4
    assert unfolded["sites"][0]["reason"].endswith("not folded: fold_eval=False")
