"""DDP's Join with bnpass (issue 14): 3 ranks with 3, 5 and 4 batches under
``Join([bnpass.Joinable(ddp_model), ddp_model])``, against the float64 model trained on the batches
that were really trained (each step on the concatenation of the ranks that still had one), with
the counts of sites and collectives per rank and what each joined rank answered; the default
transport (shared memory) and ``transport="process_group"``, both ``divide_by_initial_world_size``
settings, two epochs with an empty rank in the second, ``broadcast_buffers=False``, a graph break,
a model compiled before the Joinable; and what bnpass refuses, on every rank, without a hang.

One 3-rank job on ``bnpass_eager`` for the numbers and counts (the pass, its collectives and their
transport are decided before code generation, and the default tier proves them there); Inductor's
run of the ``shm`` case is behind ``slow`` (44-78 s here, load average 4-10)."""

from __future__ import annotations

import re

import pytest

from tests.checks import abs_err, assert_counts
from tests.harness import run_ranks
from tests.join_jobs import reference, steps_of

TOL = 2e-5
COLLECTIVES_PER_STEP = 4  # MLPHead: two BatchNorms in sequence, one all_reduce each per direction
CASES = {  # name -> tests/join_jobs.py train_uneven's keyword arguments (bnpass_eager by default)
    # first, before any Joinable of the process: compiled before the Joinable was made, so over
    # the default group, through shared memory
    "compiled_before": {"epochs": ((1, 1, 1), (2, 3, 1)), "join_from_epoch": 1},
    "shm": {"epochs": ((3, 5, 4),)},
    "process_group": {"epochs": ((3, 5, 4),), "options": {"transport": "process_group"}, "divide": False},
    "two_epochs": {"epochs": ((2, 2, 1), (0, 2, 1))},
    "no_broadcast": {"epochs": ((3, 5, 4),), "broadcast_buffers": False},
    "graph_break": {"epochs": ((1, 3, 2),), "model": "BrokenHead"},
}


@pytest.fixture(scope="module")
def eager_cases():
    results = run_ranks("tests.join_jobs:join_cases", 3, CASES, deadline_s=300)
    return {name: [r[name] for r in results] for name in CASES}


def check_case(per_rank: list[dict], epochs: tuple, divide: bool = True, broadcast_buffers: bool = True,
               options: dict | None = None, model: str = "MLPHead", join_from_epoch: int = 0,
               **_) -> None:
    transport = (options or {}).get("transport", "shm")  # "auto": shared memory, on one host
    graphs = 2 if model == "BrokenHead" else 1
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
    assert_counts(per_rank, sites=2, synced=2, forward=2, backward=2, graphs=graphs,
                  breaks_outside_bn=("graph_break",) if graphs == 2 else ())
    group = per_rank[0]["join_group"]
    used = "0" if join_from_epoch else group  # compiled before the Joinable made its group: DDP's
    for rank, r in enumerate(per_rank):
        assert r["join_group"] == group != "0"  # a group of its own, the same name on every rank
        sequence = [c for rec in r["records"] for d in ("forward", "backward") for c in rec["sequence"][d]]
        assert {(c["group"], c["transport"]) for c in sequence} == {(used, transport)}
        later = sum(rank not in active for active in steps)  # steps it answered after it joined
        assert r["answered"] == {"steps": later, "collectives": later * COLLECTIVES_PER_STEP}
        issued = len(r["y"]) * COLLECTIVES_PER_STEP + r["answered"]["collectives"]
        assert issued == len(steps) * COLLECTIVES_PER_STEP  # every rank issued every collective


@pytest.mark.parametrize("name", list(CASES))
def test_uneven_batches_under_join(eager_cases, name):
    """``shm``: 3, 5 and 4 batches, gradients divided by the initial world size (Join's default);
    ``process_group``: the same through the process group, divided by the ranks still training
    (``divide_by_initial_world_size=False``, which bnpass's hook hands DDP's reducer);
    ``two_epochs``: a new Joinable per epoch, rank 0 without a batch in the second (it answers
    with the steps of the first); ``no_broadcast``: DDP's ``broadcast_buffers=False``, a joined
    rank keeps the running statistics of its last step; ``graph_break``: two compiled graphs per
    step, whose collectives a joined rank answers in the order they ran; ``compiled_before``: a
    step before the Joinable was made compiled the model over the default group, which works
    through shared memory (and is refused through the process group: below)."""
    check_case(eager_cases[name], **CASES[name])


def refused(pg_timeout_s: float = 120.0, **kwargs) -> list[dict]:
    """tests/join_jobs.py join_refused with ``kwargs``: every rank must have raised."""
    results = run_ranks("tests.join_jobs:join_refused", 3, kwargs, deadline_s=120, pg_timeout_s=pg_timeout_s)
    for rank, r in enumerate(results):
        assert r["error"] is not None, f"rank {rank} raised nothing"
    return results


def test_a_rank_without_a_step_is_an_error_on_every_rank():
    """Rank 1 has no batch and never ran a step: it cannot know what to answer. Every rank raises a
    BNPassError naming it and the fix, at once (no wait of a timeout)."""
    for r in refused(epochs=((2, 0, 1),)):
        assert r["bnpass"], r
        assert "rank 1 joined without having run a training step of this model" in r["error"], r
        assert "at least one batch" in r["error"]
        assert r["seconds"] < 30, r


def test_bnpass_joinable_must_come_first():
    """Join([ddp_model, bnpass.Joinable(ddp_model)]) would hang a joined rank in DDP's hook: every
    rank raises a BNPassError saying the order, at its first step."""
    for r in refused(epochs=((2, 2, 1),), bnpass_first=False):
        assert r["bnpass"] and "must come first in the Join list" in r["error"], r
        assert r["seconds"] < 30, r


def test_compiled_before_the_joinable_through_the_process_group():
    """A step before the Joinable was made compiled the model over DDP's own group, through the
    process group: under Join, every rank refuses it at the first step, naming the fix."""
    for r in refused(epochs=((1, 1, 1), (2, 3, 1)), join_from_epoch=1,
                     options={"transport": "process_group"}):
        assert r["bnpass"], r
        assert "Make bnpass.Joinable(ddp_model) before the model's first call" in r["error"], r


def test_a_graph_with_other_collectives_after_a_rank_joined():
    """Rank 1's last step, after ranks 0 and 2 joined, runs bn2 in eval mode: a new graph with one
    forward collective fewer, which the joined ranks cannot answer. Rank 1 raises a BNPassError
    saying so at once (not after agree_timeout_s); the joined ranks, left in DDP's own bucket
    all_reduce, end when rank 1 exits or at the process group's timeout (5 s here)."""
    results = refused(epochs=((2, 3, 2),), eval_bn2_at=2, pg_timeout_s=5)
    error = results[1]["error"]
    assert results[1]["bnpass"] and "rank 0 has joined (DDP's Join" in error, error
    assert float(re.search(r"after ([\d.]+) s", error).group(1)) < 5, error


def test_throw_on_early_termination():
    """``Join(..., throw_on_early_termination=True)``, which bnpass's Joinable, first, announces as
    DDP would: every rank raises Join's own RuntimeError when rank 0 runs out, none hangs."""
    results = refused(epochs=((1, 2, 2),), throw=True)
    assert "exhausted all inputs" in results[0]["error"], results[0]
    for r in results[1:]:
        assert "Detected at least one rank that exhausted inputs" in r["error"], r


@pytest.mark.slow
def test_uneven_batches_under_join_inductor():
    """The same as ``shm`` under Inductor (``backend="bnpass"``)."""
    case = {"epochs": ((3, 5, 4),), "backend": "bnpass"}
    per_rank = [r["inductor"] for r in run_ranks("tests.join_jobs:join_cases", 3, {"inductor": case},
                                                 deadline_s=600)]
    check_case(per_rank, **case)


def test_joinable_takes_the_ddp_module():
    import torch

    import bnpass

    with pytest.raises(bnpass.BNPassError, match="takes the DistributedDataParallel module"):
        bnpass.Joinable(torch.nn.Linear(2, 2))
