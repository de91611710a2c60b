"""A small layered (Sugiyama-style) layout for the html picture, so that it needs no graphviz.

Layers by longest path from the sources (a source moved down to just above its first consumer); within a layer, nodes ordered by the mean position of their
neighbours in the layer above, then below (a few sweeps). Edges that would close a cycle (possible
once a picture merges nodes) are left out of the layering and reported as back edges.
"""

from __future__ import annotations

import networkx as nx

__all__ = ["layered_layout"]


def _acyclic(graph: nx.DiGraph, rank: dict) -> tuple[nx.DiGraph, list]:
    """``graph`` without the edges that go against ``rank`` (a linear order of the nodes)."""
    back = [(u, v) for u, v in graph.edges if rank[u] >= rank[v]]
    dag = graph.copy()
    dag.remove_edges_from(back)
    return dag, back


def layered_layout(graph: nx.DiGraph, rank: dict, sweeps: int = 4) -> tuple[dict, list, int, int]:
    """({node: (layer, slot)}, back edges, number of layers, widest layer).

    ``rank``: a linear order of the nodes (e.g. each node's position in its FX graph) that the
    layering follows; edges against it are back edges.
    """
    if graph.number_of_nodes() == 0:
        return {}, [], 0, 0
    dag, back = _acyclic(graph, rank)
    layer: dict = {}
    for node in sorted(dag.nodes, key=rank.__getitem__):
        preds = list(dag.predecessors(node))
        layer[node] = 1 + max((layer[p] for p in preds), default=-1)
    for node in dag.nodes:  # a source sits just above its first consumer, not at the top
        if dag.in_degree(node) == 0 and dag.out_degree(node) > 0:
            layer[node] = min(layer[s] for s in dag.successors(node)) - 1
    layers: list[list] = [[] for _ in range(max(layer.values()) + 1)]
    for node in sorted(dag.nodes, key=rank.__getitem__):
        layers[layer[node]].append(node)
    slot = {node: i for row in layers for i, node in enumerate(row)}

    def reorder(rows, neighbours):
        for row in rows:
            def key(node):
                near = [slot[n] for n in neighbours(node)]
                return (sum(near) / len(near)) if near else slot[node]
            row.sort(key=key)
            for i, node in enumerate(row):
                slot[node] = i

    for _ in range(sweeps):
        reorder(layers[1:], dag.predecessors)
        reorder(layers[-2::-1], dag.successors)
    width = max(len(row) for row in layers)
    return {n: (layer[n], slot[n]) for n in dag.nodes}, back, len(layers), width
