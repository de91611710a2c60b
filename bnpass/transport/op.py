"""``torch.ops.bnpass.shm_all_reduce(payload, reduce_op, group_name) -> Tensor``.

Functional and blocking: returns a new tensor holding the sum of ``payload`` over the ranks of the
group, through the group's shared-memory channel (channel.py), which the compile that put the op
into the graph set up. Inductor has no lowering for it and calls it as a fallback (extern) kernel;
``bnpass_eager`` runs it directly. It is marked as having side effects (it meets the other ranks),
so that no pass may CSE, DCE or duplicate it.
"""

from __future__ import annotations

import torch

from ..options import BNPassError
from .channel import _CHANNELS

__all__ = ["shm_all_reduce", "SHM_ALL_REDUCE"]

_LIB = torch.library.Library("bnpass", "FRAGMENT")
_LIB.define("shm_all_reduce(Tensor payload, str reduce_op, str group_name) -> Tensor")


def shm_all_reduce(payload: torch.Tensor, reduce_op: str, group_name: str) -> torch.Tensor:
    if reduce_op != "sum":
        raise BNPassError(f"bnpass: shm_all_reduce sums only, got reduce_op={reduce_op!r}")
    entry = _CHANNELS.get(group_name)
    if entry is None or entry[1] is None:
        raise BNPassError(f"bnpass: process group {group_name} has no shared-memory channel in this "
                          "process (it is set up by the compile that emits shm_all_reduce); compile "
                          "again, or pass options={'transport': 'process_group'}")
    return entry[1].all_reduce_sum(payload)


def _fake(payload: torch.Tensor, reduce_op: str, group_name: str) -> torch.Tensor:
    return payload.new_empty(payload.shape)


_LIB.impl("shm_all_reduce", shm_all_reduce, "CPU")
torch.library.register_fake("bnpass::shm_all_reduce", _fake, lib=_LIB)
SHM_ALL_REDUCE = torch.ops.bnpass.shm_all_reduce.default
torch.fx.node.has_side_effect(SHM_ALL_REDUCE)
