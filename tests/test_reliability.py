"""DDP, fullgraph, dynamic shapes, gradient accumulation; divergent, dead and misconfigured ranks:
the right numbers or a "bnpass:" error within a deadline, never a hang or a silent wrong answer."""

from __future__ import annotations

import pytest

from tests.checks import assert_counts, assert_matches_reference
from tests.harness import RankFailure, run_ranks
from tests.models import Spec
from tests.tiers import TIERS, specs_for

TOL = 2e-5
# What these cases test is decided before code generation (Dynamo's graphs and guards, AOTAutograd's
# partition, bnpass's sites): some of them always run on bnpass_eager, the same pass and graphs
# without Inductor's C++ builds; of the others, the default tier compiles DDP around the compiled
# model and dynamic shapes with Inductor (tests/tiers.py), the slow tier all of them (checkpointing
# under Inductor's joint-graph pass among them; the default tier checks it under bnpass_eager's
# partition function, here and in tests/test_checkpointing.py).
EAGER = "bnpass_eager"
INDUCTOR = {"ddp_outer", "dynamic"}
SPECS = [
    Spec("ddp_outer", "convnet", (3, 5), (3, 5, 5), steps=3, ddp="outer"),
    Spec("ddp_inner", "convnet", (3, 5), (3, 5, 5), steps=3, ddp="inner"),
    Spec("fullgraph", "convnet", (3, 2), (3, 5, 5), compile_kwargs=(("fullgraph", True),)),
    Spec("fullgraph_syncbn", "convnet", (3, 2), (3, 5, 5), sync_batchnorm=True,
         compile_kwargs=(("fullgraph", True),), backend=EAGER),
    # dynamic=True: ranks with different batch sizes in the same step, 4 sizes on each rank
    Spec("dynamic", "convnet", (3, 5), (3, 5, 5), steps=4, step_sizes=((3, 5), (4, 2), (2, 6), (5, 3)),
         compile_kwargs=(("dynamic", True),)),
    # automatic dynamic: rank 0 recompiles at step 1, rank 1 at step 2; then no more recompiles
    Spec("automatic_dynamic", "mlp1d", (3, 5), (3, 7), steps=4,
         step_sizes=((3, 5), (4, 5), (2, 6), (5, 2)), backend=EAGER),

    Spec("checkpointed", "checkpointed", (3, 2), (3, 5, 5), steps=3, backend=EAGER),
    Spec("checkpointed_inductor", "checkpointed", (3, 2), (3, 5, 5), steps=3),
    Spec("accumulate", "convnet", (3, 2), (3, 5, 5), steps=4, accumulate=2),
    Spec("accumulate_ddp_no_sync", "convnet", (3, 2), (3, 5, 5), steps=4, accumulate=2, ddp="outer",
         backend=EAGER),
]
BY_NAME = {s.name: s for s in SPECS}
# torch.compile(DDP(model)) breaks the graph in DDP's own forward (its Logger, Reducer,
# _inside_ddp_forward), with any backend; breaks inside the model are still counted.
DDP_FORWARD = ("DistributedDataParallel", "Logger", "Reducer")


@pytest.fixture(scope="module", params=TIERS)
def runs(request):
    results = run_ranks("tests.rank_jobs:train_specs", 2, specs_for(request.param, SPECS, INDUCTOR))
    return {name: [r[name] for r in results] for name in BY_NAME}


def _totals(per_rank, **kw):
    assert_counts(per_rank, sites=4, synced=4, forward=4, backward=4, **kw)


@pytest.mark.parametrize("name", ["ddp_outer", "ddp_inner"])
def test_ddp(runs, name):
    """torch.compile(DDP(model)) and DDP(torch.compile(model)), 3 SGD steps."""
    assert_matches_reference(runs[name], BY_NAME[name], TOL)
    _totals(runs[name], graphs=None, breaks_outside_bn=DDP_FORWARD)


@pytest.mark.parametrize("name", ["fullgraph", "fullgraph_syncbn"])
def test_fullgraph(runs, name):
    assert_matches_reference(runs[name], BY_NAME[name], TOL)
    _totals(runs[name])


def test_dynamic_true_does_not_recompile_per_batch_size(runs):
    """4 batch sizes per rank, 2 graphs: torch 2.14's Dynamo compiles the first call of a
    dynamic=True module with static sizes and recompiles once with a symbolic batch size (the
    stock backends do the same); after that no size recompiles."""
    assert_matches_reference(runs["dynamic"], BY_NAME["dynamic"], TOL)
    for rank in runs["dynamic"]:
        assert len(rank["records"]) == 2
        for record in rank["records"]:  # each graph is the whole model
            _totals([{**rank, "records": [record]}])


def test_automatic_dynamic_recompiles_once_per_rank(runs):
    assert_matches_reference(runs["automatic_dynamic"], BY_NAME["automatic_dynamic"], TOL)
    # mlp1d's two BNs are independent: one packed collective per direction in each graph
    assert_counts(runs["automatic_dynamic"], sites=4, synced=4, forward=2, backward=2, graphs=2,
                  unpacked=(4, 4))


@pytest.mark.parametrize("name", ["checkpointed", "checkpointed_inductor"])
def test_activation_checkpointing(runs, name):
    """BN inside torch.utils.checkpoint: synced, running statistics updated once per step (eager
    checkpointing updates them twice), and the collectives of the model without checkpointing, one
    per site and direction: the recomputed forward in the backward reads the statistics the
    forward reduced (schedule.save_site_collectives) instead of repeating its all_reduce."""
    assert_matches_reference(runs[name], BY_NAME[name], TOL)
    assert_counts(runs[name], sites=2, synced=2, forward=2, backward=2)
    for r in runs[name]:
        assert int(r["buffers"]["bn1.num_batches_tracked"]) == 3


@pytest.mark.parametrize("name", ["accumulate", "accumulate_ddp_no_sync"])
def test_gradient_accumulation(runs, name):
    assert_matches_reference(runs[name], BY_NAME[name], TOL)
    _totals(runs[name], graphs=None, breaks_outside_bn=DDP_FORWARD)


# Ranks that diverge (channels, dtype, packing, eval mode, the backward only): tests/test_agreement.py.


def test_dead_rank_survivors_raise_within_the_group_timeout():
    with pytest.raises(RankFailure) as failure:
        run_ranks("tests.reliability_jobs:dead_rank", 2, pg_timeout_s=20.0, deadline_s=300)
    assert "rank 1 died with exit code 3" in str(failure.value)
    survivor = failure.value.results[0]
    assert survivor is not None, str(failure.value)  # rank 0 reported: it did not hang
    assert survivor["error"] is not None and survivor["elapsed"] < 20.0 + 10.0, survivor


def test_group_without_a_backend_for_the_tensors_device():
    (message,) = run_ranks("tests.reliability_jobs:group_without_cpu_backend", 1, backend="cuda:gloo")
    assert message is not None and "bnpass: BatchNorm 'bn' runs on cpu tensors but its process group" \
        in message and "gloo for CPU" in message, message


def test_a_rank_that_fails_before_compiling_does_not_hang_the_others():
    with pytest.raises(RankFailure) as failure:
        # what it checks is decided before code generation: bnpass_eager (no C++ build to wait for)
        run_ranks("tests.reliability_jobs:rank_fails_before_compiling", 2, None, "bnpass_eager",
                  deadline_s=300)
    assert "rank 1 raised" in str(failure.value) and "rank 1 fails in user code" in str(failure.value)
    survivor = failure.value.results[0]
    assert survivor is not None, str(failure.value)
    assert survivor["error"].startswith("bnpass: ranks disagree") and "rank 1 has not run" in survivor["error"]
