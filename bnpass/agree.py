"""Ranks agree on the collectives a compiled graph will issue before it issues one.

Ranks whose compiled graphs issue different collectives (other channels, one rank in eval mode, a
different model, another input dtype, other options) would issue mismatched all_reduces: gloo aborts
the process or hangs, NCCL hangs or, with equal sizes, silently mixes unrelated statistics. So, the
first time each compiled forward and backward graph runs, before its first collective, the rank
posts that graph's *collective sequence* (bnpass/schedule.py ``collective_sequence``: in order, each
collective's op, element count, dtype, group, transport and the BatchNorm sites it serves) to the
store, and waits, with a deadline, for every rank it reduces with to post the same. A graph with the
same sequence that another rank compiled separately (a recompile for a new batch size, an empty
local batch) agrees at once. On a mismatch every rank raises a BNPassError naming the first
collective that differs and the sites it serves; nothing was reduced.

* A graph that issues no collective (eval on one rank, FrozenBN-only or BN-free models, world size
  1) never waits: it posts what it compiled, for the others' diagnosis, and runs.
* Ranks that wait on each other with different sequences learn it within a poll interval
  (bnpass/meet.py); ``agree_timeout_s`` is only for a rank that never comes (dead, still compiling,
  elsewhere in the program).

This is a key-value exchange through the store (no collective), once per compiled graph, not per step.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Optional

import torch.distributed as dist

from .meet import Deadlock, hold, post, post_and_wait, release
from .options import BNPassError

__all__ = ["AgreeFirst", "agree", "waits", "on_call", "stand_aside", "step_back_in"]

_PREFIX = "bnpass/agree"
_WAITS: list[dict] = []  # this process's agreements: direction, collectives, seconds waited
_ON_CALL: list = []  # told (sequence, direction) at every call of a compiled graph (bnpass/join.py)


def on_call(hook) -> None:
    """Call ``hook(sequence, direction)`` before every run of every compiled graph from now on."""
    if hook not in _ON_CALL:
        _ON_CALL.append(hook)


def waits() -> list[dict]:
    """One entry per agreement this process made (or tried): {"direction", "collectives",
    "waited_s", "agreed"}, oldest first; what ``bnpass inspect`` and the tests read of the waits."""
    return list(_WAITS)


def stand_aside(reason: str, ranks: list[int], token: str) -> Optional[str]:
    """This rank runs no new compiled graph for a while (a rank joined under DDP's Join,
    bnpass/join.py): a rank of ``ranks`` that waits to agree on a graph this rank never ran learns
    it at once, with ``reason``, instead of at its deadline. Returns what to hand ``step_back_in``."""
    store = dist.distributed_c10d._get_default_store()
    key = f"{_PREFIX}/latest/{dist.get_rank()}"
    before = store.get(key).decode() if store.check([key]) else None
    hold(_PREFIX, token, json.dumps({"entries": [], "context": reason, "options": "",
                                     "direction": "aside"}), ranks)
    return before


def step_back_in(before: Optional[str]) -> None:
    """End ``stand_aside``."""
    release(_PREFIX, before)


def _entries(sequence: list[dict], sites: list) -> list[list]:
    """What the other ranks must match, one list per collective."""
    by_index = {s.index: s for s in sites}
    out = []
    for c in sequence:
        served = [by_index[i] for i in c["sites"] if i in by_index]
        out.append([c["op"], c["numel"], c["dtype"], c["group"], c["transport"],
                    [[s.name, s.op, s.channels, s.dtype] for s in served]])
    return out


def _describe(entry: list) -> str:
    op, numel, dtype, group, transport, served = entry
    sites = ", ".join(f"{n} ({o}, C={c}, {dt})" for n, o, c, dt in served) or "no BatchNorm site"
    return f"all_reduce({op}) of {numel} {dtype} over group {group} by {transport}, for {sites}"


def _first_difference(mine: list, theirs: list) -> str:
    for i, (a, b) in enumerate(zip(mine, theirs)):
        if a != b:
            return f"collective {i}: here {_describe(a)}; there {_describe(b)}"
    if len(mine) > len(theirs):
        return f"this rank issues {len(mine)} collective(s), that rank {len(theirs)}; the first extra " \
               f"one here: {_describe(mine[len(theirs)])}"
    return f"this rank issues {len(mine)} collective(s), that rank {len(theirs)}; the first extra one " \
           f"there: {_describe(theirs[len(mine)])}"


def _members(entries: list) -> list[int]:
    from torch.distributed.distributed_c10d import _resolve_process_group

    ranks = set()
    for name in {e[3] for e in entries if e[3] is not None}:
        ranks.update(dist.get_process_group_ranks(_resolve_process_group(name)))
    return sorted(ranks)


def agree(sequence: list[dict], sites: list, timeout_s: float, context: str, options: str = "",
          direction: str = "forward") -> None:
    """Block until every rank this graph reduces with has posted the same collective sequence, or
    raise a BNPassError naming the first difference. ``context``: this graph's sites and their
    decisions, ``options``: the options that shape the sequence, both for the others' diagnosis."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "fake" or dist.get_world_size() == 1:
        return  # `bnpass inspect`'s simulated world, or nobody to disagree with
    entries = _entries(sequence, sites)
    rank = dist.get_rank()
    latest = json.dumps({"entries": entries, "context": context, "options": options,
                         "direction": direction})
    members = _members(entries)
    start = time.monotonic()
    log = {"direction": direction, "collectives": len(entries), "waited_s": 0.0, "agreed": True}
    _WAITS.append(log)
    if len(members) <= 1:  # nothing to reduce (or only with itself): say what it ran, and run
        post(_PREFIX, latest)
        log["waited_s"] = time.monotonic() - start
        return
    digest = hashlib.sha1(json.dumps(entries).encode()).hexdigest()[:16]
    deadlocked = None
    try:
        agreed = post_and_wait(_PREFIX, digest, latest, members, timeout_s)
    except Deadlock as e:
        agreed, deadlocked = False, e.rank
    log.update(waited_s=time.monotonic() - start, agreed=agreed)
    if agreed:
        return
    store = dist.distributed_c10d._get_default_store()
    problems = []
    for m in members:
        if m == rank or (m != deadlocked and store.check([f"{_PREFIX}/{digest}/{m}"])):
            continue
        if not store.check([f"{_PREFIX}/latest/{m}"]):
            problems.append(f"rank {m} has not run a bnpass-compiled graph within {timeout_s:.0f} s "
                            "(dead, still compiling, slower by more than that, or not running this "
                            "code; raise agree_timeout_s if it is only slow)")
            continue
        theirs = json.loads(store.get(f"{_PREFIX}/latest/{m}"))
        if theirs["direction"] == "aside":
            problems.append(f"rank {m} {theirs['context']}")
            continue
        what = "is waiting to run" if m == deadlocked else "last ran"
        if not theirs["entries"]:
            problems.append(f"rank {m} {what} a {theirs['direction']} graph that issues no collective "
                            f"({theirs['context']}) and did not come to this one within "
                            f"{timeout_s:.0f} s")
            continue
        note = "" if theirs["options"] == options else \
            f" (options here: {options}; there: {theirs['options']})"
        problems.append(f"rank {m} {what} a {theirs['direction']} graph with other collectives{note}: "
                        f"{_first_difference(entries, theirs['entries'])}; its sites: {theirs['context']}")
    raise BNPassError(
        f"bnpass: ranks disagree on the collectives of a compiled {direction} graph (after "
        f"{time.monotonic() - start:.1f} s; nothing was reduced). This rank ({rank}) issues "
        f"{len(entries)} collective(s), the first: {_describe(entries[0])}; its sites: {context}; "
        + "; ".join(problems) + ". Every rank must run the same model in the same mode (train/eval) "
        "with the same input dtype and channels, and the same bnpass options.")


class AgreeFirst:
    """A compiled forward or backward graph whose first call first agrees on its collectives."""

    def __init__(self, compiled, sequence: list[dict], record, direction: str, options):
        self._compiled = compiled
        self._sequence = sequence
        self._record = record
        self._direction = direction
        self._timeout_s = options.agree_timeout_s
        self._options = f"pack_collectives={options.pack_collectives}"
        self._agreed = False
        if getattr(compiled, "_boxed_call", False):
            self._boxed_call = True  # in __dict__: wrappers that copy it (functools.wraps) see it

    def __call__(self, *args):
        if not self._agreed:
            context = "; ".join(f"{s.name}: {s.action} ({s.reason})" for s in self._record.sites) \
                or "no BatchNorm"
            agree(self._sequence, self._record.sites, self._timeout_s, context, self._options,
                  self._direction)
            self._agreed = True
        for hook in _ON_CALL:
            hook(self._sequence, self._direction)
        return self._compiled(*args)

    def __getattr__(self, name):  # _boxed_call and the like of the compiled callable
        return getattr(self._compiled, name)
