"""Ranks agree on what they compiled before their first collective: never a hang, never silent.

Ranks that compiled different BatchNorm sequences (different channels, one rank in eval mode, a
different model, another input dtype) would issue mismatched all_reduces: gloo aborts the process
or hangs, NCCL hangs or, with equal sizes, silently mixes unrelated statistics. So, the first time a
bnpass-compiled graph runs, each rank posts the signature of its collectives (the synced sites in
order: name, channels, dtype, group) to the process group's store, and waits, with a deadline, for
every rank it reduces with to post the same signature. A graph with the same signature that another
rank compiled separately (a recompile for a new batch size on one rank only) agrees at once. On a
mismatch or the deadline every rank raises a BNPassError naming what differs; nothing is reduced.

This is a key-value exchange through the store (no collective), once per compiled graph, not per step.
"""

from __future__ import annotations

import hashlib
import json
import time

import torch.distributed as dist

from .meet import post_and_wait
from .options import BNPassError
from .sites import SYNC, Site

__all__ = ["signature", "agree"]

_PREFIX = "bnpass/agree"


def signature(sites: list[Site]) -> list[list]:
    """What the other ranks must match: every synced site, in graph order."""
    return [[s.name, s.op, s.channels, s.dtype, s.group, s.world_size] for s in sites if s.action == SYNC]


def _describe(sites: list) -> str:
    return "[" + ", ".join(f"{n} ({op}, C={c}, {dt}, group {g})" for n, op, c, dt, g, _ in sites) + "]"


def _first_difference(mine: list, theirs: list) -> str:
    for i, (a, b) in enumerate(zip(mine, theirs)):
        if a != b:
            return f"synced site {i}: here {_describe([a])}, there {_describe([b])}"
    return f"this rank has {len(mine)} synced site(s), that rank {len(theirs)}"


def _members(groups: set[str], default_group: str | None) -> list[int]:
    from torch.distributed.distributed_c10d import _resolve_process_group

    names = set(groups) | ({default_group} if default_group is not None else set())
    ranks = set()
    for name in names:
        ranks.update(dist.get_process_group_ranks(_resolve_process_group(name)))
    return sorted(ranks)


def agree(sites: list[Site], default_group: str | None, timeout_s: float, context: str,
          schedule: str = "") -> None:
    """Block until every rank this graph reduces with has posted the same signature, or raise.
    ``schedule``: the options that decide how the collectives are packed (bnpass/schedule.py);
    ranks that pack differently would issue all_reduces of different sizes."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "fake" or dist.get_world_size() == 1:
        return  # `bnpass inspect`'s simulated world, or nobody to disagree with
    sig = signature(sites)
    members = _members({s[4] for s in sig}, default_group)
    rank = dist.get_rank()
    if len(members) <= 1:
        return
    digest = hashlib.sha1(json.dumps([sig, schedule]).encode()).hexdigest()[:16]
    start = time.monotonic()
    if post_and_wait(_PREFIX, digest, json.dumps({"sig": sig, "context": context, "schedule": schedule}),
                     members, timeout_s):
        return
    store = dist.distributed_c10d._get_default_store()
    problems = []
    for m in members:
        if m == rank or store.check([f"{_PREFIX}/{digest}/{m}"]):
            continue
        if not store.check([f"{_PREFIX}/latest/{m}"]):
            problems.append(f"rank {m} has not run a bnpass-compiled graph within {timeout_s:.0f} s "
                            "(dead, slower by more than that, or not running this code)")
            continue
        theirs = json.loads(store.get(f"{_PREFIX}/latest/{m}"))
        if theirs["sig"] == sig and theirs.get("schedule") != schedule:
            problems.append(f"rank {m} schedules its collectives otherwise: here {schedule}, there "
                            f"{theirs.get('schedule')} (pass the same options on every rank)")
            continue
        problems.append(f"rank {m} compiled different BatchNorm sites: "
                        f"{_first_difference(sig, theirs['sig'])}; its graph: {theirs['context']}")
    raise BNPassError(
        f"bnpass: ranks disagree on the synchronized BatchNorms of a compiled graph (waited "
        f"{time.monotonic() - start:.0f} s). This rank ({rank}) has {len(sig)} synced site(s) "
        f"{_describe(sig)}; " + "; ".join(problems) + ". Every rank must run the same model in the "
        "same mode (train/eval) with the same input dtype and channels, and the same bnpass options.")
