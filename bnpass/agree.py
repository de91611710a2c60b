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
* Ranks with different sequences learn it as soon as the last of them comes (bnpass/meet.py: the
  graphs' meetings, in the order the ranks run them); ``agree_timeout_s`` is only for a rank that
  never comes (dead, still compiling, elsewhere in the program), which is then named.

This is a key-value exchange through the store (no collective), once per compiled graph, not per
step, of a few requests per rank whatever the number of ranks (``agree_among``); what a failed one
prints groups the ranks by the sequence they hold, so it stays short at any number of ranks.
"""

from __future__ import annotations

import hashlib
import json
import time
import torch.distributed as dist

from . import meet
from .errors import BNPassError

__all__ = ["AgreeFirst", "agree", "agree_among", "waits", "on_call", "stand_aside", "step_back_in"]

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


def stand_aside(reason: str, ranks: list[int]) -> tuple:
    """This rank runs no new compiled graph for a while (a rank joined under DDP's Join,
    bnpass/join.py): a rank of ``ranks`` that waits to agree on a graph this rank never ran learns
    it at once, with ``reason``, instead of at its deadline. Returns what to hand ``step_back_in``."""
    store, rank = _store(), dist.get_rank()
    key = _latest_key(rank)
    before = store.get(key).decode() if store.check([key]) else None
    store.set(key, json.dumps({"entries": [], "context": reason, "options": "", "direction": "aside"}))
    series = _series(ranks)
    meet.stand_aside(store, f"{series}/aside", rank, meet.peek_meeting(store, f"{series}/graph", rank),
                     ranks)
    return before, series


def step_back_in(aside: tuple) -> None:
    """End ``stand_aside``."""
    before, series = aside
    store, rank = _store(), dist.get_rank()
    meet.step_back_in(store, f"{series}/aside", rank)
    if before is not None:
        store.set(_latest_key(rank), before)


def _latest_key(rank: int) -> str:
    """Where ``rank`` says what it last ran, for the others' diagnosis."""
    return f"{_PREFIX}/latest/{rank}"


def _store():
    return dist.distributed_c10d._get_default_store()


def _series(members: list[int]) -> str:
    """The keys of the agreements among ``members``: their graphs' meetings, in the order the ranks
    first run them (``graph/<i>``), the digests seen (``digest/<d>``: how many ranks came with it;
    ``seq/<d>``: what the first of them ran, for the others' diagnosis), who stands aside."""
    return f"{_PREFIX}/{meet.ranks_key(members)}"


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
    start = time.monotonic()
    log = {"direction": direction, "collectives": len(entries), "waited_s": 0.0, "agreed": False}
    _WAITS.append(log)
    try:
        agree_among(_store(), dist.get_rank(), _members(entries), entries, timeout_s, context, options,
                    direction)
        log["agreed"] = True
    finally:
        log["waited_s"] = time.monotonic() - start


def agree_among(store, rank: int, members: list[int], entries: list, timeout_s: float, context: str,
                options: str = "", direction: str = "forward") -> None:
    """The agreement itself, through ``store`` as ``rank`` (``agree`` passes the default group's;
    benchmarks/agreement_scale.py and the tests, simulated ranks'): return once every rank of
    ``members`` came with the same ``entries``, or raise a BNPassError. At most 9 store requests on
    the way to an agreement, whatever the number of ranks and however long it waits (a recompile:
    2); a failed one, its diagnosis included, at most 20.

    Each distinct sequence is counted (``digest/<d>``); the first ``len(members)`` ranks that come
    with it meet at this rank's next graph meeting (bnpass/meet.py), where ranks running the same
    program arrive in the same order; a later one (a recompile for another batch size, an empty
    local batch) finds the count full and goes on at once."""
    start = time.monotonic()
    latest = json.dumps({"entries": entries, "context": context, "options": options,
                         "direction": direction})
    if len(members) <= 1:  # nothing to reduce (or only with itself): say what it ran; run
        try:
            store.set(_latest_key(rank), latest)
        except dist.DistError:  # the store's host (rank 0) has exited, e.g. evaluation after training
            pass  # on this rank alone: nobody is left to read the diagnosis, and nothing to wait for
        return
    store.set(_latest_key(rank), latest)
    series = _series(members)
    digest = hashlib.sha1(json.dumps(entries).encode()).hexdigest()[:16]
    count = int(store.add(f"{series}/digest/{digest}", 1))
    if count > len(members):
        return  # every rank came with it before
    if count == 1:
        store.set(f"{series}/seq/{digest}", latest)
    place = meet.next_meeting(store, f"{series}/graph", rank)
    verdict = meet.meet(store, place, rank, digest, members, timeout_s, aside=f"{series}/aside")
    if verdict.ok:
        return
    problems = _problems(store, series, rank, verdict, digest, entries, options, timeout_s)
    raise BNPassError(
        f"bnpass: ranks disagree on the collectives of a compiled {direction} graph (after "
        f"{time.monotonic() - start:.1f} s; nothing was reduced). This rank ({rank}) issues "
        f"{len(entries)} collective(s), the first: {_describe(entries[0])}; its sites: {context}; "
        + "; ".join(problems) + ". Every rank must run the same model in the same mode (train/eval) "
        "with the same input dtype and channels, and the same bnpass options.")


_DESCRIBED = 2  # other sequences, and missing ranks, described in full; the rest are counted
_LISTED = 4  # sequences listed with their ranks


def _problems(store, series: str, rank: int, verdict: "meet.Verdict", digest: str, entries: list,
              options: str, timeout_s: float) -> list[str]:
    """What went wrong, short at any number of ranks: the ranks grouped by the sequence they hold,
    the first difference from each of the two most common others, and who did not come."""
    problems = []
    groups = verdict.groups()
    if len(groups) > 1:
        mine = {digest: " (this rank's)"}
        listed = ", ".join(f"{d}{mine.get(d, '')} by {meet.ranks_text(r)} ({len(r)} rank(s))"
                           for d, r in groups[:_LISTED])
        more = f" and {len(groups) - _LISTED} more" if len(groups) > _LISTED else ""
        problems.append(f"the {sum(len(r) for _, r in groups)} ranks that came hold {len(groups)} "
                        f"different sequences: {listed}{more}")
    others = [(d, r) for d, r in groups if d != digest]
    for d, ranks in others[:_DESCRIBED]:
        theirs = json.loads(store.get(f"{series}/seq/{d}"))
        note = "" if theirs["options"] == options else \
            f" (options here: {options}; there: {theirs['options']})"
        problems.append(f"{meet.who(ranks)} is waiting to run a {theirs['direction']} graph with other "
                        f"collectives{note}: {_first_difference(entries, theirs['entries'])}; its "
                        f"sites: {theirs['context']}")
    if len(others) > _DESCRIBED:
        rest = [r for _, ranks in others[_DESCRIBED:] for r in ranks]
        problems.append(f"ranks {meet.ranks_text(rest)} wait with yet other sequences")
    if verdict.aside:
        reason = json.loads(store.get(_latest_key(verdict.aside[0])))["context"]
        problems.append(f"rank {verdict.aside[0]} {reason}")
        if len(verdict.aside) > 1:
            problems.append(f"{'so have ranks' if len(verdict.aside) > 2 else 'so has rank'} "
                            f"{meet.ranks_text(verdict.aside[1:])}")
    missing = [m for m in verdict.missing if m != rank]
    for m in missing[:_DESCRIBED]:
        problems.append(_missing(store, m, entries, options, timeout_s))
    if len(missing) > _DESCRIBED:
        problems.append(f"ranks {meet.ranks_text(missing[_DESCRIBED:])} did not come either")
    if rank in verdict.missing:
        problems.append(f"rank {verdict.by} gave up waiting for this rank (agree_timeout_s "
                        f"{timeout_s:.0f} s) before it came")
    return problems


def _missing(store, m: int, entries: list, options: str, timeout_s: float) -> str:
    """Why rank ``m`` did not come, from what it last ran (two requests)."""
    key = _latest_key(m)
    if not store.check([key]):
        return (f"rank {m} has not run a bnpass-compiled graph within {timeout_s:.0f} s (dead, still "
                "compiling, slower by more than that, or not running this code; raise agree_timeout_s "
                "if it is only slow)")
    theirs = json.loads(store.get(key))
    if theirs["direction"] == "aside":
        return f"rank {m} {theirs['context']}"
    if not theirs["entries"]:
        return (f"rank {m} last ran a {theirs['direction']} graph that issues no collective "
                f"({theirs['context']}) and did not come to this one within {timeout_s:.0f} s")
    note = "" if theirs["options"] == options else f" (options here: {options}; there: {theirs['options']})"
    if theirs["entries"] == entries:
        return f"rank {m} ran a graph with these collectives and did not come to this one within " \
               f"{timeout_s:.0f} s"
    return (f"rank {m} last ran a {theirs['direction']} graph with other collectives{note} and did not "
            f"come to this one within {timeout_s:.0f} s: {_first_difference(entries, theirs['entries'])}; "
            f"its sites: {theirs['context']}")


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
