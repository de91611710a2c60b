"""Every rank issues the same collectives whatever its data; a graph with nothing to reduce never
waits; ranks that diverge learn it at once (issue 12).

Multi-rank gloo jobs with deadlines (tests/harness.py). Numbers against the float64 model on the
concatenated global batch, counts of sites and collectives per rank, and the collective sequence
each rank's compiled graphs issue (``GraphRecord.sequence``), compared between ranks.
"""

from __future__ import annotations

import pytest

from tests.checks import assert_counts, assert_matches_reference
from tests.harness import run_ranks
from tests.models import Spec
from tests.tiers import TIERS, specs_for

TOL = 2e-5

# 3 ranks, local batches 4, 0 and 3: the empty rank compiles a graph of its own, in which reductions
# over no element are constants; its collectives must still be the others'.
SPECS_3 = [
    Spec("empty_packed", "mlp_head", (4, 0, 3), (5,)),
    Spec("empty_packed_6_7", "mlp_head_6_7", (4, 0, 3), (5,), backend="bnpass_eager"),
    Spec("empty_unpacked", "mlp_head", (4, 0, 3), (5,), options=(("pack_collectives", False),),
         backend="bnpass_eager"),
    Spec("empty_two_branch", "two_branch", (2, 0, 3), (4, 3, 3), backend="bnpass_eager"),
    # one sample per rank: one value per channel locally, three in the group
    Spec("one_sample_each", "mlp_head", (1, 1, 1), (5,)),
    Spec("one_and_empty", "mlp_head", (1, 0, 2), (5,), backend="bnpass_eager"),
    # the whole group has one value per channel: PyTorch's error, on every rank, at run time
    Spec("one_in_the_group", "mlp_head", (1, 0, 0), (5,), backend="bnpass_eager", steps=1),
]
BY_NAME = {s.name: s for s in SPECS_3}
INDUCTOR = {"empty_packed"}  # through Inductor in the default tier (tests/tiers.py)


@pytest.fixture(scope="module", params=TIERS)
def three_ranks(request):
    specs = specs_for(request.param, SPECS_3, INDUCTOR)
    results = run_ranks("tests.agreement_jobs:train_specs_reporting_errors", 3, specs, deadline_s=600)
    return {s.name: [r[s.name] for r in results] for s in specs}


def _sequences(per_rank: list[dict]) -> list[dict]:
    """Per rank: direction -> [(op, numel, dtype, group, sites, kind)] over its compiled graphs."""
    out = []
    for r in per_rank:
        seq = {}
        for rec in r["records"]:
            for direction, entries in rec["sequence"].items():
                seq.setdefault(direction, []).append(
                    [(e["op"], e["numel"], e["dtype"], e["group"], tuple(e["sites"]), e["kind"]) for e in entries])
        out.append(seq)
    return out


def assert_same_collectives(per_rank: list[dict]) -> list[dict]:
    """Every rank's graphs issue the same collectives, in the same order, of the same sizes."""
    for r in per_rank:
        assert "error" not in r, r.get("error")
    seqs = _sequences(per_rank)
    for rank, seq in enumerate(seqs[1:], 1):
        assert seq == seqs[0], f"rank {rank} issues {seq}, rank 0 {seqs[0]}"
    return seqs


@pytest.mark.parametrize("name, forward, backward", [
    ("empty_packed", 2, 2), ("empty_packed_6_7", 2, 2), ("empty_unpacked", 2, 2), ("empty_two_branch", 1, 1),
])
def test_an_empty_rank_issues_the_collectives_of_the_others(three_ranks, name, forward, backward):
    """Issue 12.1: the two BatchNorm1d of the head are in sequence, so two collectives per
    direction on every rank, also on the one with no sample (it used to pack them into one, and
    gloo aborted every process); the two parallel BNs of two_branch share one on every rank."""
    per_rank = three_ranks[name]
    seqs = assert_same_collectives(per_rank)
    assert [len(s["forward"][0]) for s in seqs] == [forward] * 3
    assert_matches_reference(per_rank, BY_NAME[name], TOL)
    sites = 2
    unpacked = (2, 2)
    assert_counts(per_rank, sites=sites, synced=sites, forward=forward, backward=backward, unpacked=unpacked)


@pytest.mark.parametrize("name", ["one_sample_each", "one_and_empty"])
def test_one_value_per_channel_on_a_rank_is_fine_when_the_group_has_more(three_ranks, name):
    """Issue 12.4: BatchNorm1d on one sample per rank compiles and matches float64 on the global
    batch (PyTorch's "Expected more than 1 value per channel" is about the global batch here)."""
    per_rank = three_ranks[name]
    assert_same_collectives(per_rank)
    assert_matches_reference(per_rank, BY_NAME[name], TOL)
    assert_counts(per_rank, sites=2, synced=2, forward=2, backward=2)


def test_one_value_per_channel_in_the_group_raises_on_every_rank(three_ranks):
    """One sample in the whole group: PyTorch's error on every rank, after the forward's collective
    (the count is data), so no rank is left waiting in one."""
    for rank, r in enumerate(three_ranks["one_in_the_group"]):
        assert "error" in r, f"rank {rank} trained on one value per channel"
        assert "Expected more than 1 value per channel when training" in r["error"], r["error"]


def test_rank0_evaluation_does_not_wait():
    """Issue 12.2: `if rank == 0: evaluate(model)` while the others sit at a barrier: a graph that
    reduces nothing (eval mode, FrozenBN only, no BN) runs at once, no agreement wait."""
    models = {"bn2d": (4, 5, 5), "frozen_only": (3, 5, 5), "no_bn": (3, 5, 5)}
    results = run_ranks("tests.agreement_jobs:rank0_evaluates", 2, models, "bnpass_eager", deadline_s=300)
    for name in models:
        r0 = results[0][name]
        (wait,) = r0["eval_waits"]
        assert wait["collectives"] == 0 and wait["agreed"], wait
        assert wait["waited_s"] < 0.05, wait
        assert r0["eval_s"] < 30, r0  # compile included; the agreement would have waited 300 s
    # the training steps around it still synced: one site, its forward collective (a BN on the
    # input, which needs no gradient: no backward one)
    for r in results:
        train = [rec for rec in r["bn2d"]["records"] if rec["sites"][0]["action"] == "sync"]
        assert train and train[0]["collectives"] == {"forward": 1, "backward": 0}


DIVERGENT = {  # case: (agree_timeout_s, what the error names)
    "channels": (120.0, "C=6"),
    "dtype": (120.0, "bfloat16"),
    "packing": (120.0, "pack_collectives=False"),
    "backward_only": (120.0, "backward graph"),
    "eval": (5.0, "eval mode"),
}


@pytest.fixture(scope="module")
def divergent():
    results = run_ranks("tests.agreement_jobs:diverge", 2, {c: t for c, (t, _) in DIVERGENT.items()},
                        deadline_s=400)
    return {case: [r[case] for r in results] for case in DIVERGENT}


@pytest.mark.parametrize("case", ["channels", "dtype", "packing", "backward_only"])
def test_ranks_waiting_on_different_collectives_raise_within_seconds(divergent, case):
    """Issue 12.3: ranks that both wait, with different collective sequences (other channels, dtype,
    packing, or only the backward's), raise on every rank within 10 s though agree_timeout_s is
    120 s, naming the first collective that differs and its sites; nothing was reduced."""
    for rank, r in enumerate(divergent[case]):
        assert r["error"] is not None, f"rank {rank} ran a step with divergent collectives"
        assert r["error"].startswith("bnpass: ranks disagree on the collectives"), r["error"]
        assert r["elapsed"] < 10 + 15, r  # 10 s for the agreement; the compile is in it too
        waited = [w for w in r["waits"] if not w["agreed"]]
        assert waited and waited[-1]["waited_s"] < 10, r["waits"]
    errors = divergent[case][0]["error"] + divergent[case][1]["error"]
    assert DIVERGENT[case][1] in errors, errors
    assert "collective 0: here" in errors or "collective(s), that rank" in errors, errors


def test_a_rank_in_eval_mode_runs_and_the_training_rank_raises(divergent):
    """One rank in eval mode (no collective: it runs at once), the other training: the training
    rank waits agree_timeout_s for a rank that never comes, then names what it last ran."""
    train, evaluating = divergent["eval"]
    assert evaluating["error"] is None, evaluating
    assert train["error"].startswith("bnpass: ranks disagree"), train["error"]
    assert "rank 1 last ran a" in train["error"] and "graph that issues no collective" in train["error"], \
        train["error"]
    assert "eval mode" in train["error"]
    assert 5.0 <= train["elapsed"] < 60, train

