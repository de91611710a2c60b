"""Rank-side jobs of tests/test_subgroups.py: ranks split into consecutive groups."""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

import bnpass
from bnpass import groups
from tests.models import Spec
from tests.rank_jobs import compile_and_train

TIMEOUT = datetime.timedelta(seconds=60)  # the test's own groups: a dead peer is an error, not a hang


def subgroup_checks(rank: int, world_size: int, cases: dict[str, tuple[Spec, ...]],
                    timeout_s: float) -> dict:
    """``train_in_groups``; then ``create_syncbn_process_group(k)`` for the first case's k: after
    the option made the group (reused?), on its own (forgetting that group: its ranks, an
    all_reduce over it, the group the option then resolves to), and after rank 0 alone made one
    more process group (the error, None where there is none). In between, the group that
    ``group_size=1`` with ``force_sync`` resolves to."""
    out = train_in_groups(rank, world_size, cases)
    k = len(next(iter(cases.values()))[0].sizes)
    count = dist.get_pg_count()
    out["reused"] = {"group": bnpass.create_syncbn_process_group(k).group_name,
                     "pg_count": (count, dist.get_pg_count())}
    groups._MADE.clear()  # as in a fresh process: the helper makes the groups itself
    count = dist.get_pg_count()
    group = bnpass.create_syncbn_process_group(k, timeout_s=timeout_s)
    total = torch.tensor([float(rank)])
    dist.all_reduce(total, group=group)
    out["made"] = {"ranks": dist.get_process_group_ranks(group), "sum_of_ranks": float(total),
                   "pg_count": (count, dist.get_pg_count()),
                   "again": bnpass.create_syncbn_process_group(k) is group,
                   "option": bnpass.Options.from_user({"group_size": k}).group().name == group.group_name}
    forced = bnpass.Options.from_user({"group_size": 1, "force_sync": True}).group()
    out["forced_one_rank"] = {"name": forced.name, "world_size": forced.world_size,
                              "ranks": dist.get_process_group_ranks(
                                  dist.distributed_c10d._resolve_process_group(forced.name))}
    groups._MADE.clear()
    if rank == 0:
        dist.new_group([0], use_local_synchronization=True)  # only rank 0: its count is one ahead
    try:
        bnpass.create_syncbn_process_group(k, timeout_s=timeout_s)
        out["count_mismatch"] = None
    except bnpass.BNPassError as e:
        out["count_mismatch"] = str(e)
    return out


def train_in_groups(rank: int, world_size: int, cases: dict[str, tuple[Spec, ...]]) -> dict:
    """Each case: the ranks are split into consecutive groups of ``len(spec.sizes)``; group g trains
    ``specs[g]`` (its ranks' batches make up that spec's global batch, gradients are summed over
    the group). How the case gives bnpass the group:

    * ``group_size...``: the spec's own options (``group_size``): bnpass makes the group;
    * ``process_group...``: every rank makes every group with ``dist.new_group(ranks)`` (as a user
      would) and passes its own as ``process_group``.

    Gradients are summed over groups made by ``dist.new_group`` in either case.
    """
    out = {}
    made = {}  # k -> this rank's group, made with dist.new_group by every rank (as a user would)
    for case, specs in cases.items():
        k = len(specs[0].sizes)
        if k not in made:
            groups = [dist.new_group(list(range(s, s + k)), timeout=TIMEOUT) for s in range(0, world_size, k)]
            made[k] = groups[rank // k]
        spec = specs[rank // k]
        if case.startswith("process_group"):
            spec = dataclasses.replace(spec, options=spec.options + (("process_group", made[k]),))
        out[case] = compile_and_train(spec, rank % k, group=made[k])
    return out


def per_node(rank: int, world_size: int, hosts: tuple, specs: tuple, others: dict) -> dict:
    """``group_size="node"`` with rank r on host ``hosts[r]`` (BNPASS_TRANSPORT_HOST, as the
    same-host transport reads it): the ranks of host g (in rank order) train ``specs[g]``, summing
    gradients over a group of them. Then, forgetting what was found, each of ``others`` {case:
    hosts}: the group ``group_size="node"`` resolves to (name, size), or its error."""
    from bnpass import nodes

    os.environ["BNPASS_TRANSPORT_HOST"] = hosts[rank]
    names = sorted(set(hosts))
    on = {h: [r for r in range(world_size) if hosts[r] == h] for h in names}
    made = {h: dist.new_group(on[h], timeout=TIMEOUT) for h in names}
    mine = on[hosts[rank]]
    out = {"trained": compile_and_train(specs[names.index(hosts[rank])], mine.index(rank),
                                        group=made[hosts[rank]])}
    for case, case_hosts in others.items():
        groups._MADE.clear()
        nodes._FOUND.clear()
        os.environ["BNPASS_TRANSPORT_HOST"] = case_hosts[rank]
        try:
            choice = bnpass.Options.from_user({"group_size": "node", "agree_timeout_s": 30.0}).group()
            out[case] = {"name": choice.name, "world_size": choice.world_size, "why": choice.why_local}
        except bnpass.BNPassError as e:
            out[case] = {"error": str(e)}
    return out
