"""``bnpass inspect --format dot|html``: the rewritten graphs as Inductor receives them, BN subgraphs
highlighted and labelled by site.

The picture is of the forward and backward graphs AOTAutograd hands to Inductor (the rewritten
Dynamo graph after tracing), one node per FX node, built with networkx from the record's digest. Each
site's nodes are grouped by phase: ``stats``, ``all_reduce``, ``normalize`` in the forward,
``backward`` (and its ``all_reduce``) in the backward; see bnpass/inspect/capture.py for how a node
is attributed to a site. ``--site K`` keeps site K's nodes and their direct neighbours.

* dot: every node, a cluster per site holding a cluster per phase; render with graphviz
  (``dot -Tsvg``).
* html: one self-contained file (inline SVG and CSS, no script, nothing fetched): the sites table,
  an overview of each graph in which each site's phase is one box (graph inputs and outputs left
  out), and each site's subgraph node by node.
"""

from __future__ import annotations

import html
from typing import Optional

import networkx as nx

from .render_layout import layered_layout

__all__ = ["build_graph", "render_dot", "render_html", "PHASES", "PHASE_COLORS"]

PHASES = ("stats", "all_reduce", "normalize", "backward")
PHASE_COLORS = {"stats": "#cfe2ff", "all_reduce": "#ffab9e", "normalize": "#c7efcf", "backward": "#e3d2f7"}
_DIRECTIONS = ("forward", "backward")


def _node_id(graph: int, direction: str, name: str) -> str:
    return f"g{graph}/{direction}/{name}"


def build_graph(data: dict, site: Optional[int] = None) -> nx.DiGraph:
    """Every node of every recorded forward/backward graph, with its site and phase."""
    g = nx.DiGraph()
    names = {s["index"]: s["name"] for s in data["sites"]}
    for graph in data["graphs"]:
        for direction in _DIRECTIONS:
            digest = (graph.get("graphs") or {}).get(direction) or []
            for rank, n in enumerate(digest):
                index = None if n["site"] is None else graph["site_offset"] + n["site"]
                kind = {"placeholder": "input", "output": "output"}.get(n["op"], "op")
                g.add_node(_node_id(graph["index"], direction, n["name"]),
                           graph=graph["index"], direction=direction, name=n["name"], kind=kind,
                           target=n["target"], shape=n["shape"], site=index, phase=n["phase"],
                           site_name=names.get(index), recomputed=n["recomputed"], rank=rank)
            for n in digest:
                for source in n["inputs"]:
                    g.add_edge(_node_id(graph["index"], direction, source),
                               _node_id(graph["index"], direction, n["name"]))
    if site is None:
        return g
    keep = {n for n, a in g.nodes(data=True) if a["site"] == site}
    context = {m for n in keep for m in (*g.predecessors(n), *g.successors(n))} - keep
    sub = g.subgraph(keep | context).copy()
    for n in context:
        sub.nodes[n]["context"] = True
    return sub


# --- dot ------------------------------------------------------------------------------------------

def _q(text: str) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _dot_node(node: str, a: dict) -> str:
    if a["kind"] == "input":
        attrs = {"label": f"{a['name']}\n{a['shape']}", "shape": "ellipse", "fillcolor": "#eeeeee"}
    elif a["kind"] == "output":
        attrs = {"label": "output", "shape": "house", "fillcolor": "#eeeeee"}
    else:
        attrs = {"label": f"{a['target']}\n{a['shape']}", "tooltip": a["name"],
                 "fillcolor": PHASE_COLORS.get(a["phase"], "white")}
        if a.get("recomputed"):
            attrs["style"] = "rounded,filled,dashed"
    if a.get("context"):
        attrs.update(color="#999999", fillcolor="#f4f4f4")
        if a["site"] is not None:
            attrs["label"] += f"\n(site {a['site']})"
    return f"{_q(node)} [" + ", ".join(f"{k}={_q(v)}" for k, v in attrs.items()) + "];"


def render_dot(data: dict, site: Optional[int] = None) -> str:
    g = build_graph(data, site)
    sites = {s["index"]: s for s in data["sites"]}
    title = f"bnpass inspect {data['target']}: {data['mode']}, world size {data['world_size']}"
    lines = ["digraph bnpass {",
             f"  graph [label={_q(title)}, labelloc=t, fontname=Helvetica, rankdir=TB];",
             '  node [shape=box, style="rounded,filled", fillcolor=white, fontname=Helvetica, fontsize=10];',
             "  edge [color=\"#555555\", arrowsize=0.6];"]
    by_part: dict = {}
    for node, a in g.nodes(data=True):
        by_part.setdefault((a["graph"], a["direction"]), []).append((node, a))
    for (graph, direction), nodes in sorted(by_part.items(), key=lambda kv: (kv[0][0], kv[0][1] != "forward")):
        lines.append(f"  subgraph {_q(f'cluster_g{graph}_{direction}')} {{")
        lines.append(f"    label={_q(f'graph {graph} {direction}')}; style=rounded; color=\"#888888\";")
        in_sites: dict = {}
        for node, a in sorted(nodes, key=lambda na: na[1]["rank"]):
            if a["site"] is None or a.get("context"):  # --site K: K's neighbours stay outside
                lines.append("    " + _dot_node(node, a))
            else:
                in_sites.setdefault(a["site"], {}).setdefault(a["phase"], []).append((node, a))
        for index, phases in sorted(in_sites.items()):
            s = sites[index]
            cluster = f"cluster_g{graph}_{direction}_site{index}"
            lines.append(f"    subgraph {_q(cluster)} {{")
            label = f"site {index}: {s['name']} ({s['action']})"
            lines.append(f"      label={_q(label)}; "
                         'style="rounded,filled"; fillcolor="#f7f7f7"; color="#333333"; penwidth=1.5;')
            for phase in PHASES:
                if phase not in phases:
                    continue
                lines.append(f"      subgraph {_q(f'{cluster}_{phase}')} {{")
                lines.append(f"        label={_q(phase)}; style=\"rounded,filled\"; "
                             f"fillcolor={_q(PHASE_COLORS[phase] + '55')}; color={_q(PHASE_COLORS[phase])};")
                lines += ["        " + _dot_node(node, a) for node, a in phases[phase]]
                lines.append("      }")
            lines.append("    }")
        lines.append("  }")
    for u, v in g.edges:
        lines.append(f"  {_q(u)} -> {_q(v)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


# --- html -----------------------------------------------------------------------------------------

_BOX_W, _BOX_H, _GAP_X, _GAP_Y, _PAD = 178, 38, 22, 34, 16


def _clip(text: str, n: int = 28) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _svg(g: nx.DiGraph, title: str) -> str:
    """A layered drawing of ``g``; node attributes: label, sub, phase, site, rank, dashed, muted."""
    rank = {n: a["rank"] for n, a in g.nodes(data=True)}
    pos, back, layers, widest = layered_layout(g, rank)
    width = 2 * _PAD + widest * (_BOX_W + _GAP_X)
    height = 2 * _PAD + layers * (_BOX_H + _GAP_Y)
    row_len: dict = {}
    for layer, slot in pos.values():
        row_len[layer] = max(row_len.get(layer, 0), slot + 1)

    def xy(node):
        layer, slot = pos[node]
        offset = (widest - row_len[layer]) * (_BOX_W + _GAP_X) / 2
        return _PAD + offset + slot * (_BOX_W + _GAP_X), _PAD + layer * (_BOX_H + _GAP_Y)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="graph" width="{width:.0f}" '
           f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" role="img" '
           f'aria-label="{html.escape(title)}">']
    back_set = set(back)
    for u, v in g.edges:
        (x1, y1), (x2, y2) = xy(u), xy(v)
        x1, y1, x2 = x1 + _BOX_W / 2, y1 + _BOX_H, x2 + _BOX_W / 2
        bend = max(20.0, (y2 - y1) / 2)
        cls = "edge back" if (u, v) in back_set else "edge"
        out.append(f'<path class="{cls}" d="M{x1:.0f},{y1:.0f} C{x1:.0f},{y1 + bend:.0f} '
                   f'{x2:.0f},{y2 - bend:.0f} {x2:.0f},{y2:.0f}" marker-end="url(#arrow)"/>')
    for node, a in sorted(g.nodes(data=True), key=lambda na: na[1]["rank"]):
        x, y = xy(node)
        classes = ["node"] + ([f"site-{a['site']}", f"phase-{a['phase']}"] if a.get("site") is not None else [])
        classes += ["dashed"] if a.get("dashed") else []
        classes += ["muted"] if a.get("muted") else []
        data_attrs = (f' data-site="{a["site"]}" data-phase="{a["phase"]}"' if a.get("site") is not None else "")
        fill = PHASE_COLORS.get(a.get("phase"), "#ffffff")
        out.append(f'<g class="{" ".join(classes)}"{data_attrs}><title>{html.escape(a["tip"])}</title>'
                   f'<rect x="{x:.0f}" y="{y:.0f}" width="{_BOX_W}" height="{_BOX_H}" rx="6" fill="{fill}"/>'
                   f'<text x="{x + 8:.0f}" y="{y + 15:.0f}">{html.escape(_clip(a["label"]))}</text>'
                   f'<text class="sub" x="{x + 8:.0f}" y="{y + 30:.0f}">{html.escape(_clip(a["sub"], 32))}</text></g>')
    out.append("</svg>")
    return "\n".join(out)


def _overview(g: nx.DiGraph, graph: int, direction: str) -> nx.DiGraph:
    """One box per (site, phase), one per other op; graph inputs and outputs left out."""
    members: dict = {}
    box_of: dict = {}
    part = [n for n, a in g.nodes(data=True)
            if a["graph"] == graph and a["direction"] == direction and a["kind"] == "op"
            and (a["site"] is not None or _drawn_in_overview(a["shape"]))]
    feeds_reduce = _feeds_all_reduce(g, part) if direction == "backward" else set()
    for node in part:
        a = g.nodes[node]
        key = node if a["site"] is None else f"site{a['site']}/{a['phase']}"
        if a["phase"] == "backward" and a["recomputed"]:
            key += "/recomputed"
        elif a["phase"] == "backward" and node in feeds_reduce:
            key += "/before"
        box_of[node] = key
        members.setdefault(key, []).append(a)
    box = nx.DiGraph()
    for key, parts in members.items():
        a = parts[0]
        rank = min(p["rank"] for p in parts)
        if a["site"] is None:
            box.add_node(key, label=a["target"], sub=a["shape"], rank=rank, tip=f"{a['name']}: {a['target']}")
        else:
            ops = ", ".join(p["target"] for p in sorted(parts, key=lambda p: p["rank"]))
            when = {"/before": " → all_reduce", "/recomputed": ", recomputed", "": ""}[key[len(f"site{a['site']}/{a['phase']}"):]]
            box.add_node(key, label=f"site {a['site']} · {a['site_name']}", rank=rank,
                         sub=f"{a['phase']}{when} · {len(parts)} op{'s' * (len(parts) != 1)}",
                         site=a["site"], phase=a["phase"], dashed=key.endswith("/recomputed"),
                         tip=f"site {a['site']} {a['site_name']}, {a['phase']}: {ops}")
    def drawn_sources(node, seen) -> set:  # the drawn ops a left-out op passes values on from
        if node in box_of:
            return {box_of[node]}
        a = g.nodes[node]
        if node in seen or a["kind"] != "op" or a["graph"] != graph or a["direction"] != direction:
            return set()
        seen.add(node)
        return set().union(*(drawn_sources(p, seen) for p in g.predecessors(node)))

    for v in box_of:
        for u in g.predecessors(v):
            for source in drawn_sources(u, set()):
                if source != box_of[v]:
                    box.add_edge(source, box_of[v])
    if nx.is_directed_acyclic_graph(box):  # draw in an order that has no back edge
        order = nx.lexicographical_topological_sort(box, key=lambda k: box.nodes[k]["rank"])
        for i, key in enumerate(order):
            box.nodes[key]["rank"] = i
    return box


def _drawn_in_overview(shape: str) -> bool:
    """Ops whose result is not a 0-d or integer tensor: those (num_batches_tracked += 1 and its
    copy-back, constants) are bookkeeping that the overview leaves out, drawing edges through them."""
    return not (shape.startswith(("int", "uint")) or shape.endswith("[]"))


def _feeds_all_reduce(g: nx.DiGraph, part: list) -> set:
    """The nodes of ``part`` that a collective of their own site depends on (a site's local sums in
    the backward): the overview draws them apart from the rest of the site's backward, which
    depends on the collective, so that the boxes read in order."""
    out = set()
    for node in part:
        a = g.nodes[node]
        if a["phase"] != "all_reduce":
            continue
        stack = list(g.predecessors(node))
        while stack:
            n = stack.pop()
            if n in out or g.nodes[n]["site"] != a["site"] or g.nodes[n]["phase"] != "backward":
                continue
            out.add(n)
            stack.extend(g.predecessors(n))
    return out


def _site_detail(g: nx.DiGraph, index: int, direction: str) -> nx.DiGraph:
    """Site ``index``'s nodes in one direction, node by node, with their direct neighbours (muted)."""
    own = {n for n, a in g.nodes(data=True) if a["site"] == index and a["direction"] == direction}
    near = {m for n in own for m in (*g.predecessors(n), *g.successors(n))} - own
    detail = nx.DiGraph()
    for node in own | near:
        a = g.nodes[node]
        tip = f"{a['name']}: {a['target']} {a['shape']}" + (" (recomputed in backward)" if a["recomputed"] else "")
        label = a["target"] if a["kind"] == "op" else a["name"]
        extra = {"site": a["site"], "phase": a["phase"]} if node in own else {"muted": True}
        detail.add_node(node, label=label, sub=a["shape"] or a["name"], rank=a["rank"], tip=tip,
                        dashed=a["recomputed"], **extra)
    detail.add_edges_from((u, v) for u, v in g.subgraph(own | near).edges)
    return detail


_CSS = """
body { font: 14px/1.4 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 17px; margin-top: 28px; } h3 { font-size: 15px; }
table.sites { border-collapse: collapse; } table.sites td, table.sites th { padding: 3px 10px;
  border-bottom: 1px solid #ddd; text-align: left; vertical-align: top; }
td.action-sync { color: #b42318; font-weight: 600; } td.action-skip { color: #667085; }
td.action-local { color: #175cd3; }
.legend span { display: inline-block; padding: 2px 10px; margin-right: 8px; border-radius: 4px;
  border: 1px solid #999; }
.scroll { overflow: auto; border: 1px solid #ddd; border-radius: 6px; max-height: 80vh; }
svg.graph .edge { fill: none; stroke: #666; stroke-width: 1; }
svg.graph .edge.back { stroke-dasharray: 4 3; stroke: #b42318; }
svg.graph .node rect { stroke: #555; stroke-width: 1; }
svg.graph .node[data-site] rect { stroke: #222; stroke-width: 1.6; }
svg.graph .node.dashed rect { stroke-dasharray: 4 2; }
svg.graph .node.muted rect { fill: #f4f4f4; stroke: #bbb; }
svg.graph .node.muted text { fill: #888; }
svg.graph text { font: 12px Helvetica, Arial, sans-serif; fill: #111; }
svg.graph text.sub { font-size: 10px; fill: #555; }
pre { background: #f7f7f7; padding: 8px; border-radius: 6px; font-size: 12px; overflow: auto; }
"""

_ARROW = ('<svg width="0" height="0" style="position:absolute"><defs><marker id="arrow" viewBox="0 0 10 10" '
          'refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse">'
          '<path d="M0,0 L10,5 L0,10 z" fill="#666"/></marker></defs></svg>')


def render_html(data: dict, site: Optional[int] = None) -> str:
    from .render_text import _totals  # the same totals lines as the text format

    g = build_graph(data)
    e = html.escape
    title = f"bnpass inspect {data['target']}"
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>",
             f"<style>{_CSS}</style></head><body>", _ARROW, f"<h1>{e(title)}</h1>",
             f"<p>{e(data['mode'])} mode, world size {data['world_size']} (fake process group), input "
             f"{e(str(data['input_shape']))} {e(data['dtype'])}{', channels_last' if data['channels_last'] else ''}</p>"]
    cols = ("index", "name", "op", "channels", "dtype", "layout", "action", "reason")
    parts.append("<table class=\"sites\"><tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>")
    for s in data["sites"]:
        parts.append(f"<tr id=\"site-{s['index']}\">" + "".join(
            f"<td class=\"action-{e(s['action'])}\">{e(s[c])}</td>" if c == "action"
            else f"<td>{e('-' if s[c] is None else str(s[c]))}</td>" for c in cols) + "</tr>")
    parts.append("</table>")
    parts.append("<p>" + "<br>".join(e(line) for line in _totals(data)) + "</p>")
    parts.append("<p class=\"legend\">" + "".join(
        f"<span style=\"background:{PHASE_COLORS[p]}\">{p}</span>" for p in PHASES)
        + "<span style=\"border-style:dashed\">recomputed in backward</span></p>")
    shown = [s for s in data["sites"] if site is None or s["index"] == site]
    if site is None:
        for graph in data["graphs"]:
            for direction in _DIRECTIONS:
                if not (graph.get("graphs") or {}).get(direction):
                    continue
                box = _overview(g, graph["index"], direction)
                parts.append(f"<h2>graph {graph['index']} {direction}: overview</h2>")
                parts.append("<p>One box per phase of each site, one per other op; graph inputs, "
                             "outputs and scalar or integer bookkeeping (such as num_batches_tracked) "
                             "are not drawn. Hover for the ops in a box. A dashed red edge "
                             "runs against the drawing's order (boxes that merge ops can form a cycle)."
                             "</p>")
                svg = _svg(box, f"graph {graph['index']} {direction}")
                parts.append(f"<div class=\"scroll\">{svg}</div>")
    for s in shown:
        parts.append(f"<h2 id=\"detail-{s['index']}\">site {s['index']}: {e(s['name'])} "
                     f"({e(s['op'])}, {e(s['action'])})</h2><p>{e(s['reason'])}</p>")
        for direction in _DIRECTIONS:
            detail = _site_detail(g, s["index"], direction)
            if not any(a.get("site") is not None for _, a in detail.nodes(data=True)):
                continue
            svg = _svg(detail, f"site {s['index']} {direction}")
            parts.append(f"<h3>{direction}</h3><div class=\"scroll\">{svg}</div>")
        if s["before"] or s["after"]:
            parts.append("<details><summary>Dynamo graph around the site, before and after the rewrite"
                         "</summary><pre>" + e("\n".join(s["before"])) + "</pre><pre>"
                         + e("\n".join(s["after"])) + "</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
