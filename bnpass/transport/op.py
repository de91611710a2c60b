"""The same-host transport's ops, on the group's shared-memory channel (channel.py), which the
compile that put them into the graph set up:

* ``torch.ops.bnpass.shm_issue(payload, reduce_op, group_name) -> Tensor``: publishes this rank's
  ``payload`` (copied: it may be freed at once) and returns a token shaped like the sum;
* ``torch.ops.bnpass.shm_wait(token, group_name) -> Tensor``: a new tensor holding the sum of the
  issued payloads over the ranks of the group. The compiled graphs use this pair, the issue where
  the process group's all_reduce stood and the wait where its wait stood, so that the work bnpass's
  schedule put in between (convolution weight gradients) runs while the peers arrive;
* ``torch.ops.bnpass.shm_all_reduce(payload, reduce_op, group_name) -> Tensor``: both in one call
  (bnpass.Joinable's stand-in answers, benchmarks).

Functional: Inductor has no lowering for them and calls them as fallback (extern) kernels;
``bnpass_eager`` runs them directly. They are marked as having side effects (they meet the other
ranks), so that no pass may CSE, DCE or duplicate them.
"""

from __future__ import annotations

import torch

from ..options import BNPassError
from .channel import _CHANNELS

__all__ = ["shm_all_reduce", "SHM_ALL_REDUCE", "SHM_ISSUE", "SHM_WAIT"]

_LIB = torch.library.Library("bnpass", "FRAGMENT")
_LIB.define("shm_all_reduce(Tensor payload, str reduce_op, str group_name) -> Tensor")
_LIB.define("shm_issue(Tensor payload, str reduce_op, str group_name) -> Tensor")
_LIB.define("shm_wait(Tensor token, str group_name) -> Tensor")


def _channel(group_name: str, op: str):
    entry = _CHANNELS.get(group_name)
    if entry is None or entry[1] is None:
        raise BNPassError(f"bnpass: process group {group_name} has no shared-memory channel in this "
                          f"process (it is set up by the compile that emits {op}); compile again, or "
                          "pass options={'transport': 'process_group'}")
    return entry[1]


def _sums_only(op: str, reduce_op: str) -> None:
    if reduce_op != "sum":
        raise BNPassError(f"bnpass: {op} sums only, got reduce_op={reduce_op!r}")


def shm_all_reduce(payload: torch.Tensor, reduce_op: str, group_name: str) -> torch.Tensor:
    _sums_only("shm_all_reduce", reduce_op)
    return _channel(group_name, "shm_all_reduce").all_reduce_sum(payload)


def shm_issue(payload: torch.Tensor, reduce_op: str, group_name: str) -> torch.Tensor:
    _sums_only("shm_issue", reduce_op)
    return _channel(group_name, "shm_issue").issue(payload)


def shm_wait(token: torch.Tensor, group_name: str) -> torch.Tensor:
    return _channel(group_name, "shm_wait").wait(token)


def _fake(payload: torch.Tensor, *args) -> torch.Tensor:
    return payload.new_empty(payload.shape)


for _name, _kernel in (("shm_all_reduce", shm_all_reduce), ("shm_issue", shm_issue), ("shm_wait", shm_wait)):
    _LIB.impl(_name, _kernel, "CPU")
    torch.library.register_fake(f"bnpass::{_name}", _fake, lib=_LIB)
SHM_ALL_REDUCE = torch.ops.bnpass.shm_all_reduce.default
SHM_ISSUE = torch.ops.bnpass.shm_issue.default
SHM_WAIT = torch.ops.bnpass.shm_wait.default
for _op in (SHM_ALL_REDUCE, SHM_ISSUE, SHM_WAIT):
    torch.fx.node.has_side_effect(_op)
