"""Schedule: pack independent collectives into one, and overlap each with the compute around it.

Runs on each forward and backward graph that AOTAutograd hands to the lowering (ATen, functional:
nothing is mutated but the ``copy_`` of new running statistics into their inputs), before the
lowering sees it, under Inductor and ``bnpass_eager`` alike. Three steps, each optional
(``options={"pack_collectives": ..., "overlap": ...}``):

1. **Pack** (``pack_collectives``). The synced op leaves one ``bnpass::site_all_reduce`` per site
   and direction in the graph (bnpass/ops.py), naming its site. Sites whose statistics cannot depend
   on each other share a *level* (bnpass/sites.py ``collective_levels``: the number of synced sites
   on the longest path to the site's input in the Dynamo graph, or, backward, from its output).
   The collectives of one level that reduce with the same group, dtype and device become one
   ``all_reduce`` of their concatenated payloads, and each site reads its slice: ResNet's
   downsample BN shares its block's first BN's collective in the forward and its second BN's in the
   backward; Inception's and HRNet's branches share one per level. The levels come from the Dynamo
   graph, never from this graph, whose structure follows this rank's shapes (on an empty rank,
   reductions over no elements are constants, and dependencies vanish): every rank packs alike
   (shared/FACTS.md "Shapes specialize per rank"). Without packing each site collective becomes its
   own all_reduce. Either way each new all_reduce carries ``meta["bnpass_sites"]``.
2. **Split** (``overlap``). A ``convolution_backward`` that computes both the input's and the
   weight's gradient becomes two calls, one per gradient: the weight's gradient does not feed the
   BatchNorm backward before it, so it can run while that BatchNorm's collective is in flight.
3. **Order** (``overlap``). A stable topological re-sort of the graph that takes, of the nodes
   ready to run, first a collective or fusable work that feeds none (running-statistics updates:
   they stay in the kernel of what they read), then the work a collective needs, then work that
   Inductor does not fuse and no collective needs (a convolution's weight gradient, a matmul),
   and a wait only when nothing else can run; ties keep the graph's order. So each collective is issued as soon as its payload is
   ready, and waited for as late as possible. The collectives' own order is kept. Inductor runs
   kernels in this order once its peak-memory reordering, which would undo it, is off: the
   lowering turns it off in compiles with ``overlap`` (``inductor_config`` can turn it back on).

Other ``_c10d_functional`` collectives in the graph (a user's own) are neither packed nor moved
relative to each other; ``collective_sequence`` lists every collective the graph issues, in order,
for the agreement between ranks (bnpass/agree.py).
"""

from __future__ import annotations

import dataclasses
import heapq
import operator
from collections import defaultdict
from typing import Optional

import torch
import torch.fx as fx

from . import ops  # noqa: F401 - registers bnpass::site_all_reduce

__all__ = ["ScheduleReport", "schedule_collectives", "collective_sequence", "save_site_collectives"]

aten = torch.ops.aten
_ALL_REDUCE = torch.ops._c10d_functional.all_reduce.default
_WAIT = torch.ops._c10d_functional.wait_tensor.default
_SITE_ALL_REDUCE = torch.ops.bnpass.site_all_reduce.default
_CHECKS = {aten._assert_async.msg, aten._assert_async.default}
_COLLECTIVE_PREFIX = "_c10d_functional."


@dataclasses.dataclass
class ScheduleReport:
    """What the schedule did to one graph."""

    collectives_before: int = 0  # all_reduce nodes as AOTAutograd traced them
    collectives_after: int = 0
    packed: list = dataclasses.field(default_factory=list)  # sizes of the packs of >= 2 collectives
    split_conv_backwards: int = 0
    reordered: bool = False


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def _fake_mode(gm: fx.GraphModule):
    from torch._guards import detect_fake_mode

    return detect_fake_mode([n.meta["val"] for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)])


def _reductions(graph: fx.Graph) -> list[tuple[fx.Node, fx.Node]]:
    """(all_reduce, its wait) pairs, in graph order."""
    pairs = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target is _ALL_REDUCE:
            users = list(node.users)
            if len(users) == 1 and users[0].target is _WAIT and isinstance(_val(node), torch.Tensor):
                pairs.append((node, users[0]))
    return pairs


def _site_collectives(graph: fx.Graph) -> list[fx.Node]:
    """The ``bnpass::site_all_reduce`` nodes (bnpass/ops.py), in graph order."""
    return [n for n in graph.nodes if n.op == "call_function" and n.target is _SITE_ALL_REDUCE]


def _pack_key(node: fx.Node, direction: str, levels: dict, pack: bool) -> Optional[tuple]:
    """What a site collective must share with others to be packed with them, or None (alone).
    Only the rank-independent site levels (bnpass/sites.py ``collective_levels``) decide it, with
    the group and the payload's dtype and device: the same keys on every rank, whatever its data."""
    payload, group_name, site, kind = node.args
    level = levels.get(site, {}).get(kind)
    val = _val(payload)
    if not pack or level is None or kind != direction or val.dim() != 1 or not isinstance(val.shape[0], int):
        return None  # a forward collective recomputed in the backward (checkpointing) stays alone
    return (kind, level, group_name, val.dtype, val.device)


def save_site_collectives(graph: fx.Graph) -> None:
    """On the joint graph, before AOTAutograd's partitioner: the output of every site collective is
    saved for the backward, never recomputed there (the partitioner would otherwise recompute the
    cheap-looking op, and with it the collective: another all_reduce per site and step; inside a
    checkpointed region too). It does the same for torch's own collectives."""
    from torch.utils.checkpoint import CheckpointPolicy

    for node in _site_collectives(graph):
        node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
    for node in _statistics_of(graph):
        node.meta["recompute"] = CheckpointPolicy.MUST_SAVE


def _statistics_of(graph: fx.Graph) -> list[fx.Node]:
    """The forward's per-channel statistics math after each forward site collective (bnpass/ops.py
    ``global_statistics``): the nodes of at most one dimension reached from it through such nodes,
    outside the backward. Saved rather than recomputed (a few C-sized tensors), the backward does
    not trace that math a second time (compile time: about 15 ops per site)."""
    tangents = _descendants([n for n in graph.nodes if n.op == "placeholder" and n.name.startswith("tangents")])
    small = []
    for start in (n for n in _site_collectives(graph) if n.args[3] == "forward"):
        small += _reachable([start], lambda n: [u for u in n.users if u not in tangents and _small(u)])
    return [n for n in dict.fromkeys(small) if n.op == "call_function"]


def _small(node: fx.Node) -> bool:
    val = _val(node)
    return node.op == "call_function" and isinstance(val, torch.Tensor) and val.dim() <= 1


def _lower_site_collectives(gm: fx.GraphModule, direction: str, levels: dict, pack: bool,
                            report: ScheduleReport, fake_mode) -> None:
    """Put ``_c10d_functional.all_reduce`` + ``wait_tensor`` in place of the site collectives: one
    per pack (the concatenated payloads of the sites of one pack key, each reading its slice), in
    the place of the pack's last member. Each new all_reduce's ``meta["bnpass_sites"]`` names the
    sites it serves."""
    graph = gm.graph
    packs: dict = defaultdict(list)
    for i, node in enumerate(_site_collectives(graph)):
        key = _pack_key(node, direction, levels, pack)
        packs[key if key is not None else ("alone", i)].append(node)
    for members in packs.values():
        last = members[-1]  # graph order: every member's payload is defined before it
        payloads = [m.args[0] for m in members]
        group_name = last.args[1]
        with graph.inserting_before(last):
            cat = graph.call_function(aten.cat.default, (payloads,)) if len(members) > 1 else payloads[0]
            ar = graph.call_function(_ALL_REDUCE, (cat, "sum", group_name))
            wait = graph.call_function(_WAIT, (ar,))
        with fake_mode:
            if len(members) > 1:
                cat.meta["val"] = aten.cat.default([_val(p) for p in payloads])
            ar.meta["val"] = torch.empty_like(cat.meta["val"])
            wait.meta["val"] = torch.empty_like(cat.meta["val"])
        for new in ((cat, ar, wait) if len(members) > 1 else (ar, wait)):
            new.meta.setdefault("stack_trace", last.meta.get("stack_trace"))
            for key in ("source_fn_stack", "fwd_source_fn_stack", "from_node", "partitioner_tag"):
                if key in last.meta:
                    new.meta.setdefault(key, last.meta[key])
        ar.meta["bnpass_sites"] = tuple(m.args[2] for m in members)
        ar.meta["bnpass_kind"] = last.args[3]
        if len(members) == 1:
            last.replace_all_uses_with(wait)
            graph.erase_node(last)
            continue
        offset = 0
        for member in members:
            size = _val(member.args[0]).shape[0]
            with graph.inserting_after(wait):
                piece = graph.call_function(aten.slice.Tensor, (wait, 0, offset, offset + size))
            with fake_mode:
                piece.meta["val"] = aten.slice.Tensor(wait.meta["val"], 0, offset, offset + size)
            member.replace_all_uses_with(piece)
            graph.erase_node(member)
            offset += size
        report.packed.append(len(members))


def collective_sequence(gm: fx.GraphModule) -> list[dict]:
    """The collectives ``gm`` issues, in the order it issues them: what the ranks must agree on."""
    out = []
    for node in gm.graph.nodes:
        if not _collective(node):
            continue
        val = _val(node.args[0]) if node.args else None
        out.append({
            "op": str(node.args[1]) if len(node.args) > 1 else str(node.target),
            "target": str(node.target),
            "numel": int(val.numel()) if isinstance(val, torch.Tensor) else None,
            "dtype": str(val.dtype).replace("torch.", "") if isinstance(val, torch.Tensor) else None,
            "group": node.args[2] if len(node.args) > 2 else None,
            "sites": list(node.meta.get("bnpass_sites", ())),
            "kind": node.meta.get("bnpass_kind"),
            "transport": node.meta.get("bnpass_transport", "process_group"),
        })
    return out


def _split_conv_backwards(gm: fx.GraphModule, report: ScheduleReport, fake_mode) -> None:
    """convolution_backward(..., [True, True, b]) -> one call for the input's gradient, one for the
    weight's (and the bias's)."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.convolution_backward.default:
            continue
        mask = list(node.args[10])
        if not (mask[0] and mask[1]) or any(u.target is not operator.getitem for u in node.users):
            continue
        calls = {}
        with graph.inserting_after(node):
            for which, new_mask in (("input", [True, False, False]), ("weight", [False, True, mask[2]])):
                calls[which] = graph.call_function(node.target, node.args[:10] + (new_mask,))
                calls[which].meta.update({k: v for k, v in node.meta.items() if k != "val"})
                with fake_mode:
                    calls[which].meta["val"] = node.target(*(_val(a) for a in node.args[:10]), new_mask)
        for user in list(node.users):
            user.replace_input_with(node, calls["input"] if user.args[1] == 0 else calls["weight"])
        graph.erase_node(node)
        report.split_conv_backwards += 1


# The work worth running while a collective is in flight: calls Inductor does not fuse. Fusable
# work that feeds no collective (running-statistics updates and their copy_ into the buffers,
# num_batches_tracked += 1) runs as soon as it is ready, beside the kernels it fuses with: between
# an all_reduce and its wait it would be a kernel of its own per collective (on the CPU every
# extern call, the all_reduce and the wait too, ends Inductor's C++ kernel; on CUDA one launch).
_OVERLAP_WORK = {aten.convolution_backward.default, aten.convolution.default, aten.mm.default,
                 aten.addmm.default, aten.bmm.default}


def _input_copy(node: fx.Node) -> bool:
    """``copy_(input, value)``: AOTAutograd's write-back of a mutated input (running statistics,
    num_batches_tracked), at the end of the traced graph."""
    return node.op == "call_function" and node.target is aten.copy_.default \
        and node.args[0].op == "placeholder"


def _collective(node: fx.Node) -> bool:
    return node.op == "call_function" and str(node.target).startswith(_COLLECTIVE_PREFIX) \
        and node.target is not _WAIT


def _reachable(starts: list[fx.Node], step) -> set[fx.Node]:
    """Every node reached from ``starts`` by ``step`` (a node's inputs, or its users), not ``starts``
    themselves unless reached again."""
    seen: set[fx.Node] = set()
    stack = [n for s in starts for n in step(s)]
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(step(node))
    return seen


def _ancestors(targets: list[fx.Node]) -> set[fx.Node]:
    """Every node some node of ``targets`` depends on."""
    return _reachable(targets, lambda n: n.all_input_nodes)


def _descendants(sources: list[fx.Node]) -> set[fx.Node]:
    """Every node that depends on some node of ``sources``."""
    return _reachable(sources, lambda n: list(n.users))


def _kahn(nodes: list[fx.Node], deps: dict, key) -> list[fx.Node]:
    """Topological order of ``nodes`` under ``deps``, taking the ready node of the smallest
    ``key(node)``, ties by position in ``nodes``."""
    users = defaultdict(list)
    for node, inputs in deps.items():
        for inp in inputs:
            users[inp].append(node)
    index = {n: i for i, n in enumerate(nodes)}
    pending = {n: len(d) for n, d in deps.items()}
    ready = [(key(n), index[n]) for n in nodes if pending[n] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        node = nodes[heapq.heappop(ready)[-1]]
        order.append(node)
        for user in users[node]:
            pending[user] -= 1
            if pending[user] == 0:
                heapq.heappush(ready, (key(user), index[user]))
    if len(order) != len(nodes):
        from .options import BNPassError

        raise BNPassError("bnpass: packing the collectives made a cycle in the graph (two BatchNorms "
                          "the Dynamo graph shows as independent depend on each other here, e.g. "
                          "through a view written in place); compile with "
                          "options={'pack_collectives': False} and report the model")
    return order


def _reorder(gm: fx.GraphModule, report: ScheduleReport, overlap: bool) -> None:
    """A stable topological re-sort (packing leaves the graph out of order). With ``overlap``,
    ready nodes are taken collectives first and waits last; either way the collectives keep the
    order a plain stable sort gives them: the graph's own order (every added dependency points to
    an earlier node), which is the traced order, the same on every rank."""
    nodes = list(gm.graph.nodes)
    deps = {n: set(n.all_input_nodes) for n in nodes}
    position = {n: i for i, n in enumerate(nodes)}
    for node in nodes:  # an input's copy_ comes after every earlier reader of the input's old value
        if _input_copy(node):
            deps[node] |= {u for u in node.args[0].users if position[u] < position[node]}
    feeds = _ancestors([n for n in nodes if _collective(n)])
    if overlap:
        # Fusable work that neither needs nor feeds a collective (num_batches_tracked += 1) keeps
        # its place after the node before it: taken as soon as it is ready, it would run first, or
        # alone between an all_reduce and its wait, a kernel of its own either way.
        downstream = _descendants([n for n in nodes if _collective(n)])
        previous = None
        for node in nodes:
            if (previous is not None and node.op == "call_function" and node not in feeds
                    and node not in downstream and node.target not in _OVERLAP_WORK
                    and not _input_copy(node)):
                deps[node].add(previous)
            if node.op != "placeholder":
                previous = node

    def kind(node: fx.Node, overlap: bool) -> int:
        if node.op == "placeholder":
            return 0
        if node.op == "output":
            return 5
        if not overlap:
            return 3
        if _collective(node) or node.target in _CHECKS:
            return 1  # a check of the global count raises before the next collective is issued
        if node.target is _WAIT:
            return 4
        if node in feeds:
            return 2
        # work that feeds no collective: a call Inductor does not fuse runs while one is in
        # flight; fusable work runs as soon as it is ready, in the kernel of what it reads
        return 3 if node.target in _OVERLAP_WORK else 1

    plain = _kahn(nodes, deps, lambda n: kind(n, False))
    collectives = [n for n in plain if _collective(n)]
    for before, after in zip(collectives, collectives[1:]):
        deps[after].add(before)
    order = _kahn(nodes, deps, lambda n: kind(n, True)) if overlap else plain
    if order == nodes:
        return
    output = nodes[-1]
    for node in order[:-1]:
        output.prepend(node)
    report.reordered = True


def schedule_collectives(gm: fx.GraphModule, direction: str = "forward", levels: Optional[dict] = None,
                         pack: bool = True, overlap: bool = True, split: bool = True) -> ScheduleReport:
    """Lower the site collectives (packed with ``pack``), split and reorder ``gm`` in place (see the
    module doc); returns what was done. ``direction``: "forward" or "backward", the graph's;
    ``levels``: {site index: {"forward": level, "backward": level}} (bnpass/sites.py).
    ``split=False`` keeps convolution backwards whole under ``overlap`` (the lowering decides it
    per device: backends/inductor.py)."""
    report = ScheduleReport()
    sites = _site_collectives(gm.graph)
    report.collectives_before = len(sites) + len(_reductions(gm.graph))
    report.collectives_after = report.collectives_before
    if not report.collectives_before:
        return report  # nothing to schedule: the graph is left as it is
    fake_mode = _fake_mode(gm)
    if sites:
        _lower_site_collectives(gm, direction, levels or {}, pack, report, fake_mode)
    if overlap and split:
        _split_conv_backwards(gm, report, fake_mode)
    if report.packed or overlap:
        _reorder(gm, report, overlap)
    report.collectives_after = len(_reductions(gm.graph))
    gm.graph.lint()
    gm.recompile()
    return report
