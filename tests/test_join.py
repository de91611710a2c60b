"""DDP's Join with bnpass (issue 14): 3 ranks with 3, 5 and 4 batches under
``Join([bnpass.Joinable(ddp_model), ddp_model])``, against the float64 model trained on the batches
that were really trained (each step on the concatenation of the ranks that still had one), with
the counts of sites and collectives per rank and what each joined rank answered; the default
transport (shared memory) and ``transport="process_group"``; a rank with no batch at all.

One 3-rank job on ``bnpass_eager`` for the numbers and counts (the pass, its collectives and their
transport are decided before code generation); Inductor's run of the same is behind ``slow``."""

from __future__ import annotations

import pytest

from tests.checks import abs_err, assert_counts
from tests.harness import run_ranks
from tests.join_jobs import reference

BATCHES = (3, 5, 4)
TOL = 2e-5
COLLECTIVES_PER_STEP = 4  # MLPHead: two BatchNorms in sequence, one all_reduce each per direction
CASES = [
    # name, batches per rank, backend, options, divide_by_initial_world_size
    ("shm", BATCHES, "bnpass_eager", {}, True),
    ("process_group", BATCHES, "bnpass_eager", {"transport": "process_group"}, False),
]


@pytest.fixture(scope="module")
def eager_cases():
    results = run_ranks("tests.join_jobs:join_cases", 3, CASES, deadline_s=300)
    return {name: [r[name] for r in results] for name, *_ in CASES}


def check_case(per_rank: list[dict], batches: tuple, divide: bool, transport: str) -> None:
    ref = reference(batches, divide)
    errors = {}

    def note(key, actual, expected):
        err, scale = abs_err(actual, expected)
        errors[key] = max(errors.get(key, 0.0), err / max(scale, 1e-12))

    for rank, r in enumerate(per_rank):
        assert len(r["y"]) == batches[rank]
        for step, y in enumerate(r["y"]):
            note("output", y, ref["y"][step][rank])
        for kind in ("params", "buffers"):  # on every rank, the joined ones too (DDP's final sync)
            for name, expected in ref[kind].items():
                note(f"{kind}:{name}", r[kind][name], expected)
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    assert not bad, f"relative errors against float64: {bad}"
    assert_counts(per_rank, sites=2, synced=2, forward=2, backward=2)
    group = per_rank[0]["join_group"]
    for rank, r in enumerate(per_rank):
        assert r["join_group"] == group != "0"  # a group of its own, the same name on every rank
        sequence = [c for rec in r["records"] for d in ("forward", "backward") for c in rec["sequence"][d]]
        assert {(c["group"], c["transport"]) for c in sequence} == {(group, transport)}
        later = max(batches) - batches[rank]  # the steps this rank answered after it joined
        assert r["answered"] == {"steps": later, "collectives": later * COLLECTIVES_PER_STEP}
        issued = batches[rank] * COLLECTIVES_PER_STEP + r["answered"]["collectives"]
        assert issued == max(batches) * COLLECTIVES_PER_STEP  # every rank issued every collective


@pytest.mark.parametrize("name,transport", [("shm", "shm"), ("process_group", "process_group")])
def test_uneven_batches_under_join(eager_cases, name, transport):
    """3, 5 and 4 batches: numbers of the ranks still training, and nobody hangs; ``shm`` divides
    gradients by the initial world size (Join's default), ``process_group`` by the ranks still
    training (``divide_by_initial_world_size=False``, which the bnpass hook hands DDP's reducer)."""
    _, batches, _, _, divide = next(c for c in CASES if c[0] == name)
    check_case(eager_cases[name], batches, divide, transport)


def test_a_rank_without_a_step_is_an_error_on_every_rank():
    """Rank 1 has no batch and never ran a step: it cannot know what to answer. Every rank raises a
    BNPassError naming it and the fix, at once (no wait of a timeout)."""
    results = run_ranks("tests.join_jobs:join_refused", 3, (2, 0, 1), deadline_s=120)
    for rank, r in enumerate(results):
        assert r["error"] is not None, f"rank {rank} raised nothing"
        assert "rank 1 joined without having run a training step" in r["error"], r["error"]
        assert "at least one batch" in r["error"]
        assert r["seconds"] < 30, r


def test_bnpass_joinable_must_come_first():
    """Join([ddp_model, bnpass.Joinable(ddp_model)]) would hang a joined rank in DDP's hook: every
    rank raises a BNPassError saying the order, at its first step."""
    results = run_ranks("tests.join_jobs:join_refused", 3, (2, 2, 1), False, deadline_s=120)
    for rank, r in enumerate(results):
        assert r["error"] is not None and "must come first in the Join list" in r["error"], r
        assert r["seconds"] < 30, r


@pytest.mark.slow
def test_uneven_batches_under_join_inductor():
    """The same under Inductor ("bnpass"), the default transport."""
    cases = [("inductor", BATCHES, "bnpass", {}, True)]
    per_rank = [r["inductor"] for r in run_ranks("tests.join_jobs:join_cases", 3, cases, deadline_s=600)]
    check_case(per_rank, BATCHES, True, "shm")
