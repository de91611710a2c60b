"""The same-host shared-memory transport (bnpass/transport): ranks on one host sum bnpass's
statistics through a shared segment instead of gloo.

The BN forms of tests/test_sync.py run through it already (``transport="auto"`` is the default;
that file checks they did). Here: 4 ranks on 2 cores in two groups at once against float64,
bitwise-equal running statistics; ranks on two simulated hosts (the group spanning them keeps
gloo, the groups inside a host take shared memory); ``transport="process_group"``; a peer that
exits, is killed mid-step, or never comes (an error naming it, in bounded time, no hang); no
segment left in /dev/shm; the option's errors.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import bnpass
from tests.checks import assert_counts, assert_matches_reference
from tests.harness import RankFailure, run_ranks
from tests.models import Spec

TOL = 2e-5
EAGER = "bnpass_eager"
PAIRS = (Spec("pair_a", "convnet", (3, 2), (3, 5, 5), backend=EAGER, options=(("group_size", 2),)),
         Spec("pair_b", "convnet", (1, 5), (3, 5, 5), offset=1.0, backend=EAGER,
              options=(("group_size", 2),)))
WHOLE = Spec("whole", "convnet", (2, 3, 1, 4), (3, 5, 5), backend=EAGER)
CASES = {"group_size": PAIRS, "world": (WHOLE,)}


def _no_segments_left(results):
    pids = [r["pid"] for r in results if r]
    left = [p.name for pid in pids for p in Path("/dev/shm").glob(f"bnpass-{pid}-*")]
    assert not left, left
    assert all(r["segments"] == [] for r in results if r), [r["segments"] for r in results if r]


def _buffers_bitwise_equal(per_rank):
    names = per_rank[0]["buffers"].keys()
    for name in names:
        diffs = [float((r["buffers"][name].double() - per_rank[0]["buffers"][name].double()).abs().max())
                 for r in per_rank[1:]]
        assert diffs == [0.0] * len(diffs), (name, diffs)


@pytest.fixture(scope="module")
def one_host():
    return run_ranks("tests.transport_jobs:train_with_hosts", 4, ["h"] * 4, CASES, deadline_s=300)


@pytest.fixture(scope="module")
def two_hosts():
    return run_ranks("tests.transport_jobs:train_with_hosts", 4, ["h0", "h0", "h1", "h1"], CASES,
                     deadline_s=300)


def test_four_ranks_on_two_cores_two_groups_at_once(one_host):
    """4 ranks on this 2-core machine: a group of all 4 and two groups of 2 (group_size=2), each
    against float64 on its own global batch, every collective through shared memory, running
    statistics bitwise equal within each group."""
    assert_matches_reference([r["world"] for r in one_host], WHOLE, TOL)
    assert_counts([r["world"] for r in one_host], sites=4, synced=4, forward=4, backward=4)
    _buffers_bitwise_equal([r["world"] for r in one_host])
    for g, spec in enumerate(PAIRS):
        pair = [one_host[r]["group_size"] for r in (2 * g, 2 * g + 1)]
        assert_matches_reference(pair, spec, TOL)
        assert_counts(pair, sites=4, synced=4, forward=4, backward=4)
        _buffers_bitwise_equal(pair)
    for r in one_host:
        assert r["world"]["transports"] == ["shm"] * 8, r["world"]["transports"]
        assert r["group_size"]["transports"] == ["shm"] * 8, r["group_size"]["transports"]
    _no_segments_left(one_host)


def test_group_spanning_two_hosts_keeps_gloo(two_hosts):
    """Ranks 0-1 on host h0, 2-3 on h1 (BNPASS_TRANSPORT_HOST): the group of all 4 keeps the
    process group, each pair (one host) takes shared memory; numbers as float64 either way;
    convolution backwards split for the process group's collectives only."""
    assert_matches_reference([r["world"] for r in two_hosts], WHOLE, TOL)
    assert_counts([r["world"] for r in two_hosts], sites=4, synced=4, forward=4, backward=4)
    for g, spec in enumerate(PAIRS):
        pair = [two_hosts[r]["group_size"] for r in (2 * g, 2 * g + 1)]
        assert_matches_reference(pair, spec, TOL)
    for r in two_hosts:
        assert r["world"]["transports"] == ["process_group"] * 8, r["world"]["transports"]
        assert r["group_size"]["transports"] == ["shm"] * 8, r["group_size"]["transports"]
        # convolution backwards are split on the CPU whichever the transport: both are asynchronous
        # (shared memory: shm_issue ... shm_wait), and the weight gradient runs in between
        assert r["world"]["split"] > 0 and r["group_size"]["split"] > 0, (r["world"]["split"], r["group_size"]["split"])
    _no_segments_left(two_hosts)


def test_transport_process_group_option():
    """transport="process_group": gloo as before this transport existed; the same numbers."""
    spec = dataclasses.replace(PAIRS[0], name="pg", options=(("transport", "process_group"),))
    results = run_ranks("tests.transport_jobs:specs_on_world", 2, [spec], deadline_s=300)
    per_rank = [r["pg"] for r in results]
    assert_matches_reference(per_rank, spec, TOL)
    assert_counts(per_rank, sites=4, synced=4, forward=4, backward=4)
    assert all(r["transports"] == ["process_group"] * 8 for r in per_rank)


def test_direct_calls_sum_in_rank_order_and_refuse_mismatched_sizes():
    """The ops on 3 ranks: each result is the rank-order float sum of the ranks' payloads (bitwise,
    on every rank), for float32, float64, a transposed payload, an empty one and one larger than a
    buffer (several rounds), in one call and as issue / wait pairs, also with every round issued
    before the first wait; a wait on a token no issue returned, and a call whose size differs
    between ranks, are errors (the latter naming a peer)."""
    import torch

    results = run_ranks("tests.transport_jobs:direct_calls", 3, deadline_s=240)
    for i in range(len(results[0]["inputs"])):
        inputs = [r["inputs"][i] for r in results]
        expected = inputs[0].clone()
        for t in inputs[1:]:
            expected += t
        for r in results:
            for how in ("sums", "paired", "nested"):
                assert r[how][i].dtype == expected.dtype and r[how][i].shape == expected.shape
                assert torch.equal(r[how][i], expected), (how, i)
    for rank, r in enumerate(results):
        assert r["bogus_token"]["type"] == "BNPassError" and "no shm_issue" in r["bogus_token"]["error"], r
        error = r["mismatch"]["error"]
        assert r["mismatch"]["type"] == "BNPassError" and "met a different collective" in error, r
        assert f"this rank reduces {3 + rank} torch.float32" in error, error
    _no_segments_left(results)


PG_TIMEOUT_S = 6.0


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_a_peer_that_dies_is_named_at_once(how):
    """Rank 1 exits between steps, or is SIGKILLed in the middle of its steps: rank 0, waiting for
    it in shared memory, raises a bnpass error naming it well before the group's timeout."""
    with pytest.raises(RankFailure) as failure:
        run_ranks("tests.transport_jobs:dead_peer", 2, how, pg_timeout_s=120.0, deadline_s=240)
    assert "rank 1 died with exit code" in str(failure.value), str(failure.value)
    survivor = failure.value.results[0]
    assert survivor is not None, str(failure.value)  # rank 0 reported: it did not hang
    assert survivor["transports"] == ["shm", "shm"], survivor
    assert survivor["type"] == "BNPassError" and "rank 1 (pid" in survivor["error"] \
        and "died or exited" in survivor["error"], survivor
    assert survivor["elapsed"] < 10.0, survivor
    _no_segments_left([survivor])


def test_a_peer_that_never_comes_is_named_at_the_group_timeout():
    """Rank 1 is alive but never reaches the collective: rank 0 raises at the group's timeout."""
    with pytest.raises(RankFailure) as failure:
        run_ranks("tests.transport_jobs:dead_peer", 2, "stall", PG_TIMEOUT_S + 4, pg_timeout_s=PG_TIMEOUT_S,
                  deadline_s=240)
    survivor = failure.value.results[0]
    assert survivor is not None, str(failure.value)
    assert survivor["type"] == "BNPassError" and "rank 1 (pid" in survivor["error"] \
        and "did not reach the same collective" in survivor["error"], survivor
    assert PG_TIMEOUT_S - 1 <= survivor["elapsed"] < PG_TIMEOUT_S + 10, survivor


@pytest.mark.parametrize("value, message", [
    ("shm", "option transport must be one of 'auto', 'process_group'"),
    (1, "option transport must be one of 'auto', 'process_group'"),
])
def test_transport_option_errors(value, message):
    with pytest.raises(bnpass.BNPassError, match=message):
        bnpass.Options.from_user({"transport": value})


def test_transport_option_in_the_cache_fingerprint():
    auto, pg = (bnpass.Options.from_user({"transport": t}) for t in ("auto", "process_group"))
    assert auto.fingerprint() != pg.fingerprint()
    assert auto.fingerprint() == bnpass.Options.from_user({}).fingerprint()
