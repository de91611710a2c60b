"""DDP's Join with bnpass (issue 14): 3 ranks with 3, 5 and 4 batches under
``Join([bnpass.Joinable(ddp_model), ddp_model])``, against the float64 model trained on the batches
that were really trained (each step on the concatenation of the ranks that still had one), with
the counts of sites and collectives per rank and what each joined rank answered; the default
transport (shared memory) and ``transport="process_group"``; two epochs, in the second of which a
rank has no batch; and what bnpass refuses, on every rank, without a hang.

One 3-rank job on ``bnpass_eager`` for the numbers and counts (the pass, its collectives and their
transport are decided before code generation); Inductor's run of the same is behind ``slow``
(78 s here under load)."""

from __future__ import annotations

import re

import pytest

from tests.checks import abs_err, assert_counts
from tests.harness import run_ranks
from tests.join_jobs import reference, steps_of

TOL = 2e-5
COLLECTIVES_PER_STEP = 4  # MLPHead: two BatchNorms in sequence, one all_reduce each per direction
CASES = [
    # name, batches per rank in each epoch (one Join each), backend, options,
    # divide_by_initial_world_size, DDP's broadcast_buffers
    ("shm", ((3, 5, 4),), "bnpass_eager", {}, True, True),
    ("process_group", ((3, 5, 4),), "bnpass_eager", {"transport": "process_group"}, False, True),
    ("two_epochs", ((2, 2, 1), (0, 2, 1)), "bnpass_eager", {}, True, True),
    ("no_broadcast", ((3, 5, 4),), "bnpass_eager", {}, True, False),
]
TRANSPORT = {"process_group": "process_group"}  # the others: "shm"


@pytest.fixture(scope="module")
def eager_cases():
    results = run_ranks("tests.join_jobs:join_cases", 3, CASES, deadline_s=300)
    return {name: [r[name] for r in results] for name, *_ in CASES}


def check_case(per_rank: list[dict], epochs: tuple, divide: bool, transport: str,
               broadcast_buffers: bool = True) -> None:
    ref = reference(epochs, divide)
    steps = steps_of(epochs)
    errors = {}

    def note(key, actual, expected):
        err, scale = abs_err(actual, expected)
        errors[key] = max(errors.get(key, 0.0), err / max(scale, 1e-12))

    for rank, r in enumerate(per_rank):
        assert [s for s, _ in r["y"]] == [s for s, active in enumerate(steps) if rank in active]
        for step, y in r["y"]:
            note("output", y, ref["y"][step][rank])
        for name, expected in ref["params"].items():  # on every rank (DDP's final sync)
            note(f"params:{name}", r["params"][name], expected)
        # Buffers: the same on every rank through DDP's broadcasts; without them, a joined rank's
        # are those of its last step.
        last = len(steps) - 1 if broadcast_buffers else r["y"][-1][0]
        for name, expected in ref["buffers_after"][last].items():
            note(f"buffers:{name}", r["buffers"][name], expected)
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    assert not bad, f"relative errors against float64: {bad}"
    assert_counts(per_rank, sites=2, synced=2, forward=2, backward=2)
    group = per_rank[0]["join_group"]
    for rank, r in enumerate(per_rank):
        assert r["join_group"] == group != "0"  # a group of its own, the same name on every rank
        sequence = [c for rec in r["records"] for d in ("forward", "backward") for c in rec["sequence"][d]]
        assert {(c["group"], c["transport"]) for c in sequence} == {(group, transport)}
        later = sum(rank not in active for active in steps)  # steps it answered after it joined
        assert r["answered"] == {"steps": later, "collectives": later * COLLECTIVES_PER_STEP}
        issued = len(r["y"]) * COLLECTIVES_PER_STEP + r["answered"]["collectives"]
        assert issued == len(steps) * COLLECTIVES_PER_STEP  # every rank issued every collective


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_uneven_batches_under_join(eager_cases, name):
    """``shm``: 3, 5 and 4 batches, gradients divided by the initial world size (Join's default);
    ``process_group``: the same through the process group, divided by the ranks still training
    (``divide_by_initial_world_size=False``, which bnpass's hook hands DDP's reducer);
    ``two_epochs``: a new Joinable per epoch, rank 0 without a batch in the second (it answers
    with the steps of the first); ``no_broadcast``: DDP's ``broadcast_buffers=False``, a joined
    rank keeps the running statistics of its last step."""
    _, epochs, _, _, divide, broadcast = next(c for c in CASES if c[0] == name)
    check_case(eager_cases[name], epochs, divide, TRANSPORT.get(name, "shm"), broadcast)


def refused(*args, **kwargs) -> list[dict]:
    results = run_ranks("tests.join_jobs:join_refused", 3, *args, deadline_s=120, **kwargs)
    for rank, r in enumerate(results):
        assert r["error"] is not None, f"rank {rank} raised nothing"
    return results


def test_a_rank_without_a_step_is_an_error_on_every_rank():
    """Rank 1 has no batch and never ran a step: it cannot know what to answer. Every rank raises a
    BNPassError naming it and the fix, at once (no wait of a timeout)."""
    for r in refused(((2, 0, 1),)):
        assert r["bnpass"], r
        assert "rank 1 joined without having run a training step of this model" in r["error"], r
        assert "at least one batch" in r["error"]
        assert r["seconds"] < 30, r


def test_bnpass_joinable_must_come_first():
    """Join([ddp_model, bnpass.Joinable(ddp_model)]) would hang a joined rank in DDP's hook: every
    rank raises a BNPassError saying the order, at its first step."""
    for r in refused(((2, 2, 1),), False):
        assert r["bnpass"] and "must come first in the Join list" in r["error"], r
        assert r["seconds"] < 30, r


def test_a_graph_with_other_collectives_after_a_rank_joined():
    """Rank 1's last step, after ranks 0 and 2 joined, runs bn2 in eval mode: a new graph with one
    forward collective fewer, which the joined ranks cannot answer. Rank 1 raises a BNPassError
    saying so at once (not after agree_timeout_s); the joined ranks, left in DDP's own bucket
    all_reduce, end when rank 1 exits or at the process group's timeout (5 s here)."""
    results = refused(((2, 3, 2),), True, 2, pg_timeout_s=5)
    error = results[1]["error"]
    assert results[1]["bnpass"] and "rank 0 has joined (DDP's Join" in error, error
    assert float(re.search(r"after ([\d.]+) s", error).group(1)) < 5, error


@pytest.mark.slow
def test_uneven_batches_under_join_inductor():
    """The same as ``shm`` under Inductor (``backend="bnpass"``)."""
    cases = [("inductor", ((3, 5, 4),), "bnpass", {}, True, True)]
    per_rank = [r["inductor"] for r in run_ranks("tests.join_jobs:join_cases", 3, cases, deadline_s=600)]
    check_case(per_rank, ((3, 5, 4),), True, "shm")


def test_joinable_takes_the_ddp_module():
    import torch

    import bnpass

    with pytest.raises(bnpass.BNPassError, match="takes the DistributedDataParallel module"):
        bnpass.Joinable(torch.nn.Linear(2, 2))
