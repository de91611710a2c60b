"""What the backend keeps for ``bnpass inspect`` besides the decisions: plain data, no graph objects.

* ``snapshot_sites`` / ``after_rewrite``: the few Dynamo-graph nodes around each site before and after
  the rewrite (the site's call, its inputs and its users), as text lines;
* ``digest``: the forward or backward graph AOTAutograd hands to Inductor, one small dict per node,
  with the site each node was traced from and its phase in that site's subgraph;
* ``kernel_info``: Inductor's generated source and, when provenance tracking is on
  (``torch._inductor.config.trace.provenance_tracking_level = 1``), which FX nodes each kernel
  call was generated from.

How a node of an AOTAutograd graph is attributed to a site: Dynamo stamps every node it traces with
``source_fn_stack`` (the Dynamo node's name last); AOTAutograd copies it to the nodes it traces from
that node (``fwd_source_fn_stack`` on backward nodes) and adds ``from_node``. A node belongs to site
K when one of those names is the name of K's BN call or of the node the rewrite put in its place.

Phases of a site's subgraph: in the forward graph ``stats`` (the nodes the site's reductions and
collectives depend on), ``all_reduce`` (the collective and its wait), ``normalize`` (the rest:
normalization, affine, running-statistics update); in the backward graph ``all_reduce`` and
``backward`` (including forward nodes the partitioner recomputes there, flagged ``recomputed``).
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx
from torch.fx.node import _get_qualified_name

from ..ops import synced_batch_norm
from ..sites import FOLD, FOLDABLE

__all__ = ["snapshot_sites", "after_rewrite", "digest", "kernel_info", "COLLECTIVES"]

_c10d = torch.ops._c10d_functional
COLLECTIVES = {
    _c10d.all_reduce.default, _c10d.all_reduce_.default, _c10d.wait_tensor.default,
    _c10d.all_gather_into_tensor.default, _c10d.reduce_scatter_tensor.default,
}
_aten = torch.ops.aten
_REDUCTIONS = {
    _aten.var_mean.correction, _aten.var_mean.dim, _aten.var.correction, _aten.sum.dim_IntList,
    _aten.sum.default, _aten.mean.dim, _aten.mean.default,
}
_MAX_ARG_CHARS = 60


# --- Dynamo graph: the neighbourhood of each site, before and after the rewrite -----------------

def _type_of(node: fx.Node) -> str:
    val = node.meta.get("example_value", node.meta.get("val"))
    if isinstance(val, torch.Tensor):
        dtype = str(val.dtype).replace("torch.", "")
        return f"{dtype}{list(val.shape)}"
    return ""


def _arg(a: Any) -> str:
    if isinstance(a, fx.Node):
        return a.name
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_arg(x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
    if isinstance(a, dict):
        return "{" + ", ".join(f"{k!r}: {_arg(v)}" for k, v in a.items()) + "}"
    text = repr(a)
    return text if len(text) <= _MAX_ARG_CHARS else text[: _MAX_ARG_CHARS - 3] + "..."


def _target(node: fx.Node) -> str:
    if node.op == "call_function":
        try:
            return _get_qualified_name(node.target)
        except Exception:  # noqa: BLE001 - an odd callable: its repr will do
            return str(node.target)
    return str(node.target)


def format_node(node: fx.Node) -> str:
    """``name: f32[8, 4] = torch.nn.functional.batch_norm(x, ...)``; one line per node."""
    args = [_arg(a) for a in node.args] + [f"{k}={_arg(v)}" for k, v in node.kwargs.items()]
    if node.op == "placeholder":
        call = "placeholder"
    elif node.op == "get_attr":
        call = f"get_attr {node.target}"
    elif node.op == "call_method":
        call = f"{args[0]}.{node.target}({', '.join(args[1:])})"
    elif node.op == "output":
        call = f"output({', '.join(args)})"
    else:
        call = f"{_target(node)}({', '.join(args)})"
    kind = _type_of(node)
    return f"{node.name}{': ' + kind if kind else ''} = {call}"


def _neighbourhood(centre: list[fx.Node], extra_inputs: Iterable[fx.Node], order: dict) -> list[str]:
    """The centre nodes (marked ``>``), their inputs and their users, in graph order."""
    near = set(centre)
    for node in centre:
        near.update(node.all_input_nodes)
        near.update(node.users)
    for node in extra_inputs:
        near.add(node)
        near.update(node.all_input_nodes)
    near = sorted((n for n in near if n in order), key=order.__getitem__)
    return [("> " if n in centre else "  ") + format_node(n) for n in near]


def snapshot_sites(gm: fx.GraphModule, sites) -> dict:
    """Before the rewrite: {site index: {"before": lines, "node": BN call name}} plus the node set."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    out = {}
    for site in sites:
        call = site.call
        centre = [call.node] + ([call.tag] if call.tag is not None else [])
        names = [call.node.name]
        stack = call.node.meta.get("source_fn_stack")
        if stack and stack[-1][0] not in names:  # Dynamo may name the node after a variable
            names.append(stack[-1][0])
        out[site.index] = {"names": names, "before": _neighbourhood(centre, (), order)}
    return {"sites": out, "nodes": set(order)}


def after_rewrite(gm: fx.GraphModule, sites, before: dict) -> tuple[dict, dict]:
    """(site_nodes, snapshots) after the rewrite.

    ``site_nodes``: {site index: names the site's nodes go by: the traced BN call's node name, its
    ``source_fn_stack`` name when Dynamo named the node otherwise, the name of the node now in its
    place};
    ``snapshots``: {site index: {"before": lines, "after": lines}}.
    A site whose call is gone from the graph was replaced; the rewrite inserts one new node per
    replaced site, in graph order, just before the call it replaces: the k-th new call node in
    graph order stands for the k-th replaced site.
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    old_nodes = before["nodes"]
    new_calls = [n for n in gm.graph.nodes
                 if n not in old_nodes and n.op == "call_function" and n.target is synced_batch_norm]
    replaced = [s for s in sites if s.call.node not in order and s.action != FOLD]
    replacement = dict(zip((s.index for s in replaced), new_calls))
    # A folded site's place is taken by the new call of its Conv/Linear (inserted after the old one).
    new_layers = [n for n in gm.graph.nodes
                  if n not in old_nodes and n.op == "call_function" and n.target in FOLDABLE]
    replacement.update(zip((s.index for s in sites if s.action == FOLD), new_layers))
    site_nodes, snapshots = {}, {}
    for site in sites:
        node = replacement.get(site.index, site.call.node if site.call.node in order else None)
        names = list(before["sites"][site.index]["names"])
        after: list[str] = []
        if node is not None:
            names += [node.name] if node.name not in names else []
            new_inputs, stack = [], [a for a in node.all_input_nodes if a not in old_nodes]
            while stack:  # the nodes the rewrite added to feed the new call (cumulative momentum)
                added = stack.pop()
                new_inputs.append(added)
                stack += [a for a in added.all_input_nodes if a not in old_nodes]
            after = _neighbourhood([node], new_inputs, order)
        site_nodes[site.index] = names
        snapshots[site.index] = {"before": before["sites"][site.index]["before"], "after": after}
    return site_nodes, snapshots


# --- AOTAutograd graphs: each node's site and phase -------------------------------------------

def _short(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        ns = target.namespace
        name = target._overloadpacket.__name__
        return name if ns == "aten" else f"{ns}.{name}"
    if node.op == "call_function":
        return getattr(target, "__name__", str(target))
    return node.op


def _site_of(node: fx.Node, by_name: dict) -> Optional[int]:
    meta = node.meta
    for key in ("source_fn_stack", "fwd_source_fn_stack"):
        stack = meta.get(key)
        if stack:
            site = by_name.get(stack[-1][0])
            if site is not None:
                return site
    sources = meta.get("from_node")
    if sources:
        return by_name.get(getattr(sources[0], "name", None))
    return None


def node_sites(gm: fx.GraphModule, site_nodes: dict) -> dict[str, int]:
    """{node name: site index} for the nodes of an AOTAutograd or post-grad graph traced from a site."""
    by_name = {name: index for index, names in site_nodes.items() for name in names}
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_function":
            site = _site_of(node, by_name)
            if site is not None:
                out[node.name] = site
    return out


def digest(gm: fx.GraphModule, site_nodes: dict, direction: str) -> list[dict]:
    """One dict per node: name, op, target, inputs, shape, site, phase, recomputed."""
    sites = node_sites(gm, site_nodes)
    nodes = list(gm.graph.nodes)
    phase: dict[str, str] = {}
    anchors: dict[int, list[fx.Node]] = {}
    for node in nodes:
        site = sites.get(node.name)
        if site is None:
            continue
        if node.target in COLLECTIVES:
            phase[node.name] = "all_reduce"
        elif direction == "backward":
            phase[node.name] = "backward"
        if node.target in COLLECTIVES or node.target in _REDUCTIONS:
            anchors.setdefault(site, []).append(node)
    if direction == "forward":
        for site, roots in anchors.items():
            stack, seen = list(roots), set()
            while stack:
                node = stack.pop()
                if node.name in seen or sites.get(node.name) != site:
                    continue
                seen.add(node.name)
                phase.setdefault(node.name, "stats")
                stack.extend(node.all_input_nodes)
        for name in sites:
            phase.setdefault(name, "normalize")
    out = []
    for node in nodes:
        inputs = [a.name for a in node.all_input_nodes]
        out.append({
            "name": node.name, "op": node.op, "target": _short(node), "inputs": inputs,
            "shape": _type_of(node), "site": sites.get(node.name), "phase": phase.get(node.name),
            "recomputed": direction == "backward" and node.meta.get("partitioner_tag") == "is_forward",
        })
    return out


# --- Inductor's output --------------------------------------------------------------------------

def kernel_info(compiled: Any) -> dict:
    """{"source": generated wrapper + kernels, "calls": {"kernel:handle": [origin FX node names]}}.

    ``calls`` is None unless Inductor's provenance tracking was on for the compile.
    """
    source = getattr(compiled, "source_code", None)
    calls = None
    mapping = getattr(compiled, "inductor_provenance_mapping_str", None)
    if mapping:
        try:
            calls = json.loads(mapping).get("cppCodeToPost")
        except (ValueError, AttributeError):
            calls = None
    return {"source": source, "calls": calls}
