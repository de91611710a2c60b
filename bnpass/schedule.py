"""Schedule: pack independent collectives into one, and overlap each with the compute around it.

Runs on each forward and backward graph that AOTAutograd hands to the lowering (ATen, functional:
nothing is mutated but the ``copy_`` of new running statistics into their inputs), before the
lowering sees it, under Inductor and ``bnpass_eager`` alike. Three steps, each optional
(``options={"pack_collectives": ..., "overlap": ...}``):

1. **Pack** (``pack_collectives``). A collective's *level* is the number of collectives on the
   longest path of the graph that leads to its payload (networkx, over the whole graph). Two
   collectives on the same level cannot depend on each other, so those of one level that reduce
   with the same group, op, dtype and device become one ``all_reduce`` of their concatenated
   payloads, and each former wait reads its slice: ResNet's downsample BN shares its block's first
   BN's collective in the forward and its second BN's in the backward; Inception's and HRNet's
   branches share one per level. Every rank runs this on the same graph and gets the same groups,
   and collectives keep the order of their levels: ranks never issue them in different orders.
2. **Split** (``overlap``). A ``convolution_backward`` that computes both the input's and the
   weight's gradient becomes two calls, one per gradient: the weight's gradient does not feed the
   BatchNorm backward before it, so it can run while that BatchNorm's collective is in flight.
3. **Order** (``overlap``). A stable topological re-sort of the graph that takes, of the nodes
   ready to run, first a collective, then the work a collective needs, then any other work (a
   convolution's weight gradient, running-statistics updates), and a wait only when nothing else
   can run; ties keep the graph's order. So each collective is issued as soon as its payload is
   ready, and waited for as late as possible. The collectives' own order is kept. Inductor runs
   kernels in this order once its peak-memory reordering, which would undo it, is off: the
   lowering turns it off in compiles with ``overlap`` (``inductor_config`` can turn it back on).

Only ``_c10d_functional.all_reduce`` nodes whose one user is their ``wait_tensor`` take part, of
any origin: a sum of a concatenation is the concatenation of the sums.
"""

from __future__ import annotations

import dataclasses
import heapq
import operator
from collections import defaultdict
from typing import Optional

import networkx as nx
import torch
import torch.fx as fx

__all__ = ["ScheduleReport", "schedule_collectives"]

aten = torch.ops.aten
_ALL_REDUCE = torch.ops._c10d_functional.all_reduce.default
_WAIT = torch.ops._c10d_functional.wait_tensor.default
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


def _levels(graph: fx.Graph, reductions: list[tuple[fx.Node, fx.Node]]) -> dict[fx.Node, int]:
    """all_reduce -> number of collectives on the longest path to its payload."""
    dag = nx.DiGraph()
    for node in graph.nodes:
        dag.add_node(node)
        dag.add_edges_from((inp, node) for inp in node.all_input_nodes)
    waits = {wait for _, wait in reductions}
    depth: dict[fx.Node, int] = {}
    for node in nx.topological_sort(dag):
        d = max((depth[p] for p in dag.predecessors(node)), default=0)
        depth[node] = d + 1 if node in waits else d
    return {ar: depth[ar] for ar, _ in reductions}


def _pack(gm: fx.GraphModule, report: ScheduleReport, fake_mode) -> None:
    graph = gm.graph
    reductions = _reductions(graph)
    if len(reductions) < 2:
        return
    levels = _levels(graph, reductions)
    groups: dict[tuple, list[tuple[fx.Node, fx.Node]]] = defaultdict(list)
    for ar, wait in reductions:
        payload = _val(ar.args[0])
        if payload.dim() != 1 or not isinstance(payload.shape[0], int):
            continue  # only flat payloads of a static size are packed
        groups[(levels[ar], ar.args[1], ar.args[2], payload.dtype, payload.device)].append((ar, wait))
    for (_, op, group_name, _, _), members in groups.items():
        if len(members) < 2:
            continue
        payloads = [ar.args[0] for ar, _ in members]
        last = members[-1][0]  # reductions come in graph order: every payload is defined before it
        with graph.inserting_before(last):
            cat = graph.call_function(aten.cat.default, (payloads,))
            ar = graph.call_function(_ALL_REDUCE, (cat, op, group_name))
            wait = graph.call_function(_WAIT, (ar,))
        with fake_mode:
            cat.meta["val"] = aten.cat.default([_val(p) for p in payloads])
            ar.meta["val"] = torch.empty_like(cat.meta["val"])
            wait.meta["val"] = torch.empty_like(cat.meta["val"])
        for new in (cat, ar, wait):
            new.meta.setdefault("stack_trace", last.meta.get("stack_trace"))
        offset = 0
        for old_ar, old_wait in members:
            size = _val(old_ar.args[0]).shape[0]
            with graph.inserting_after(wait):
                piece = graph.call_function(aten.slice.Tensor, (wait, 0, offset, offset + size))
            with fake_mode:
                piece.meta["val"] = aten.slice.Tensor(wait.meta["val"], 0, offset, offset + size)
            old_wait.replace_all_uses_with(piece)
            graph.erase_node(old_wait)
            graph.erase_node(old_ar)
            offset += size
        report.packed.append(len(members))


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


def _collective(node: fx.Node) -> bool:
    return node.op == "call_function" and str(node.target).startswith(_COLLECTIVE_PREFIX) \
        and node.target is not _WAIT


def _ancestors(targets: list[fx.Node]) -> set[fx.Node]:
    """Every node some node of ``targets`` depends on."""
    seen: set[fx.Node] = set()
    stack = [inp for t in targets for inp in t.all_input_nodes]
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return seen


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
    assert len(order) == len(nodes), "bnpass: the schedule found a cycle in the graph"
    return order


def _reorder(gm: fx.GraphModule, report: ScheduleReport, overlap: bool) -> None:
    """A stable topological re-sort (packing leaves the graph out of order). With ``overlap``,
    ready nodes are taken collectives first and waits last; either way the collectives keep the
    order a plain stable sort gives them, the same on every rank."""
    nodes = list(gm.graph.nodes)
    deps = {n: set(n.all_input_nodes) for n in nodes}
    feeds = _ancestors([n for n in nodes if _collective(n)])

    def kind(node: fx.Node, overlap: bool) -> int:
        if node.op == "placeholder":
            return 0
        if node.op == "output":
            return 5
        if not overlap:
            return 3
        if _collective(node):
            return 1
        if node.target is _WAIT:
            return 4
        return 2 if node in feeds else 3

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


def schedule_collectives(gm: fx.GraphModule, pack: bool = True, overlap: bool = True) -> ScheduleReport:
    """Pack, split and reorder ``gm`` in place (see the module doc); returns what was done."""
    report = ScheduleReport()
    report.collectives_before = report.collectives_after = len(_reductions(gm.graph))
    if not report.collectives_before or not (pack or overlap):
        return report  # nothing to schedule: the graph is left as it is
    fake_mode = _fake_mode(gm)
    if pack:
        _pack(gm, report, fake_mode)
    if overlap:
        _split_conv_backwards(gm, report, fake_mode)
    if report.packed or overlap:
        _reorder(gm, report, overlap)
    report.collectives_after = len(_reductions(gm.graph))
    gm.graph.lint()
    gm.recompile()
    return report
