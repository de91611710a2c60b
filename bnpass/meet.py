"""Ranks meet through the default group's store, with a deadline: no collective, never a hang.

Used where ranks must have reached the same point before they may communicate (``agree.py``: the
same synced sites; ``groups.py``: making a subgroup). Key layout under a prefix: ``latest/<rank>``
holds what each rank last brought (for the caller's diagnosis when the meeting fails),
``<token>/<rank>`` that the rank came with that token.
"""

from __future__ import annotations

import datetime

import torch.distributed as dist

__all__ = ["post_and_wait"]


def post_and_wait(prefix: str, token: str, latest: str, ranks: list[int], timeout_s: float) -> bool:
    """Post this rank's ``token`` (and ``latest``) under ``prefix``, then wait up to ``timeout_s``
    seconds for every rank of ``ranks`` to post the same token; whether they all did."""
    store = dist.distributed_c10d._get_default_store()
    rank = dist.get_rank()
    store.set(f"{prefix}/latest/{rank}", latest)
    store.set(f"{prefix}/{token}/{rank}", "1")
    keys = [f"{prefix}/{token}/{r}" for r in ranks]
    try:
        store.wait(keys, datetime.timedelta(seconds=timeout_s))
        return True
    except Exception:  # noqa: BLE001 - a store timeout: the caller explains who is missing
        return store.check(keys)
