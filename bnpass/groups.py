"""Subgroups: statistics over consecutive groups of k ranks (``options={"group_size": k}``), or over
the ranks of each host (``group_size="node"``: the host map from bnpass/nodes.py, then as below).

As apex's ``create_syncbn_process_group(group_size)``: the ranks of the default group are split
into consecutive groups of ``k`` (ranks 0..k-1, k..2k-1, ...), and each BatchNorm reduces its
statistics over the group its rank is in.

Making a group must never hang. ``torch.distributed.new_group`` rendezvouses the new group's ranks
through the store and, by default, waits for them as long as the group's timeout (30 minutes for
gloo); a partner that failed before it got there (an exception in user code, a crash during
tracing) used to leave the other rank waiting that long. So:

* At compile time (the option), only the members of a subgroup make it
  (``use_local_synchronization=True``): ranks of the other subgroups neither call nor wait for it,
  so one failing group cannot stall the others.
* Before ``new_group``, the ranks meet in the store with a deadline (``agree_timeout_s`` for the
  option, ``timeout_s`` for ``create_syncbn_process_group``): a rank that does not come, or comes
  having made a different number of process groups (torch would name the group differently on
  it), is named in a ``BNPassError``. ``new_group``'s own rendezvous gets the same deadline; the
  group's collectives then get the parent group's timeout back.
* A group is made once per process for each (parent group, k) and kept: every later compile
  (recompiles, other models, the option after the helper) reuses the same group object.

``create_syncbn_process_group(k)``, called on every rank right after ``init_process_group``, makes
the groups at a point every rank passes alike, as apex does (every rank makes every group); the
option then reuses them. It is the way where the default group is bound to a device
(``init_process_group(device_id=...)``): torch then makes subgroups by splitting the NCCL
communicator, which every rank must join, so members alone cannot make one at compile time and the
option refuses to try.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Optional

import torch.distributed as dist

from .errors import BNPassError
from . import meet
from .nodes import node_ranks

__all__ = ["create_syncbn_process_group", "group_of_size", "group_of_node", "NODE", "check_group_size", "describe", "stand_in",
           "make_stand_in", "stand_in_names"]

_PREFIX = "bnpass/subgroup"
NODE = "node"  # options={"group_size": "node"}: the ranks of each host (bnpass/nodes.py)


@dataclasses.dataclass(frozen=True)
class _Made:
    parent: dist.ProcessGroup
    group: dist.ProcessGroup
    description: str  # "group_size=k: ranks [...]", for the sites' reasons

    def alive(self) -> bool:
        """Neither group destroyed (nor the default group re-initialised since)."""
        made = dist.distributed_c10d._world.pg_map
        return self.parent in made and self.group in made


_MADE: dict[tuple[str, int | str], _Made] = {}  # (parent group name, k or NODE) -> this rank's subgroup
# group name -> the group of the same ranks that bnpass's collectives use instead (bnpass/join.py:
# DDP's Join, whose joined ranks answer them beside DDP's own collectives on the first group).
_STAND_INS: dict[str, dist.ProcessGroup] = {}


def stand_in(group_name: Optional[str]) -> Optional[dist.ProcessGroup]:
    """The group bnpass reduces over in place of ``group_name`` (bnpass.Joinable's), or None."""
    group = _STAND_INS.get(group_name) if group_name is not None else None
    return group if group is not None and group in dist.distributed_c10d._world.pg_map else None


def make_stand_in(base: dist.ProcessGroup) -> dist.ProcessGroup:
    """A group of ``base``'s ranks, with its timeout, that bnpass reduces over in place of ``base``
    from now on (``stand_in``); made once per process. Every rank of the default group must call
    this alike (``new_group``)."""
    made = stand_in(base.group_name)
    if made is None:
        made = dist.new_group(dist.get_process_group_ranks(base), timeout=_timeout_of(base),
                              backend=dist.get_backend(base), group_desc="bnpass_join")
        _STAND_INS[base.group_name] = made
    return made


def stand_in_names() -> set[str]:
    """The names of the groups that stand in for others (``stand_in``)."""
    return {g.group_name for g in _STAND_INS.values()}


def check_group_size(value: object, what: str = "option group_size", node: bool = False) -> int | str:
    """``value`` if it is a positive int (or, with ``node``, "node"), else a BNPassError saying what
    is wrong and what to pass."""
    if node and value == NODE:
        return value
    if node and isinstance(value, str):
        raise BNPassError(f"{what} must be a positive int (the number of consecutive ranks that share "
                          f"statistics) or 'node' (the ranks of each host), got str {value!r}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise BNPassError(f"{what} must be a positive int (the number of consecutive ranks that "
                          f"share statistics), got {type(value).__name__} {value!r}")
    if value < 1:
        raise BNPassError(f"{what} must be a positive int (the number of consecutive ranks that "
                          f"share statistics), got {value}; 1 means each rank's own statistics")
    return value


def _ranks_of(k: int, parent: dist.ProcessGroup, what: str) -> list[int]:
    """The global ranks of this rank's group of ``k`` consecutive ranks of ``parent``."""
    ranks = dist.get_process_group_ranks(parent)
    if len(ranks) % k:
        divisors = [d for d in range(1, len(ranks) + 1) if len(ranks) % d == 0]
        raise BNPassError(f"{what}={k} does not divide the world size {len(ranks)} of process group "
                          f"{parent.group_name}: its ranks are split into consecutive groups of "
                          f"{k}. Use one of {divisors}.")
    start = ranks.index(dist.get_rank()) // k * k
    return ranks[start : start + k]


def group_of_size(k: int, parent: dist.ProcessGroup, timeout_s: float) -> dist.ProcessGroup:
    """``options={"group_size": k}``: this rank's group of ``k`` consecutive ranks of ``parent``
    (``parent`` itself when ``k`` is its size), made by its members alone at the first compile that
    asks for it, and reused after (see the module docstring)."""
    what = "option group_size"
    ranks = _ranks_of(check_group_size(k, what), parent, what)
    if len(ranks) == dist.get_world_size(parent):
        return parent
    made = _reuse(parent, k)
    if made is not None:
        return made
    _refuse_bound_device(f"option group_size={k}", f"Call bnpass.create_syncbn_process_group({k}) on "
                         "every rank right after init_process_group: the option then uses the group it made.")
    _meet(ranks, parent, timeout_s, f"the process group of ranks {ranks} (group_size={k})",
          "agree_timeout_s")
    return _make([ranks], ranks, parent, k, timeout_s, local=True)


def group_of_node(parent: dist.ProcessGroup, timeout_s: float,
                  force_sync: bool = False) -> Optional[dist.ProcessGroup]:
    """``options={"group_size": "node"}``: the group of the ranks of ``parent`` on this rank's host
    (bnpass/nodes.py: every host must run as many), made by them alone at the first compile that
    asks for it and reused after; ``parent`` itself when all run on this host; None where this rank
    is alone on its host (its own statistics), unless ``force_sync`` (then a one-rank group)."""
    ranks = node_ranks(parent, timeout_s)
    if len(ranks) == dist.get_world_size(parent):
        return parent
    if len(ranks) == 1 and not force_sync:
        return None
    made = _reuse(parent, NODE)
    if made is not None:
        return made
    _refuse_bound_device("option group_size='node'", "Make one group per node yourself on every rank "
                         "right after init_process_group (torch.distributed.new_subgroups()) and pass "
                         "this rank's as process_group.")
    _meet(ranks, parent, timeout_s, f"the process group of ranks {ranks} (group_size='node')",
          "agree_timeout_s")
    return _make([ranks], ranks, parent, NODE, timeout_s, local=True)


def _refuse_bound_device(what: str, fix: str) -> None:
    device = dist.group.WORLD.bound_device_id
    if device is not None:
        raise BNPassError(
            f"{what}: the default process group is bound to {device} (init_process_group("
            f"device_id=...)), so torch makes a subgroup by splitting its communicator, which every "
            f"rank must join at the same point; bnpass cannot do that while compiling. {fix}")


def create_syncbn_process_group(group_size: int, timeout_s: float = 300.0) -> dist.ProcessGroup:
    """This rank's group of ``group_size`` consecutive ranks of the default group, as apex's
    function of the same name: pass it as ``options={"process_group": ...}``, or use
    ``options={"group_size": group_size}``, which then reuses it.

    Call it on every rank at the same point, e.g. right after ``init_process_group`` (as
    ``torch.distributed.new_subgroups``, which it resembles: every rank makes every group, so it
    also works where torch makes subgroups by splitting a device-bound NCCL communicator). The
    ranks wait for each other at most ``timeout_s`` seconds: a rank that does not come is a
    BNPassError naming it. ``group_size`` equal to the world size returns the default group; 1
    gives one-rank groups. A second call returns the same group.
    """
    what = "create_syncbn_process_group: group_size"
    check_group_size(group_size, what)
    if not (dist.is_available() and dist.is_initialized()):
        raise BNPassError("create_syncbn_process_group needs torch.distributed initialised; call "
                          "torch.distributed.init_process_group() first")
    parent = dist.group.WORLD
    ranks = _ranks_of(group_size, parent, what)
    everyone = dist.get_process_group_ranks(parent)
    if len(ranks) == len(everyone):
        return parent
    made = _reuse(parent, group_size)
    if made is not None:
        return made
    _meet(everyone, parent, timeout_s, f"the groups of {group_size} consecutive ranks", "timeout_s")
    chunks = [everyone[i : i + group_size] for i in range(0, len(everyone), group_size)]
    return _make(chunks, ranks, parent, group_size, timeout_s, local=False)


def _reuse(parent: dist.ProcessGroup, k: int | str) -> Optional[dist.ProcessGroup]:
    made = _MADE.get((parent.group_name, k))
    return made.group if made is not None and made.parent is parent and made.alive() else None


def _make(chunks: list[list[int]], ranks: list[int], parent: dist.ProcessGroup, k: int | str,
          timeout_s: float, local: bool) -> dist.ProcessGroup:
    """``new_group`` for each of ``chunks`` (``local``: only this rank's, by its members alone),
    with ``timeout_s`` for the rendezvous; this rank's group (``ranks``), kept for reuse."""
    try:
        groups = [dist.new_group(chunk, timeout=datetime.timedelta(seconds=timeout_s),
                                 use_local_synchronization=local, group_desc=f"bnpass_group_size_{k}")
                  for chunk in chunks]
    except Exception as e:  # noqa: BLE001 - explained, with the fix
        raise BNPassError(
            f"bnpass: making the process group of ranks {ranks} (group_size={k}) failed within "
            f"{timeout_s:g} s although all its ranks had come: {type(e).__name__}: {e}") from e
    group = groups[chunks.index(ranks)]
    parent_timeout = _timeout_of(parent)
    if parent_timeout is not None:
        dist.set_timeout(parent_timeout, group)  # its collectives: the parent's timeout, as before
    _MADE[(parent.group_name, k)] = _Made(parent, group, f"group_size={k}: ranks {ranks}")
    return group


def _meet(ranks: list[int], parent: dist.ProcessGroup, timeout_s: float, what: str,
          timeout_name: str) -> None:
    """Wait until every rank of ``ranks`` has come here having made as many process groups as this
    one (torch names a new group by that count), or raise naming the ones that did not."""
    if dist.get_backend(parent) == "fake":
        return  # `bnpass inspect`'s simulated world: this process is every rank
    store = dist.distributed_c10d._get_default_store()
    meet_to_make(store, dist.get_rank(), ranks, f"{parent.group_name}", dist.get_pg_count(), timeout_s,
                 what, timeout_name)


def meet_to_make(store, rank: int, ranks: list[int], parent: str, count: int, timeout_s: float,
                 what: str, timeout_name: str = "agree_timeout_s") -> None:
    """The meeting before making a group of ``ranks`` (of the group named ``parent``), through
    ``store`` as ``rank`` having made ``count`` process groups (``_meet``; the benchmark's and the
    tests' simulated ranks call it directly): about six store requests per rank, whatever the number
    of ranks; the ranks' meetings for the same ranks are numbered in the order each comes to them,
    so a group made again (after a destroy) meets afresh."""
    place = meet.next_meeting(store, f"{_PREFIX}/{parent}/{meet.ranks_key(ranks)}", rank)
    verdict = meet.meet(store, place, rank, str(count), ranks, timeout_s)
    if verdict.ok:
        return
    problems = []
    for theirs, came in verdict.groups():
        others = [r for r in came if r != rank]
        if theirs == str(count) or not others:
            continue
        for r in others[:3]:
            problems.append(
                f"rank {r} came having made {theirs} process group(s) before, this rank ({rank}) "
                f"{count}: torch would name the new group differently on each")
        if len(others) > 3:
            problems.append(f"so did ranks {meet.ranks_text(others[3:])}")
    if len(problems) > 0:
        problems[-1] += (". Make the same process groups on every rank before this one, e.g. call "
                         "bnpass.create_syncbn_process_group right after init_process_group")
    missing = [r for r in verdict.missing if r != rank]
    if missing:
        problems.append(
            f"{'rank' if len(missing) == 1 else 'ranks'} {meet.ranks_text(missing)} did not come within "
            f"{timeout_name}={timeout_s:g} s (dead, failed before compiling, slower by more than that, "
            f"or not running this code). Fix that rank, or raise {timeout_name} if it is only slow")
    if rank in verdict.missing:
        problems.append(f"rank {verdict.by} gave up waiting for this rank ({timeout_name}="
                        f"{timeout_s:g} s) before it came")
    raise BNPassError(f"bnpass: could not make {what} to share BatchNorm statistics; nothing was "
                      f"reduced. " + "; ".join(problems) + ".")


def _timeout_of(group: dist.ProcessGroup) -> Optional[datetime.timedelta]:
    """The collective timeout ``group`` was made with (``init_process_group(timeout=...)``)."""
    try:
        return max(group._get_backend(d).options._timeout for d in group._device_types)
    except Exception:  # noqa: BLE001 - a backend without these internals: keep new_group's
        return None


def describe(group_name: Optional[str]) -> str:
    """What a site's reason says about its group beyond its name and size: `` (group_size=2: ranks
    [2, 3])`` for a subgroup made here, `` (ranks [0, 1])`` for another group smaller than the
    world, "" for the world."""
    if group_name is None or not (dist.is_available() and dist.is_initialized()):
        return ""
    for made in _MADE.values():
        if made.group.group_name == group_name and made.alive():
            return f" ({made.description})"
    group = dist.distributed_c10d._resolve_process_group(group_name)
    ranks = dist.get_process_group_ranks(group)
    return f" (ranks {ranks})" if len(ranks) < dist.get_world_size() else ""

