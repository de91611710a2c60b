"""Rewrite: put ``bnpass.ops.synced_batch_norm`` in place of each synced site of a Dynamo graph.

Graph invariants (the Dynamo graph in, the Dynamo graph out):
* Only ``sync`` sites, and ``local`` sites with a cumulative momentum, are replaced; ``skip`` and
  the other ``local`` sites keep their ``F.batch_norm`` node exactly as traced.
* A ``fold`` site (eval mode) disappears: its Conv/Linear is called with weight * s and
  (bias - running_mean) * s + beta, s = gamma / sqrt(running_var + eps), computed in the graph from
  the current tensors (Inductor fuses or, with ``freezing``, constant-folds it); nothing is mutated.
* Every ``bnpass::bn_site`` tag is removed: no tag reaches AOTAutograd; so is every
  ``capture.batch_norm_any_local_batch`` call (one value per channel on this rank): a synced site's
  becomes the synced op, any other ``F.batch_norm``.
* Running statistics stay graph inputs that the replacement mutates in place, as ``F.batch_norm``
  does; AOTAutograd functionalizes that mutation like BN's own.
* ``num_batches_tracked.add_(1)`` is left where the module put it.
* With ``kernels`` other than "inductor" (backends/triton_bn_op.py), a sync site that runs on
  bnpass's Triton kernels gets ``kernels="triton"``; a ReLU that is the BN's only user is folded into
  it (its uses take the BN's output, the ReLU node is erased). The choice is appended to the site's
  reason. With the default "inductor" the graph is exactly as without the option.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from .capture import batch_norm_any_local_batch
from .ops import synced_batch_norm
from .sites import FOLD, LOCAL, SYNC, Site, bn_call, example_of, fold_producer

__all__ = ["rewrite_sites"]


def _cumulative_momentum(graph: fx.Graph, num_batches_tracked: fx.Node) -> fx.Node:
    """1 / num_batches_tracked as a 0-d float tensor, computed in the graph (no host sync)."""
    as_float = graph.call_method("to", (num_batches_tracked, torch.float32))
    return graph.call_function(torch.reciprocal, (as_float,))


_RELUS = (torch.relu, torch.relu_, F.relu)


def _relu_after(node: fx.Node):
    """The ReLU node that is ``node``'s only user, if there is one."""
    users = list(node.users)
    if len(users) != 1 or users[0].args[:1] != (node,):
        return None
    user = users[0]
    if (user.op == "call_function" and user.target in _RELUS) or (
            user.op == "call_method" and user.target in ("relu", "relu_")):
        return user
    return None


def _kernel_args(site: Site, kernels: str) -> tuple:
    """Extra arguments of ``synced_batch_norm`` for this site: () for Inductor's kernels."""
    if kernels == "inductor" or site.action != SYNC:
        return ()
    from bnpass.backends.triton_bn_op import resolve

    chosen, note = resolve(kernels, example_of(site.call.input), site.name)
    if note:
        site.reason = f"{site.reason}; {note}"
    return () if chosen == "inductor" else ("triton",)


def _fold(graph: fx.Graph, site: Site) -> None:
    """Replace ``bn(layer(x, w, b, *rest))`` by ``layer(x, w * s, b', *rest)`` (see the module doc)."""
    call = site.call
    layer, why_not = fold_producer(call)
    assert layer is not None, f"{site.name}: decided fold, but {why_not}"
    weight = layer.args[1]
    bias = layer.args[2] if len(layer.args) > 2 else layer.kwargs.get("bias")
    out_dims = example_of(weight).dim() - 1
    with graph.inserting_before(layer):
        scale = graph.call_function(torch.rsqrt, (graph.call_function(torch.add, (call.running_var, call.eps)),))
        if call.weight is not None:
            scale = graph.call_function(torch.mul, (scale, call.weight))
        shift = graph.call_function(torch.mul, (call.running_mean, scale))
        shift = graph.call_function(torch.neg, (shift,))
        if call.bias is not None:
            shift = graph.call_function(torch.add, (shift, call.bias))
        if bias is not None:
            shift = graph.call_function(torch.add, (graph.call_function(torch.mul, (bias, scale)), shift))
        w_scale = graph.call_method("reshape", (scale, (-1,) + (1,) * out_dims))
        new_weight = graph.call_function(torch.mul, (weight, w_scale))
        new_weight = graph.call_method("to", (new_weight, weight))  # the layer's own dtype
        new_bias = graph.call_method("to", (shift, weight))
    args = (layer.args[0], new_weight, new_bias) + tuple(layer.args[3:])
    kwargs = {k: v for k, v in layer.kwargs.items() if k != "bias"}
    with graph.inserting_after(layer):
        folded = graph.call_function(layer.target, args, kwargs)
    folded.meta.update(layer.meta)
    call.node.replace_all_uses_with(folded)
    graph.erase_node(call.node)
    if call.tag is not None:
        graph.erase_node(call.tag)
    graph.erase_node(layer)


def rewrite_sites(gm: fx.GraphModule, sites: list[Site], kernels: str = "inductor") -> int:
    """Rewrite ``gm`` (and the subgraphs holding sites) in place; returns the nodes replaced."""
    replaced = 0
    touched = {id(gm.graph): gm.graph}
    for site in sites:
        call = site.call = bn_call(site.call.node)  # re-read: an earlier rewrite may feed this one
        graph = call.node.graph  # gm's graph, or a subgraph's (a checkpointed region's body)
        touched[id(graph)] = graph
        if site.action == FOLD:
            _fold(graph, site)
            replaced += 1
            continue
        needs_rewrite = site.action == SYNC or (site.action == LOCAL and site.cumulative_momentum)
        if needs_rewrite:
            with graph.inserting_before(call.node):
                momentum = call.momentum
                if call.tag_num_batches_tracked is not None:
                    momentum = _cumulative_momentum(graph, call.tag_num_batches_tracked)
                extra = _kernel_args(site, kernels)
                relu = _relu_after(call.node) if extra else None
                new = graph.call_function(
                    synced_batch_norm,
                    (call.input, call.running_mean, call.running_var, call.weight, call.bias,
                     momentum, call.eps, site.group) + extra + ((True,) if relu is not None else ()),
                    {"site": site.index},
                )
            new.meta.update(call.node.meta)
            call.node.replace_all_uses_with(new)
            graph.erase_node(call.node)
            if relu is not None:
                relu.replace_all_uses_with(new)
                graph.erase_node(relu)
            replaced += 1
        elif call.node.target is batch_norm_any_local_batch:
            call.node.target = F.batch_norm  # not synced: one value per channel raises, as stock
        if call.tag is not None:
            call.tag.replace_all_uses_with(call.input)
            graph.erase_node(call.tag)
    for graph in touched.values():
        graph.lint()
        graph.owning_module.recompile()
    return replaced
