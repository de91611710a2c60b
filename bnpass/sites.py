"""Find: every BatchNorm call in a Dynamo graph, with the decision bnpass takes for it and why.

A site is a ``F.batch_norm`` / ``torch.batch_norm`` call node (built-in BN modules are inlined by
Dynamo, so module and functional BN look alike; ``nn.SyncBatchNorm`` and ``momentum=None`` arrive
tagged by ``bnpass::bn_site``, see capture.py). Actions:

* ``sync``  training-mode statistics, reduced over the process group;
* ``local`` training-mode statistics of this rank only (no group, or a group of one rank);
* ``fold``  eval mode on running statistics, the input a Conv or Linear output used only by this BN:
  the rewrite folds the BN into that layer's weight and bias (computed in the graph from the current
  parameters and buffers, so training can resume and nothing is modified in place);
* ``skip``  left exactly as traced (eval mode that cannot be folded, or not a shape bnpass handles).

The decisions are data (``Site``): the rewrite, the CLI and the tests all read them.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from .capture import EVAL_BATCH_STATS, batch_norm_any_local_batch
from .groups import describe

__all__ = ["Site", "BNCall", "find_sites", "collective_levels", "fold_producer", "FOLDABLE", "SYNC", "LOCAL",
           "SKIP", "FOLD"]

SYNC, LOCAL, SKIP, FOLD = "sync", "local", "skip", "fold"
# Layers a BN in eval mode folds into, with their weight's output-channel dimension (0).
FOLDABLE = {torch.conv1d: "conv1d", torch.conv2d: "conv2d", torch.conv3d: "conv3d",
             F.linear: "linear", torch._C._nn.linear: "linear"}

_SIGNATURES = {
    F.batch_norm: inspect.signature(F.batch_norm),
    torch.batch_norm: inspect.Signature(
        [
            inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
            for n in ("input", "weight", "bias", "running_mean", "running_var", "training",
                      "momentum", "eps", "cudnn_enabled")
        ]
    ),
}
_SIGNATURES[batch_norm_any_local_batch] = _SIGNATURES[F.batch_norm]  # capture.py: n = 1 per channel
_OP_NAMES = {F.batch_norm: "F.batch_norm", torch.batch_norm: "torch.batch_norm",
             batch_norm_any_local_batch: "F.batch_norm"}


@dataclasses.dataclass
class BNCall:
    """A BN call node's arguments under one naming, whatever the call's form."""

    node: fx.Node
    input: fx.Node
    running_mean: Any
    running_var: Any
    weight: Any
    bias: Any
    training: Any
    momentum: Any
    eps: Any
    tag: Optional[fx.Node]  # the bnpass::bn_site node in front of the input, if any

    @property
    def tag_num_batches_tracked(self) -> Optional[fx.Node]:
        return self.tag.args[1] if self.tag is not None else None

    @property
    def tag_group_name(self) -> Optional[str]:
        return self.tag.args[2] if self.tag is not None else None


@dataclasses.dataclass
class Site:
    """One BatchNorm site of one compiled graph and what bnpass does with it."""

    index: int
    name: str  # module path, or file:line of a functional call
    op: str  # "nn.BatchNorm2d", "nn.SyncBatchNorm", "F.batch_norm", ...
    channels: Optional[int]
    dtype: str
    layout: str  # contiguous | channels_last | channels_last_3d | strided
    action: str  # sync | local | skip
    reason: str
    group: Optional[str] = None  # process group name the statistics are reduced over
    world_size: int = 1
    cumulative_momentum: bool = False
    call: Optional[BNCall] = dataclasses.field(default=None, repr=False, compare=False)
    # A synced site's collective level per direction (see ``collective_levels``); None: no
    # collective in that direction, or not packable (a site inside a subgraph).
    levels: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def to_json(self) -> dict:
        out = dataclasses.asdict(dataclasses.replace(self, call=None))
        out.pop("call")
        out.pop("levels")
        return out


def _is_tag(node: Any) -> bool:
    return (
        isinstance(node, fx.Node)
        and node.op == "call_function"
        and node.target in (torch.ops.bnpass.bn_site.default, torch.ops.bnpass.bn_site)
    )


def bn_call(node: fx.Node) -> Optional[BNCall]:
    if node.op != "call_function" or node.target not in _SIGNATURES:
        return None
    bound = _SIGNATURES[node.target].bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    a = bound.arguments
    x = a["input"]
    tag = x if _is_tag(x) else None
    return BNCall(node, tag.args[0] if tag else x, a["running_mean"], a["running_var"], a["weight"],
                  a["bias"], a["training"], a["momentum"], a["eps"], tag)


def _module_of(node: fx.Node) -> tuple[str, Optional[type]]:
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, cls = list(stack.values())[-1]
        return _clean_path(path), cls if isinstance(cls, type) else None
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+)', trace)
    if frames:  # a functional call in the root module's forward: file:line
        path, line = frames[-1]
        return f"{path.rsplit('/', 1)[-1]}:{line}", None
    return node.name, None


def _clean_path(path: str) -> str:
    """``L['self'].layer1[0]._modules['bn1']`` -> ``layer1.0.bn1``."""
    path = re.sub(r"^L\['[^']*'\]\.?|^L__[a-z]+__\.?", "", path)
    path = re.sub(r"\._modules\['([^']*)'\]|\['([^']*)'\]|\[(\d+)\]",
                  lambda m: "." + next(g for g in m.groups() if g is not None), path)
    return path.lstrip(".") or "<root>"


def _layout(val: Optional[torch.Tensor]) -> str:
    if val is None:
        return "unknown"
    if val.dim() == 4 and val.is_contiguous(memory_format=torch.channels_last) and not val.is_contiguous():
        return "channels_last"
    if val.dim() == 5 and val.is_contiguous(memory_format=torch.channels_last_3d) and not val.is_contiguous():
        return "channels_last_3d"
    return "contiguous" if val.is_contiguous() else "strided"


def example_of(node: Any) -> Optional[torch.Tensor]:
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("example_value", node.meta.get("val"))
    return val if isinstance(val, torch.Tensor) else None


def fold_producer(call: BNCall) -> tuple[Optional[fx.Node], str]:
    """(the Conv/Linear node an eval-mode BN folds into, "") or (None, why it cannot be folded)."""
    producer = call.input
    if not (isinstance(producer, fx.Node) and producer.op == "call_function" and producer.target in FOLDABLE):
        return None, "its input is not the output of a Conv or Linear"
    layer = FOLDABLE[producer.target]
    if set(producer.users) != {call.tag if call.tag is not None else call.node}:
        return None, f"the {layer} output has other users than this BN"
    if producer.kwargs.keys() - {"bias", "stride", "padding", "dilation", "groups"} or len(producer.args) < 2:
        return None, f"the {layer} call passes its input or weight by keyword"
    if not all(isinstance(v, fx.Node) for v in (call.running_mean, call.running_var)):
        return None, "no running statistics"
    weight = example_of(producer.args[1])
    if weight is None or not weight.is_floating_point():
        return None, f"the {layer} weight is not a floating-point tensor"
    return producer, ""


def _decide(call: BNCall, group: Optional[str], world_size: int, force_sync: bool,
            why_local: str, fold_eval: bool = True) -> tuple[str, str, Optional[str], int]:
    """(action, reason, group, world size) for one call."""
    if not isinstance(call.training, bool):
        return SKIP, "the training flag is not a constant in the graph", None, 1
    if not call.training:
        producer, why_not = fold_producer(call)
        if producer is not None and fold_eval:
            return FOLD, f"eval mode: folded into the {FOLDABLE[producer.target]}'s weight and bias", None, 1
        why_not = why_not or "fold_eval=False"
        return SKIP, f"eval mode: normalizes with running statistics, nothing to reduce; not folded: " \
                     f"{why_not}", None, 1
    val = example_of(call.input)
    if val is not None and val.dim() < 2:
        return SKIP, f"input has {val.dim()} dims; BatchNorm needs (N, C, *)", None, 1
    if call.tag_group_name == EVAL_BATCH_STATS:
        return LOCAL, "eval mode without running statistics: this rank's batch statistics, as " \
                      "nn.SyncBatchNorm does", None, 1
    if call.tag is not None and call.tag_group_name is not None:
        group = call.tag_group_name  # an nn.SyncBatchNorm's own process group wins
        world_size = torch.distributed.get_world_size(
            torch.distributed.distributed_c10d._resolve_process_group(group))
    if group is not None and (world_size > 1 or force_sync):
        return SYNC, f"training mode: statistics over {world_size} rank(s) of group {group}" \
                     f"{describe(group)}", group, world_size
    if group is not None:
        why_local = "the process group has one rank (force_sync=False)"
    return LOCAL, f"training mode, {why_local}", None, 1


def _graph_modules(gm: fx.GraphModule) -> list[fx.GraphModule]:
    return [gm] + [m for _, m in gm.named_modules() if isinstance(m, fx.GraphModule) and m is not gm]


def find_sites(gm: fx.GraphModule, group: Optional[str], world_size: int, force_sync: bool,
               why_local: str, fold_eval: bool = True) -> list[Site]:
    """Every BN call in ``gm`` and its subgraphs (bodies of higher-order ops such as activation
    checkpointing's), in graph order, with its decision."""
    sites = []
    for node in (n for module in _graph_modules(gm) for n in module.graph.nodes):
        call = bn_call(node)
        if call is None:
            continue
        name, cls = _module_of(node)
        op = f"nn.{cls.__name__}" if cls is not None and cls.__module__.startswith("torch.nn") else (
            cls.__name__ if cls is not None and "BatchNorm" in cls.__name__ else _OP_NAMES[node.target])
        action, reason, site_group, site_ws = _decide(call, group, world_size, force_sync, why_local,
                                                      fold_eval)
        val = example_of(call.input)
        sites.append(Site(
            index=len(sites), name=name, op=op,
            channels=int(val.shape[1]) if val is not None and val.dim() >= 2 else None,
            dtype=str(val.dtype).replace("torch.", "") if val is not None else "unknown",
            layout=_layout(val), action=action, reason=reason, group=site_group,
            world_size=site_ws, cumulative_momentum=call.tag_num_batches_tracked is not None,
            call=call,
        ))
    return sites


def _mutates_first_arg(node: fx.Node) -> bool:
    """An in-place call (``x.add_(y)``, ``torch.relu_(x)``): it writes its first argument."""
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function":
        name = getattr(node.target, "__name__", "")
    else:
        return False
    return name.endswith("_") and not name.endswith("__") and bool(node.args) \
        and isinstance(node.args[0], fx.Node)


def _dependencies(graph: fx.Graph, sites: list[Site]) -> dict[fx.Node, set[fx.Node]]:
    """node -> the nodes it depends on: its inputs, and for a reader of a tensor that an earlier node
    wrote in place (an in-place op, a BN updating its running statistics), that writer."""
    writes: dict[fx.Node, list[fx.Node]] = {}
    for site in sites:
        for buf in (site.call.running_mean, site.call.running_var):
            if isinstance(buf, fx.Node):
                writes.setdefault(site.call.node, []).append(buf)
    last_writer: dict[fx.Node, fx.Node] = {}
    deps = {}
    for node in graph.nodes:
        inputs = set(node.all_input_nodes)
        deps[node] = inputs | {last_writer[i] for i in inputs if i in last_writer and last_writer[i] is not node}
        written = writes.get(node, []) + ([node.args[0]] if _mutates_first_arg(node) else [])
        for buf in written:
            last_writer[buf] = node
    return deps


def collective_levels(gm: fx.GraphModule, sites: list[Site]) -> None:
    """Set each synced site's ``levels``: {"forward": k, "backward": k or None}.

    A site's forward level is the number of synced sites on the longest path of the Dynamo graph to
    its input; its backward level, the number of synced sites with a backward collective on the
    longest path from its output (the gradient of its output waits for theirs). Sites of one level
    cannot depend on each other in that direction, so the schedule may pack their collectives into
    one. The levels are a function of the Dynamo graph, which every rank traces from the same code
    and agrees on, never of the ATen graph, whose structure follows this rank's shapes (an empty
    local batch turns reductions into constants and removes dependencies). A site inside a subgraph
    (a checkpointed region) gets None: its collectives are never packed.
    """
    synced = [s for s in sites if s.action == SYNC]
    graph = gm.graph
    root = [s for s in synced if s.call.node.graph is graph]
    for site in synced:
        site.levels = {"forward": None, "backward": None}
    if not root:
        return
    deps = _dependencies(graph, root)
    of_node = {s.call.node: s for s in root}
    forward: dict[fx.Node, int] = {}
    for node in graph.nodes:  # graph order is topological
        depth = max((forward[d] for d in deps[node]), default=0)
        site = of_node.get(node)
        if site is not None:
            site.levels["forward"] = depth
            depth += 1
        forward[node] = depth
    users: dict[fx.Node, list[fx.Node]] = {n: [] for n in graph.nodes}
    for node, inputs in deps.items():
        for inp in inputs:
            users[inp].append(node)
    backward: dict[fx.Node, int] = {}
    for node in reversed(graph.nodes):
        depth = max((backward[u] for u in users[node]), default=0)
        site = of_node.get(node)
        if site is not None:
            val = example_of(site.call.input)
            if val is None or val.requires_grad:  # a backward collective (see ops.py)
                site.levels["backward"] = depth
                depth += 1
        backward[node] = depth
