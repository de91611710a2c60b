"""Ranks meet through the default group's store, with a deadline: no collective, never a hang.

Used where ranks must have reached the same point before they may communicate (``agree.py``: the
same collectives; ``groups.py``: making a subgroup). Key layout under a prefix: ``latest/<rank>``
holds what each rank last brought (for the caller's diagnosis when the meeting fails),
``<token>/<rank>`` that the rank came with that token, ``waiting/<rank>`` the token and ranks of
the meeting the rank is blocked in now (empty when it is not waiting).

A meeting that can no longer happen ends at once: when a rank this one waits for is itself
waiting, in this prefix, for a token this rank never posted, in a meeting this rank belongs to,
neither can ever go on (each waits for the other to post), so both are told within a poll interval
instead of at the deadline. The rank that sees it first leaves ``gave_up/<their token>/<rank>``,
so that the other learns it too when it looks only after the first has gone.
"""

from __future__ import annotations

import json
import time
from typing import Optional

import torch.distributed as dist

__all__ = ["post", "post_and_wait", "hold", "release", "Deadlock"]

_POLL_S = (0.002, 0.1)  # first and longest interval between two looks at the store


class Deadlock(Exception):
    """``rank`` waits, in a meeting that includes this rank, for a token this rank never posted."""

    def __init__(self, rank: int, token: str):
        super().__init__(f"rank {rank} waits for {token}")
        self.rank, self.token = rank, token


def _waiting_for(store, prefix: str, rank: int) -> Optional[dict]:
    key = f"{prefix}/waiting/{rank}"
    if not store.check([key]):
        return None
    text = store.get(key).decode()
    return json.loads(text) if text else None


def post(prefix: str, latest: str) -> None:
    """Say what this rank brought, without waiting for anyone (and that it waits for nobody)."""
    store = dist.distributed_c10d._get_default_store()
    rank = dist.get_rank()
    store.set(f"{prefix}/latest/{rank}", latest)
    store.set(f"{prefix}/waiting/{rank}", "")


def hold(prefix: str, token: str, latest: str, ranks: list[int]) -> None:
    """Say that this rank is stuck at ``token`` with ``ranks`` and will come to no other meeting of
    the prefix: a rank of ``ranks`` that waits for it in another meeting learns it within a poll
    interval (``Deadlock``) instead of at its deadline. Ended by this rank's next ``post`` or meeting."""
    store = dist.distributed_c10d._get_default_store()
    rank = dist.get_rank()
    store.set(f"{prefix}/latest/{rank}", latest)
    store.set(f"{prefix}/waiting/{rank}", json.dumps({"token": token, "ranks": list(ranks)}))


def release(prefix: str, latest: Optional[str]) -> None:
    """End a ``hold``: this rank waits for nobody, and ``latest`` (if given) is what it last brought."""
    store = dist.distributed_c10d._get_default_store()
    rank = dist.get_rank()
    if latest is not None:
        store.set(f"{prefix}/latest/{rank}", latest)
    store.set(f"{prefix}/waiting/{rank}", "")


def post_and_wait(prefix: str, token: str, latest: str, ranks: list[int], timeout_s: float) -> bool:
    """Post this rank's ``token`` (and ``latest``) under ``prefix``, then wait up to ``timeout_s``
    seconds for every rank of ``ranks`` to post the same token; whether they all did. Raises
    ``Deadlock`` naming a rank that waits for this one in another meeting of the prefix. A rank
    that does not meet takes its token back, so that no rank that comes later goes on alone."""
    store = dist.distributed_c10d._get_default_store()
    rank = dist.get_rank()
    mine = f"{prefix}/{token}/{rank}"
    store.set(f"{prefix}/latest/{rank}", latest)
    store.delete_key(f"{prefix}/gave_up/{token}/{rank}")  # it came after all
    store.set(mine, "1")
    keys = {r: f"{prefix}/{token}/{r}" for r in ranks}
    stop = time.monotonic() + timeout_s
    interval = _POLL_S[0]
    store.set(f"{prefix}/waiting/{rank}", json.dumps({"token": token, "ranks": list(ranks)}))
    try:
        while True:
            missing = [r for r, key in keys.items() if not store.check([key])]
            if not missing:
                return True
            for other in missing:
                theirs = _stuck_elsewhere(store, prefix, token, rank, other)
                if theirs is not None:
                    # Tell ``other`` (it may look only after this rank is gone): this rank gave up
                    # on its meeting.
                    store.set(f"{prefix}/gave_up/{theirs}/{rank}", token)
                    store.delete_key(mine)
                    raise Deadlock(other, theirs)
            if time.monotonic() >= stop:
                store.delete_key(mine)
                if all(store.check([key]) for r, key in keys.items() if r != rank):
                    store.set(mine, "1")  # they all came as it gave up: some may have gone on
                    return True
                return False
            time.sleep(min(interval, max(0.0, stop - time.monotonic())))
            interval = min(interval * 2, _POLL_S[1])
    finally:
        store.set(f"{prefix}/waiting/{rank}", "")


def _stuck_elsewhere(store, prefix: str, token: str, rank: int, other: int) -> Optional[str]:
    """The token of the meeting ``other`` is stuck in, which can never happen while this rank waits
    here, or None: ``other`` waits (in a meeting with this rank) for a token this rank never
    posted, or it gave up on this very meeting because this rank was stuck in that one."""
    gave_up = f"{prefix}/gave_up/{token}/{other}"
    if store.check([gave_up]):
        return store.get(gave_up).decode()
    theirs = _waiting_for(store, prefix, other)
    if (theirs is not None and theirs["token"] != token and rank in theirs["ranks"]
            and not store.check([f"{prefix}/{theirs['token']}/{rank}"])):
        return theirs["token"]
    return None
