"""Rewrite: put ``bnpass.ops.synced_batch_norm`` in place of each synced site of a Dynamo graph.

Graph invariants (the Dynamo graph in, the Dynamo graph out):
* Only ``sync`` sites, and ``local`` sites with a cumulative momentum, are replaced; ``skip`` and
  the other ``local`` sites keep their ``F.batch_norm`` node exactly as traced.
* Every ``bnpass::bn_site`` tag is removed: no tag reaches AOTAutograd.
* Running statistics stay graph inputs that the replacement mutates in place, as ``F.batch_norm``
  does; AOTAutograd functionalizes that mutation like BN's own.
* ``num_batches_tracked.add_(1)`` is left where the module put it.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .ops import synced_batch_norm
from .sites import LOCAL, SYNC, Site, bn_call

__all__ = ["rewrite_sites"]


def _cumulative_momentum(graph: fx.Graph, num_batches_tracked: fx.Node) -> fx.Node:
    """1 / num_batches_tracked as a 0-d float tensor, computed in the graph (no host sync)."""
    as_float = graph.call_method("to", (num_batches_tracked, torch.float32))
    return graph.call_function(torch.reciprocal, (as_float,))


def rewrite_sites(gm: fx.GraphModule, sites: list[Site]) -> int:
    """Rewrite ``gm`` in place for ``sites``; returns the number of nodes replaced."""
    graph = gm.graph
    replaced = 0
    for site in sites:
        call = site.call = bn_call(site.call.node)  # re-read: an earlier rewrite may feed this one
        needs_rewrite = site.action == SYNC or (site.action == LOCAL and site.cumulative_momentum)
        if needs_rewrite:
            with graph.inserting_before(call.node):
                momentum = call.momentum
                if call.tag_num_batches_tracked is not None:
                    momentum = _cumulative_momentum(graph, call.tag_num_batches_tracked)
                new = graph.call_function(
                    synced_batch_norm,
                    (call.input, call.running_mean, call.running_var, call.weight, call.bias,
                     momentum, call.eps, site.group),
                )
            new.meta.update(call.node.meta)
            call.node.replace_all_uses_with(new)
            graph.erase_node(call.node)
            replaced += 1
        if call.tag is not None:
            call.tag.replace_all_uses_with(call.input)
            graph.erase_node(call.tag)
    graph.lint()
    gm.recompile()
    return replaced
