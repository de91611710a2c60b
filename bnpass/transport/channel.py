"""One shared-memory channel per process group whose ranks are all on this host.

Set up once per group, at the first compile that needs it, through the default store (no
collective), within ``agree_timeout_s``:

1. the group's ranks meet (bnpass/meet.py: a few store requests per rank, whatever their number),
   each bringing where it runs (host name, pid namespace) and whether it could build the C half;
   only the ranks of a group on one host then post their pids (a key each);
2. if all are on one host, the group's first rank creates a segment under a fresh name
   (``/dev/shm/bnpass-<creator pid>-<random>``) and posts the name; the others map it; each rank
   writes its pid into its control line and posts whether it mapped the segment;
3. the outcome is one store key written once (compare_set): "shm" when every rank mapped the
   segment and sees every pid in it, else why not; every rank follows that key, so all ranks of
   a group take the same transport. A rank that reaches the deadline writes "not shm" (a late rank
   then takes the process group as well, and the agreement names the missing rank);
4. the first rank unlinks the name: the segment lives on in the ranks' mappings and disappears with
   the last of them, also when processes crash or are killed. A segment whose creator died before
   unlinking it is removed by the next setup on this host.

``BNPASS_TRANSPORT_HOST`` replaces the host name in step 1 (tests simulate ranks on two hosts).
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from .. import meet
from ..nodes import host_name
from ..options import BNPassError
from . import native

__all__ = ["Channel", "channel_for", "CAPACITY", "why_not"]

CAPACITY = 1 << 20  # bytes per rank and buffer; a larger payload takes several rounds
_PREFIX = "bnpass/transport"
_DTYPES = {torch.float32: 0, torch.float64: 1}
_CHANNELS: dict[str, tuple[object, Optional["Channel"], str]] = {}  # group name -> (group, channel, why not)
_SETUPS: dict[str, int] = {}  # group name -> setups made in this process (keys of a re-made group)
_LOCK = threading.Lock()


def _host() -> dict:
    try:
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pidns = None
    return {"host": host_name(), "pidns": pidns}


def _spin_ns(world: int) -> int:
    """How long a waiting rank spins before it blocks: briefly when each rank has a core, not at
    all when the group's ranks outnumber this process's cores (they would spin on a peer's core)."""
    override = os.environ.get("BNPASS_SHM_SPIN_US")
    if override is not None:
        return int(float(override) * 1000)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 50_000 if world <= cores else 0


class Channel:
    """The mapped segment of one group: ``all_reduce_sum(t)`` over its ranks, in rank order, in one
    call, or in two: ``issue(t)`` (copy and publish) then ``wait(token)`` (wait for the peers, sum),
    with other work of the rank's between them. At most one round is open (issued, not waited) per
    channel: ``issue`` completes an open round first (its ``wait`` then returns the sum at once),
    which keeps the protocol's safety argument (shm.c) whatever order a graph puts the calls in."""

    def __init__(self, base: int, group_name: str, ranks: list[int], me: int, timeout_s: float,
                 pids: list[int]):
        self.base, self.group_name, self.ranks, self.me = base, group_name, ranks, me
        self.timeout_ns = int(timeout_s * 1e9)
        self.spin_ns = _spin_ns(len(ranks))
        self.pids = pids
        lib = native.library()
        self._call, self._issue, self._complete, self._now = (
            lib.bnshm_all_reduce, lib.bnshm_issue, lib.bnshm_complete, lib.bnshm_now_ns)
        self._seq = ctypes.c_uint32(0)
        self._who = ctypes.c_int(-1)
        self._theirs = ctypes.c_uint32(0)
        self._lock = threading.Lock()
        # the open round: (token's data_ptr, round, dtype code, src, out, deadline); and the sums of
        # rounds completed early, by token, until their wait collects them
        self._open: Optional[tuple] = None
        self._done: dict[int, torch.Tensor] = {}

    @staticmethod
    def _checked(payload: torch.Tensor) -> tuple[int, torch.Tensor]:
        dtype = _DTYPES.get(payload.dtype)
        if dtype is None or payload.device.type != "cpu":
            raise BNPassError(f"bnpass: the shared-memory transport sums float32/float64 CPU tensors, "
                              f"got {payload.dtype} on {payload.device}; use "
                              "options={'transport': 'process_group'}")
        return dtype, (payload if payload.is_contiguous() else payload.contiguous())

    def all_reduce_sum(self, payload: torch.Tensor) -> torch.Tensor:
        dtype, src = self._checked(payload)
        out = torch.empty_like(src)
        if src.numel() == 0:
            return out
        with self._lock:
            self._finish_open()
            rc = self._call(
                self.base, self.me, ctypes.byref(self._seq), dtype, src.data_ptr(), out.data_ptr(),
                src.numel(), self.spin_ns, self.timeout_ns, ctypes.byref(self._who))
        if rc:
            raise self._error(rc, self._who.value, src, self._seq.value)
        return out

    def issue(self, payload: torch.Tensor) -> torch.Tensor:
        """Publish this rank's ``payload`` for the next round; returns the token to ``wait`` on (a
        tensor shaped like the sum; its contents are not the sum). A payload larger than the
        segment's buffers (``CAPACITY``) is summed here, in several rounds, and its wait returns it."""
        dtype, src = self._checked(payload)
        token = torch.empty_like(src)
        if src.numel() == 0:  # nothing to sum (and no data_ptr to key the round by): wait makes it
            return token
        if src.numel() * src.element_size() > CAPACITY:
            self._done[token.data_ptr()] = self.all_reduce_sum(src)
            return token
        with self._lock:
            self._finish_open()
            s = (self._seq.value + 1) & 0xFFFFFFFF
            rc = self._issue(self.base, self.me, s, dtype, src.data_ptr(), src.numel())
            if rc:
                raise self._error(rc, -1, src, 0)
            self._open = (token.data_ptr(), s, dtype, src, torch.empty_like(src),
                          self._now() + self.timeout_ns)
        return token

    def wait(self, token: torch.Tensor) -> torch.Tensor:
        """The sum of the round ``token`` was issued for."""
        if token.numel() == 0:
            return torch.empty_like(token)
        key = token.data_ptr()
        with self._lock:
            if self._open is not None and self._open[0] == key:
                self._finish_open()
            done = self._done.pop(key, None)
        if done is None:
            raise BNPassError(f"bnpass: shm_wait on process group {self.group_name} was given a token "
                              "that no shm_issue of this process returned (or that was waited on "
                              "already); report it with the model")
        return done

    def _finish_open(self) -> None:
        """Complete the open round, if any, keeping its sum for its wait (the lock is held)."""
        if self._open is None:
            return
        key, s, dtype, src, out, deadline = self._open
        self._open = None
        rc = self._complete(self.base, self.me, s, dtype, out.data_ptr(), src.numel(), self.spin_ns,
                            deadline, ctypes.byref(self._who), ctypes.byref(self._theirs))
        if rc:
            raise self._error(rc, self._who.value, src, self._theirs.value)
        self._seq.value = s
        self._done[key] = out

    def _error(self, rc: int, who: int, src: torch.Tensor, theirs: int) -> BNPassError:
        peer = f"rank {self.ranks[who]} (pid {self.pids[who]})" if 0 <= who < len(self.ranks) else "a rank"
        where = (f"in an all_reduce of process group {self.group_name} (ranks {self.ranks}) through "
                 f"shared memory, this rank ({self.ranks[self.me]})")
        if rc == 2:
            return BNPassError(f"bnpass: {peer} died or exited: {where} waited for it in vain. Every "
                               "rank must run to the same step; see that rank's own error or exit "
                               "status.")
        if rc == 1:
            return BNPassError(f"bnpass: {peer} did not reach the same collective within the group's "
                               f"timeout ({self.timeout_ns / 1e9:g} s): {where} waited for it. Every "
                               "rank must run the same steps of the same compiled model (a rank "
                               "that hangs, or runs other code).")
        if rc == 4:
            names = {v: k for k, v in _DTYPES.items()}
            return BNPassError(
                f"bnpass: {peer} reduces {theirs // 4} {names.get(theirs % 4)} value(s) where this "
                f"rank reduces {src.numel()} {src.dtype}: {where} met a different collective. The "
                "ranks compiled different collectives (other BatchNorms, or other packing: "
                "options={'pack_collectives': False} if a rank's batch is empty); nothing was summed.")
        return BNPassError(f"bnpass: the shared-memory all_reduce refused its arguments ({where})")


def why_not(group_name: str) -> str:
    """Why a group set up here has no channel ("" when it has one, or was not set up)."""
    entry = _CHANNELS.get(group_name)
    return entry[2] if entry else ""


def channel_for(group_name: str, timeout_s: float) -> Optional[Channel]:
    """The group's channel, set up now if this is the first time (every rank of the group must
    call this at the same point: its first compile with a collective on the group); None where the
    group's ranks are not all on this host or shared memory cannot be used (``why_not``)."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    group = _resolve_process_group(group_name)
    with _LOCK:
        entry = _CHANNELS.get(group_name)
        if entry is not None and entry[0] is group:
            return entry[1]
        channel, why = _setup(group, group_name, timeout_s)
        _CHANNELS[group_name] = (group, channel, why)
        return channel


def _group_timeout_s(group) -> float:
    from ..groups import _timeout_of

    timeout = _timeout_of(group)
    return timeout.total_seconds() if timeout is not None else 1800.0


def _setup(group, group_name: str, timeout_s: float) -> tuple[Optional[Channel], str]:
    ranks = dist.get_process_group_ranks(group)
    me = ranks.index(dist.get_rank())
    epoch = _SETUPS[group_name] = _SETUPS.get(group_name, 0) + 1
    meeting = _Meeting(f"{_PREFIX}/{group_name}/{epoch}", ranks, me, timeout_s)
    lib = native.library()
    why = _where(meeting)
    if why:
        return None, meeting.decide(why)
    pids = meeting.gather("pid", os.getpid())  # the ranks of one host (few): a key each
    if pids is None:
        return None, meeting.decision
    world = len(ranks)
    base, status, name = None, "ok", None
    if me == 0:
        _sweep_stale()
        name = f"/bnpass-{os.getpid()}-{secrets.token_hex(6)}"
        base = lib.bnshm_create(name.encode(), world, CAPACITY)
        if not base:
            status = f"creating {name} failed: {os.strerror(ctypes.get_errno())}"
    names = meeting.gather("name", name if base else "", only=[0])
    if names is not None and me != 0:
        name = names[0]
        base = lib.bnshm_open(name.encode(), world, CAPACITY) if name else None
        if not base:
            status = f"mapping {name} failed: {os.strerror(ctypes.get_errno())}" if name else \
                "the first rank could not create the segment"
    if base:
        lib.bnshm_set_pid(base, me, os.getpid())
    statuses = meeting.gather("mapped", status) if names is not None else None
    decision = meeting.decision
    if statuses is not None:
        bad = [f"rank {r}: {s}" for r, s in zip(ranks, statuses) if s != "ok"]
        seen = [lib.bnshm_pid(base, r) for r in range(world)] if base else pids
        if not bad and seen != pids:  # the same name, another segment: no shared /dev/shm after all
            bad = [f"the ranks' pids in the segment are {seen}, posted {pids}"]
        decision = meeting.decide("shared memory failed: " + "; ".join(bad) if bad else _SHM)
    if me == 0 and name:
        lib.bnshm_unlink(name.encode())  # every rank mapped it, or none will use it
    if decision != _SHM:
        if base:
            lib.bnshm_unmap(base, world, CAPACITY)
        return None, decision
    return Channel(base, group_name, ranks, me, _group_timeout_s(group), pids), ""


_SHM = "shm"


def _where(meeting: "_Meeting") -> str:
    """Step 1: the ranks meet (bnpass/meet.py: a few store requests each, whatever their number),
    each bringing where it runs and whether it could build the C half; why not shared memory ("":
    all on this host, in one pid namespace, each with the C half)."""
    host = _host()
    mine = json.dumps([host["host"], host["pidns"], native.unavailable_reason()])
    verdict = meet.meet(meeting.store, f"{meeting.prefix}/where", meeting.ranks[meeting.me], mine,
                        meeting.ranks, max(meeting.deadline - time.monotonic(), 0.0))
    if verdict.missing:
        return (f"rank(s) {meet.ranks_text(verdict.missing)} did not come within agree_timeout_s="
                f"{meeting.timeout_s:g} s to set up shared memory")
    wheres = {tuple(json.loads(t)): ranks for t, ranks in verdict.tokens.items()}
    hosts = sorted({w[0] for w in wheres})
    if len(hosts) > 1:
        more = f" and {len(hosts) - 4} more" if len(hosts) > 4 else ""
        return f"its ranks run on {len(hosts)} hosts ({', '.join(hosts[:4])}{more})"
    if len({w[1] for w in wheres}) > 1:
        return "its ranks run in different pid namespaces (containers)"
    return "; ".join(f"rank(s) {meet.ranks_text(ranks)}: {w[2]}" for w, ranks in wheres.items() if w[2])


class _Meeting:
    """The group's ranks exchange values through the default store under ``prefix``, with one
    deadline for the whole setup. ``decision`` (the store's ``prefix/decision``, written once by
    compare_set) is the outcome every rank follows: "shm", or why not. A rank that reaches the
    deadline decides "not shm", so that a late rank takes the process group as well instead of
    mapping a segment nobody else uses; a later compile and the agreement (bnpass/agree.py) then
    say which rank is missing."""

    def __init__(self, prefix: str, ranks: list[int], me: int, timeout_s: float):
        self.prefix, self.ranks, self.me, self.timeout_s = prefix, ranks, me, timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.store = dist.distributed_c10d._get_default_store()
        self.key = f"{prefix}/decision"
        self.decision = ""

    def decide(self, proposal: str) -> str:
        self.decision = self.store.compare_set(self.key, "", proposal).decode()
        return self.decision

    def gather(self, step: str, value, only: Optional[list[int]] = None) -> Optional[list]:
        """Post ``value`` (unless ``only`` names the group ranks that post) and wait for the posts of
        ``only`` (default: every rank); their values, or None once a decision was taken."""
        posters = only if only is not None else range(len(self.ranks))
        if self.me in posters:
            self.store.set(f"{self.prefix}/{step}/{self.me}", json.dumps(value))
        keys = [f"{self.prefix}/{step}/{r}" for r in posters]
        delay = 0.001
        while not self.store.check(keys):
            if self.store.check([self.key]):
                self.decision = self.store.get(self.key).decode()
                return None
            if time.monotonic() > self.deadline:
                missing = [self.ranks[r] for r, k in zip(posters, keys) if not self.store.check([k])]
                self.decide(f"rank(s) {missing} did not come within agree_timeout_s="
                            f"{self.timeout_s:g} s to set up shared memory")
                return None
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        if self.store.check([self.key]):  # decided meanwhile (a peer's deadline)
            self.decision = self.store.get(self.key).decode()
            return None
        return [json.loads(self.store.get(k)) for k in keys]


def _sweep_stale() -> None:
    """Remove segments left by a creator that died between creating and unlinking one."""
    lib = native.library()
    for path in Path("/dev/shm").glob("bnpass-*-*"):
        try:
            pid = int(path.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and lib.bnshm_gone(pid):
            lib.bnshm_unlink(f"/{path.name}".encode())
