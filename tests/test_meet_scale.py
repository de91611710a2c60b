"""The store protocols cost a constant number of requests per rank, whatever the world size (issue 23).

Simulated ranks: a thread each with its own client of one TCPStore, a counting proxy around it
(benchmarks/agreement_scale.py), running bnpass's own agreement (``agree.agree_among``) and group
making (``groups.meet_to_make``); no model, no process group. 64 ranks tell O(1) from O(W): a
protocol that read one key per rank would pay at least 64 requests on each.
"""

from __future__ import annotations

import threading

import pytest

from benchmarks.agreement_scale import simulate, stores
from bnpass import meet

W = 64
MOST = 10  # requests per rank on the way to an agreement (bnpass/agree.py says 9; one of slack)
MOST_FAILED = 20  # ... to a failed one, diagnosis included


def _assert_all_raised(result: dict) -> list[str]:
    errors = result["errors"]
    assert result["unfinished"] == 0, result
    assert all(e is not None for e in errors), [i for i, e in enumerate(errors) if e is None]
    return errors


@pytest.mark.parametrize("protocol", ["agreement", "group making"])
def test_requests_per_rank_do_not_grow_with_the_world(protocol):
    """8 and 64 ranks arriving over 1 s: every rank agrees, paying at most MOST requests, and no
    more at 64 than at 8 (+1: who arrives last or first pays a request or two more)."""
    small = simulate(protocol, 8, 1.0, timeout_s=60)
    large = simulate(protocol, W, 1.0, timeout_s=60)
    for result in (small, large):
        assert result["errors"] == [None] * result["world"], result["errors"]
        assert max(result["requests"]) <= MOST, result["requests"]
    assert max(large["requests"]) <= max(small["requests"]) + 1, (small["requests"], large["requests"])
    assert large["all_requests"] <= MOST * W
    assert large["knows_s"] < 1.0, large["knows_s"]


def test_a_recompile_agrees_at_once_in_two_requests():
    """Each rank agrees on the same sequence twice (a graph, then its recompile for another batch
    size): the second costs 2 requests (what it ran; the sequence's count, already full)."""
    once = simulate("agreement", W, 0.0, timeout_s=60, seed=1)
    twice = simulate("agreement", W, 0.0, timeout_s=60, seed=1, repeat=2)
    assert twice["errors"] == [None] * W, twice["errors"]
    assert twice["all_requests"] - once["all_requests"] == 2 * W, (once["requests"], twice["requests"])


def test_a_divergent_rank_is_named_on_every_rank_at_once():
    """Rank 33 of 64 has two channels more at collective 7: every rank raises within 10 s of the
    last arrival (agree_timeout_s is 120 s), naming the first difference and which ranks hold which
    sequence, in a message that does not list the ranks one by one."""
    result = simulate("agreement", W, 0.5, odd_rank=33, timeout_s=120)
    errors = _assert_all_raised(result)
    assert result["knows_s"] < 10, result["knows_s"]
    assert max(result["requests"]) <= MOST_FAILED, result["requests"]
    for rank, error in enumerate(errors):
        assert error.startswith("bnpass: ranks disagree on the collectives of a compiled forward graph")
        assert "collective 7: here" in error and "C=130" in error and "C=128" in error, error
        assert "hold 2 different sequences" in error and "by 0-32, 34-63 (63 rank(s))" in error, error
        assert ("rank 33 is waiting" if rank != 33 else "rank 0 (and 62 more alike: 1-32, 34-63)") in error
        assert len(error) < 1500, len(error)


def test_a_missing_rank_is_named_at_the_deadline():
    """Rank 7 of 64 never comes: every other rank raises at agree_timeout_s (2 s), naming it. The
    first rank to come keeps the time: the others learn it from its verdict, not from their own
    deadlines (5 s later, bnpass/meet.py)."""
    result = simulate("agreement", W, 0.0, absent_rank=7, timeout_s=2.0)
    errors = _assert_all_raised(result)
    assert 1.5 < result["knows_s"] < 6.0, result["knows_s"]
    assert max(result["requests"]) <= MOST_FAILED, result["requests"]
    for error in errors:
        assert "rank 7 has not run a bnpass-compiled graph within 2 s" in error, error


def test_group_making_names_the_odd_rank_and_the_missing_one():
    """Rank 3 of 64 made one process group more; then rank 9 does not come: each time every rank
    raises, naming them (grouped on rank 3, which differs from all the others)."""
    odd = simulate("group making", W, 0.5, odd_rank=3, timeout_s=120)
    for rank, error in enumerate(_assert_all_raised(odd)):
        assert odd["knows_s"] < 10
        if rank == 3:
            assert "rank 0 came having made 4 process group(s) before, this rank (3) 5" in error, error
            assert "so did ranks 4-63" in error, error
        else:
            assert f"rank 3 came having made 5 process group(s) before, this rank ({rank}) 4" in error
    missing = simulate("group making", W, 0.0, absent_rank=9, timeout_s=2.0)
    for error in _assert_all_raised(missing):
        assert "rank 9 did not come within agree_timeout_s=2 s" in error, error
    assert max(odd["requests"] + missing["requests"]) <= MOST_FAILED


def test_a_rank_standing_aside_decides_the_meeting_at_once():
    """DDP's Join: rank 5 stood aside (bnpass/agree.py ``stand_aside``); the other 63 come to a new
    meeting of the series, which is decided as the last of them comes, naming rank 5. Whether it
    stands aside before or after they come; and after it steps back in, a meeting waits for it."""
    ranks = list(range(W))
    each = stores(W)
    for order, place in (("before", "a/0"), ("after", "a/1")):
        for s in each:
            s.requests = 0
        verdicts = [None] * W

        def come(rank: int) -> None:
            verdicts[rank] = meet.meet(each[rank], place, rank, "d", ranks, 30.0, aside="a/aside")

        if order == "before":
            assert meet.stand_aside(each[5], "a/aside", 5, place, ranks) is None
        threads = [threading.Thread(target=come, args=(r,)) for r in ranks if r != 5]
        for t in threads:
            t.start()
        if order == "after":
            while int(each[5]._store.add(f"{place}/count", 0)) < W - 1:
                threading.Event().wait(0.01)
            assert meet.stand_aside(each[5], "a/aside", 5, place, ranks).aside == [5]
        for t in threads:
            t.join(30)
        for r in ranks:
            if r != 5:
                assert not verdicts[r].ok and verdicts[r].aside == [5] and verdicts[r].missing == [], verdicts[r]
        assert max(s.requests for s in each) <= MOST
        meet.step_back_in(each[5], "a/aside", 5)
    # back in: a meeting of the other ranks alone is not decided without it (deadline 0.5 s)
    verdict = meet.meet(each[0], "a/2", 0, "d", [0, 5], 0.5, aside="a/aside")
    assert verdict.missing == [5] and verdict.aside == [] and verdict.timed_out, verdict


def test_ranks_text_is_short_at_any_world_size():
    assert meet.ranks_text([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
    assert meet.ranks_text(list(range(0, 2048, 2)), limit=3) == "0, 2, 4 and 1021 more"
    assert meet.who([4]) == "rank 4"
    assert meet.who([4, 5, 6, 9]) == "rank 4 (and 3 more alike: 5-6, 9)"
    assert meet.ranks_key(list(range(1024))) == meet.ranks_key(list(reversed(range(1024))))
    assert len(meet.ranks_key(list(range(1024)))) < 24


def _hosts_of_each(hosts: list[str], timeout_s: float = 30.0) -> tuple[list, list[int]]:
    """bnpass/nodes.py ``hosts_of`` for ranks on ``hosts`` (rank r on hosts[r]), a thread each:
    each rank's host map (or error) and requests."""
    from bnpass.errors import BNPassError
    from bnpass.nodes import hosts_of

    ranks = list(range(len(hosts)))
    each = stores(len(ranks))
    out = [None] * len(ranks)

    def come(rank: int) -> None:
        try:
            out[rank] = hosts_of(each[rank], rank, ranks, "0", hosts[rank], timeout_s)
        except BNPassError as e:
            out[rank] = str(e)

    threads = [threading.Thread(target=come, args=(r,)) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s + 30)
    return out, [s.requests for s in each]


def test_the_host_map_for_group_size_node_costs_a_constant():
    """64 ranks on 8 hosts (rank r on host r % 8): every rank gets the same map of hosts to ranks in
    at most 6 requests. 16 ranks on one host and 8 on six others: an error on every rank naming the
    hosts and their counts, grouped."""
    hosts = [f"node{r % 8}" for r in range(W)]
    maps, requests = _hosts_of_each(hosts)
    assert all(m == {f"node{h}": list(range(h, W, 8)) for h in range(8)} for m in maps), maps[0]
    assert max(requests) <= 6, requests
    uneven = [f"node{min(r // 8, 6)}" for r in range(W)]  # node6 has 16 ranks, the others 8
    errors, requests = _hosts_of_each(uneven)
    for e in errors:
        assert e.startswith("bnpass: option group_size='node' needs the same number of ranks on every "
                            "host"), e
        assert "here 16 rank(s) on 1 host(s) (node6); 8 rank(s) on 6 host(s) (node0, node1, node2, " \
               "node3 and 2 more)" in e, e
    assert max(requests) <= 6, requests


class _GoneStore:
    """A store whose host has exited: every request fails as TCPStore's does then."""

    def set(self, key, value):
        import torch.distributed as dist

        raise dist.DistNetworkError("Broken pipe")

    add = get = check = wait = append = set


def test_a_graph_without_collectives_runs_when_the_store_is_gone():
    """Evaluation on rank 1 after rank 0, the store's host, has exited: a graph with no collective
    posts its diagnosis only if someone can read it, and runs; one with collectives still raises."""
    import torch.distributed as dist

    from bnpass.agree import agree_among

    agree_among(_GoneStore(), 1, [1], [], timeout_s=1.0, context="eval")
    with pytest.raises(dist.DistError):
        agree_among(_GoneStore(), 1, [0, 1], [{"op": "all_reduce"}], timeout_s=1.0, context="train")
