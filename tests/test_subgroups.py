"""Subgroups: ``options={"group_size": k}`` and a user's ``process_group``, 4 gloo ranks in groups
of 2, each group against the float64 model on the concatenation of its own ranks' batches; a rank
that fails before compiling; bad values.

The cases run on ``bnpass_eager``: which group each site reduces over is decided before code
generation, and the synced op's numerics under Inductor are tests/test_sync.py's subject.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import bnpass
from bnpass.inspect.run import fake_world  # this process as rank 0 of a simulated group
from tests.checks import assert_counts, assert_matches_reference
from tests.harness import RankFailure, run_ranks
from tests.models import Spec
from tests.rank_jobs import compile_and_train

TOL = 2e-5
EAGER = "bnpass_eager"
DEADLINE_S = 240
# Two groups with different data (the second group's batch is larger, and shifted), so that a
# group's statistics differ from the other's and from those of all 4 ranks together.
PAIRS = (Spec("ranks_0_1", "convnet", (3, 2), (3, 5, 5), backend=EAGER, options=(("group_size", 2),)),
         Spec("ranks_2_3", "convnet", (1, 5), (3, 5, 5), offset=1.0, backend=EAGER,
              options=(("group_size", 2),)))
USER_PAIRS = tuple(dataclasses.replace(s, options=()) for s in PAIRS)  # + process_group, in the job
WHOLE = Spec("all_4_ranks", "convnet", (2, 3, 1, 4), (3, 5, 5), backend=EAGER,
             options=(("group_size", 4),))
CASES = {"group_size": PAIRS, "process_group": USER_PAIRS, "group_size_4": (WHOLE,)}


@pytest.fixture(scope="module")
def four_ranks():
    return run_ranks("tests.subgroup_jobs:subgroup_checks", 4, CASES, 3.0, deadline_s=DEADLINE_S)


def _sites(result):
    return [s for record in result["records"] for s in record["sites"]]


@pytest.mark.parametrize("case", ["group_size", "process_group"])
def test_each_pair_of_ranks_syncs_within_itself(four_ranks, case):
    """Outputs, input gradients, gradients summed over the pair, running statistics: each pair's
    against float64 on its own global batch; 4 sites, 1 all_reduce per site per direction over a
    group of 2 ranks, a group per pair."""
    names = []
    for g, spec in enumerate(CASES[case]):
        pair = [four_ranks[r][case] for r in (2 * g, 2 * g + 1)]
        assert_matches_reference(pair, spec, TOL)
        assert_counts(pair, sites=4, synced=4, forward=4, backward=4)
        sites = [s for r in pair for s in _sites(r)]
        assert {s["world_size"] for s in sites} == {2}, sites
        (name,) = {s["group"] for s in sites}
        detail = f"group_size=2: ranks [{2 * g}, {2 * g + 1}]" if case == "group_size" \
            else f"ranks [{2 * g}, {2 * g + 1}]"
        assert {s["reason"] for s in sites} == {
            f"training mode: statistics over 2 rank(s) of group {name} ({detail})"}, sites
        names.append(name)
    assert len(set(names)) == 2 and "0" not in names, names  # a group per pair, not the world
    mean = [four_ranks[r][case]["buffers"]["bn1.running_mean"] for r in (0, 2)]
    assert float((mean[0] - mean[1]).abs().max()) > 1e-2, mean  # the pairs' statistics differ


def test_group_size_equal_to_the_world_size_is_the_default_group(four_ranks):
    results = [r["group_size_4"] for r in four_ranks]
    assert_matches_reference(results, WHOLE, TOL)
    assert_counts(results, sites=4, synced=4, forward=4, backward=4)
    assert {(s["group"], s["world_size"], s["reason"]) for r in results for s in _sites(r)} == {
        ("0", 4, "training mode: statistics over 4 rank(s) of group 0")}


def test_create_syncbn_process_group(four_ranks):
    """After a group_size compile: the group bnpass made, no new one. On its own: every rank makes
    both pairs' groups (as apex), its own works, a second call and the option reuse it."""
    for rank, result in enumerate(four_ranks):
        (name,) = {s["group"] for s in _sites(result["group_size"])}
        assert result["reused"]["group"] == name, (rank, result["reused"])
        before, after = result["reused"]["pg_count"]
        assert before == after, (rank, result["reused"])
        made = result["made"]
        pair = [rank // 2 * 2, rank // 2 * 2 + 1]
        assert made["ranks"] == pair and made["sum_of_ranks"] == sum(pair), (rank, made)
        assert made["pg_count"][1] - made["pg_count"][0] == 2, (rank, made)  # both pairs' groups
        assert made["again"] and made["option"], (rank, made)


def test_group_size_one_with_force_sync_syncs_over_a_one_rank_group(four_ranks):
    for rank, result in enumerate(four_ranks):
        forced = result["forced_one_rank"]
        assert forced["name"] not in (None, "0") and forced["world_size"] == 1, (rank, forced)
        assert forced["ranks"] == [rank], (rank, forced)


def test_ranks_that_made_different_process_groups_are_told_so(four_ranks):
    """Rank 0 alone made one more process group: torch would name the new groups differently on
    rank 0 and the others. Every rank raises after the 3 s deadline, naming the rank(s) at odds."""
    errors = [r["count_mismatch"] for r in four_ranks]
    for rank, error in enumerate(errors):
        assert error is not None and error.startswith(
            "bnpass: could not make the groups of 2 consecutive ranks to share BatchNorm "
            "statistics; nothing was reduced."), errors
        others = [1, 2, 3] if rank == 0 else [0]
        for other in others:
            assert re.search(rf"rank {other} came having made \d+ process group\(s\) before, this "
                             rf"rank \({rank}\) \d+: torch would name the new group differently",
                             error), (rank, error)


def test_a_rank_failing_before_compiling_makes_its_partner_raise_not_hang():
    """Rank 1 raises in user code; rank 0, its partner, raises a bnpass error naming it within
    agree_timeout_s (5 s) instead of waiting in torch's rendezvous; ranks 2 and 3 are unaffected."""
    options = {"group_size": 2, "agree_timeout_s": 5.0}
    with pytest.raises(RankFailure) as failure:
        run_ranks("tests.reliability_jobs:rank_fails_before_compiling", 4, options, EAGER,
                  deadline_s=DEADLINE_S)
    message = str(failure.value)
    assert "rank 1 raised" in message and "rank 1 fails in user code" in message, message
    partner, *others = (failure.value.results[r] for r in (0, 2, 3))
    assert partner is not None, message  # rank 0 reported: it did not hang
    assert "bnpass: could not make the process group of ranks [0, 1] (group_size=2) to share " \
           "BatchNorm statistics; nothing was reduced. rank 1 did not come within agree_timeout_s=5 s" \
           in partner["error"], partner
    assert partner["elapsed"] < 60, partner  # tracing, compiling and the 5 s wait
    assert [r["error"] for r in others] == [None, None], others


def _compile(options: dict, x: torch.Tensor | None = None):
    torch._dynamo.reset()
    x = torch.randn(2, 3, 4, 4) if x is None else x
    return torch.compile(nn.BatchNorm2d(3), backend=EAGER, options=options)(x)


@pytest.mark.parametrize("value, message", [
    (2.0, "bnpass: option group_size must be a positive int (the number of consecutive ranks that "
          "share statistics), got float 2.0"),
    (True, "got bool True"),
    ("2", "got str '2'"),
    (0, "got 0; 1 means each rank's own statistics"),
    (-2, "got -2"),
])
def test_group_size_of_the_wrong_type_or_value(value, message):
    with pytest.raises(Exception, match=re.escape(message)):
        _compile({"group_size": value})


def test_group_size_without_torch_distributed():
    assert not dist.is_initialized()
    with pytest.raises(Exception, match=re.escape(
            "bnpass: option group_size=2 was given but torch.distributed is not initialised; call "
            "torch.distributed.init_process_group() first")):
        _compile({"group_size": 2})


def test_group_size_must_divide_the_world_size():
    with fake_world(4), pytest.raises(Exception, match=re.escape(
            "bnpass: option group_size=3 does not divide the world size 4 of process group 0: its "
            "ranks are split into consecutive groups of 3. Use one of [1, 2, 4].")):
        _compile({"group_size": 3})


def test_group_size_and_process_group_together_is_an_error():
    with fake_world(4), pytest.raises(Exception, match=re.escape(
            "bnpass: options process_group and group_size were both given: pass one.")):
        _compile({"group_size": 2, "process_group": dist.group.WORLD})


def test_create_syncbn_process_group_errors():
    with pytest.raises(Exception, match="bnpass: create_syncbn_process_group needs torch.distributed "
                                        "initialised"):
        bnpass.create_syncbn_process_group(2)
    with fake_world(4), pytest.raises(Exception, match=re.escape(
            "bnpass: create_syncbn_process_group: group_size=8 does not divide the world size 4")):
        bnpass.create_syncbn_process_group(8)


def test_group_size_one_is_local():
    """group_size=1: plain BN (float64 reference), no collective, no group made, the reason says so."""
    spec = Spec("group_size_1", "convnet", (5,), (3, 5, 5), backend=EAGER, options=(("group_size", 1),))
    with fake_world(4):
        count = dist.get_pg_count()
        result = compile_and_train(spec, 0)
        assert dist.get_pg_count() == count
    assert_matches_reference([result], spec, TOL)
    assert_counts([result], sites=4, synced=0, forward=0, backward=0)
    assert {s["reason"] for s in _sites(result)} == {
        "training mode, group_size=1: this rank's own statistics, no collective"}


def test_group_size_with_a_device_bound_default_group_asks_for_the_helper():
    """init_process_group(device_id=...): torch splits the NCCL communicator to make a subgroup,
    which every rank must join; bnpass does not try it while compiling (it would hang)."""
    with fake_world(4):
        dist.group.WORLD.bound_device_id = torch.device("cuda", 0)
        try:
            with pytest.raises(Exception, match=re.escape(
                    "bnpass: option group_size=2: the default process group is bound to cuda:0")) as e:
                _compile({"group_size": 2})
            assert "Call bnpass.create_syncbn_process_group(2) on every rank right after " \
                   "init_process_group" in str(e.value)
        finally:
            dist.group.WORLD.bound_device_id = None


NODE_PAIRS = tuple(dataclasses.replace(s, options=(("group_size", "node"),)) for s in PAIRS)


def test_group_size_node_shares_statistics_among_each_hosts_ranks():
    """Ranks 0 and 2 on host h0, 1 and 3 on h1 (simulated, as the same-host transport reads hosts):
    ``group_size="node"`` syncs each host's pair, against float64 on that pair's global batch, with
    a group of its own; hosts with 3 and 1 ranks are an error on every rank naming the hosts and
    counts; a rank alone on its host keeps its own statistics; all on one host is the world."""
    others = {"uneven": ("a", "a", "a", "b"), "alone": ("a", "b", "c", "d"), "one_host": ("a",) * 4}
    results = run_ranks("tests.subgroup_jobs:per_node", 4, ("h0", "h1", "h0", "h1"), NODE_PAIRS,
                        others, deadline_s=DEADLINE_S)
    names = []
    for g, spec in enumerate(NODE_PAIRS):
        pair = [results[r]["trained"] for r in (g, g + 2)]
        assert_matches_reference(pair, spec, TOL)
        assert_counts(pair, sites=4, synced=4, forward=4, backward=4)
        sites = [s for r in pair for s in _sites(r)]
        (name,) = {s["group"] for s in sites}
        assert {s["reason"] for s in sites} == {
            f"training mode: statistics over 2 rank(s) of group {name} (group_size=node: ranks [{g}, {g + 2}])"}
        names.append(name)
    assert len(set(names)) == 2 and "0" not in names, names
    for rank, r in enumerate(results):
        assert r["uneven"]["error"].startswith(
            "bnpass: option group_size='node' needs the same number of ranks on every host"), r["uneven"]
        assert "here 3 rank(s) on 1 host(s) (a); 1 rank(s) on 1 host(s) (b)" in r["uneven"]["error"]
        assert r["alone"] == {"name": None, "world_size": 1, "why": "group_size='node': this rank is "
                              "alone on its host, its own statistics, no collective"}, r["alone"]
        assert r["one_host"] == {"name": "0", "world_size": 4, "why": ""}, r["one_host"]


def test_inspect_group_size_node(capsys):
    """``bnpass inspect --group-size node --ranks-per-node 4`` on a simulated world of 8: rank 0's
    sites reduce over its host's 4 ranks, and the reason says which."""
    import json

    from bnpass.inspect.cli import main
    from tests.inspect_common import MODELS

    assert main(["inspect", f"{MODELS}:tiny", "--backend", "bnpass_eager", "--world-size", "8",
                 "--group-size", "node", "--ranks-per-node", "4", "--input-shape", "4,3,8,8",
                 "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    synced = [s for s in data["sites"] if s["action"] == "sync"]
    assert len(synced) == 3 and len({s["group"] for s in synced}) == 1, synced
    assert all(s["reason"].startswith("training mode: statistics over 4 rank(s) of group ") and
               s["reason"].endswith("(group_size=node: ranks [0, 1, 2, 3])") for s in synced), synced
    assert main(["inspect", f"{MODELS}:tiny", "--ranks-per-node", "4"]) == 2
    assert "--ranks-per-node N (N >= 1) goes with --group-size node" in capsys.readouterr().err
