"""Put ``bnpass.shm_issue`` / ``shm_wait`` in place of the process-group all_reduces that can use them.

Runs on each forward and backward graph AOTAutograd hands to the lowering, after the schedule
(bnpass/schedule.py: packing and order are decided on the process-group collectives; this pass
only swaps the transport of each, in place, so both lowerings and every rank see the same
sequence). An ``_c10d_functional.all_reduce`` + ``wait_tensor`` pair becomes ``shm_issue`` where
the all_reduce stood (its payload is ready there) and ``shm_wait`` where the wait stood (the
schedule's window between them: work that the rank does while its peers arrive) when

* ``options.transport`` is ``"auto"``,
* it sums a float32 or float64 CPU tensor,
* its group is a real one (not the fake group of ``bnpass inspect``) whose ranks are all on this
  host and have mapped a shared segment (channel.py; set up here at the first compile that needs
  it).

The issue node keeps the all_reduce node's ``meta`` (e.g. ``bnpass_sites``) with
``meta["bnpass_transport"] = "shm"``; every all_reduce left in place gets ``"process_group"``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.fx as fx

from .channel import channel_for
from .op import SHM_ALL_REDUCE, SHM_ISSUE, SHM_WAIT

__all__ = ["apply_transport", "mark_transports", "takes_shm", "SHM", "PROCESS_GROUP"]

SHM, PROCESS_GROUP = "shm", "process_group"
# Two halves (shm_issue ... shm_wait) or one blocking shm_all_reduce where the all_reduce stood:
# the latter only for benchmarks/cpu_variants.py's "bnpass-blocking", to measure what the halves win.
HALVES = True
_ALL_REDUCE = torch.ops._c10d_functional.all_reduce.default
_WAIT = torch.ops._c10d_functional.wait_tensor.default


def _qualifies(node: fx.Node) -> bool:
    users = list(node.users)
    val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    return (len(users) == 1 and users[0].target is _WAIT and node.args[1] == "sum"
            and isinstance(val, torch.Tensor) and val.device.type == "cpu"
            and val.dtype in (torch.float32, torch.float64))


def _has_channel(group_name: str, timeout_s: float) -> bool:
    from torch.distributed.distributed_c10d import _resolve_process_group

    if not (dist.is_available() and dist.is_initialized()):
        return False
    if dist.get_backend(_resolve_process_group(group_name)) == "fake":
        return False
    return channel_for(group_name, timeout_s) is not None


def takes_shm(group_name: str, options) -> bool:
    """Whether a float32/float64 CPU all_reduce over ``group_name`` takes shared memory under
    ``options`` (sets the group's channel up at its first call, as ``apply_transport`` would)."""
    return options.transport == "auto" and _has_channel(group_name, options.agree_timeout_s)


def apply_transport(gm: fx.GraphModule, options) -> list[str]:
    """Swap the qualifying all_reduces of ``gm`` for ``shm_issue`` + ``shm_wait``, in place; the transport of
    each collective of the graph, in graph order."""
    transports, changed = [], False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not _ALL_REDUCE:
            continue
        group_name = node.args[2]
        if not _qualifies(node) or not takes_shm(group_name, options):
            node.meta["bnpass_transport"] = PROCESS_GROUP
            transports.append(PROCESS_GROUP)
            continue
        (wait,) = node.users
        if HALVES:
            with gm.graph.inserting_before(node):
                issue = gm.graph.call_function(SHM_ISSUE, (node.args[0], "sum", group_name))
            with gm.graph.inserting_before(wait):
                done = gm.graph.call_function(SHM_WAIT, (issue, group_name))
        else:
            with gm.graph.inserting_before(node):
                issue = done = gm.graph.call_function(SHM_ALL_REDUCE, (node.args[0], "sum", group_name))
        issue.meta.update(node.meta)
        issue.meta["bnpass_transport"] = SHM
        if done is not issue:
            done.meta.update(wait.meta)
        done.meta["val"] = wait.meta.get("val", node.meta.get("val"))
        wait.replace_all_uses_with(done)
        gm.graph.erase_node(wait)
        gm.graph.erase_node(node)
        transports.append(SHM)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return transports


def mark_transports(sequence: list[dict], transports: list[str]) -> None:
    """Fill the ``"transport"`` of the all_reduce entries of a graph's collective sequence
    (schedule.collective_sequence, taken before ``apply_transport``, in graph order) with what
    ``apply_transport`` returned for them, in the same order."""
    entries = [e for e in sequence if e.get("target") == str(_ALL_REDUCE)]
    assert len(entries) == len(transports), (sequence, transports)
    for entry, transport in zip(entries, transports):
        entry["transport"] = transport
