"""``bnpass inspect --format text``: the sites table, the totals, ``--site K`` and ``--kernels``."""

from __future__ import annotations

from typing import Optional

from .kernels import kernel_sites, marked_source
from .render_collectives import collectives_lines

__all__ = ["render_text", "site_section", "kernels_section"]

_COLUMNS = [("#", "index"), ("module", "name"), ("op", "op"), ("C", "channels"), ("dtype", "dtype"),
            ("layout", "layout"), ("action", "action"), ("reason", "reason")]


def _table(sites: list[dict]) -> list[str]:
    rows = [[h for h, _ in _COLUMNS]]
    rows += [["-" if s[k] is None else str(s[k]) for _, k in _COLUMNS] for s in sites]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS) - 1)]
    lines = []
    for n, row in enumerate(rows):
        cells = [c.rjust(w) if i in (0, 3) else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells + [row[-1]]).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 6)
    return lines


def _totals(data: dict) -> list[str]:
    sites = data["sites"]
    actions = ["sync", "local", "skip"] + sorted({s["action"] for s in sites} - {"sync", "local", "skip"})
    counted = ", ".join(f"{a} {sum(s['action'] == a for s in sites)}" for a in actions)
    c = data["collectives"]
    graphs = len(data["graphs"])
    unpacked = c.get("unpacked", {})
    backward = (f"backward {c['backward']}{_packed(c['backward'], unpacked.get('backward'))}" if data["backward"]
                else "backward not run (" + ("--eval" if data["mode"] == "eval" else "no output needs a gradient") + ")")
    return [
        f"sites: {len(sites)} ({counted}) in {graphs} compiled graph{'s' * (graphs != 1)}",
        f"collectives per training step: forward {c['forward']}{_packed(c['forward'], unpacked.get('forward'))}, "
        f"{backward}",
        f"bytes they reduce per step per rank: {c['bytes_per_step']:,} "
        f"(forward {c['bytes']['forward']:,}, backward {c['bytes']['backward']:,})",
        f"graph breaks: {data['graph_breaks']}",
    ] + _schedule_lines(data) + collectives_lines(data)


def _schedule_lines(data: dict) -> list[str]:
    """What bnpass/schedule.py did, per compiled graph and direction (where it did anything)."""
    lines = []
    for graph in data["graphs"]:
        for direction, report in graph.get("schedule", {}).items():
            done = [f"packed {'+'.join(map(str, report['packed']))}"] if report["packed"] else []
            if report["split_conv_backwards"]:
                done.append(f"{report['split_conv_backwards']} convolution backward(s) split")
            if report["reordered"]:
                done.append("reordered for overlap")
            if done:
                lines.append(f"schedule, graph {graph['index']} {direction}: "
                             f"{report['collectives_before']} -> {report['collectives_after']} "
                             f"collectives ({', '.join(done)})")
    return lines


def _packed(after: int, before) -> str:
    return f" ({before} before packing)" if before is not None and before != after else ""


def site_section(site: dict) -> list[str]:
    lines = [f"site {site['index']}: {site['name']} ({site['op']}), {site['action']}: {site['reason']}",
             f"Dynamo graph {site['graph']} around the site before the rewrite ('>' marks the site):"]
    lines += ["  " + line for line in site["before"]] or ["  (not recorded)"]
    lines.append("after the rewrite:")
    lines += ["  " + line for line in site["after"]] or ["  (the site's node is gone)"]
    return lines


def kernels_section(data: dict, site: Optional[int] = None) -> list[str]:
    names = {s["index"]: s["name"] for s in data["sites"]}
    lines = []
    for graph in data["graphs"]:
        for direction in ("forward", "backward"):
            info = (graph["kernels"] or {}).get(direction)
            if not info or not info.get("source"):
                continue
            marks = kernel_sites(graph, direction)
            lines.append("")
            lines.append(f"==== graph {graph['index']} {direction}: Inductor's generated code ====")
            if marks is None:
                lines.append("(no provenance recorded: kernels are not marked)")
            else:
                for index in range(graph["site_offset"], graph["site_offset"] + graph["sites"]):
                    if site is not None and index != site:
                        continue
                    touching = [k for k, touched in marks["kernels"].items() if index in touched]
                    lines.append(f"site {index} {names[index]}: "
                                 + (", ".join(touching) if touching else "no kernel"))
                if marks["unattributed"]:
                    lines.append(f"({marks['unattributed']} kernel origin node(s) were made by Inductor's "
                                 "own passes and are of no known site; kernels are marked from the others)")
            lines.append("")
            lines.append(marked_source(info["source"], marks, names).rstrip("\n"))
    return lines


def render_text(data: dict, site: Optional[int] = None, kernels: bool = False) -> str:
    head = (f"bnpass inspect {data['target']}: {data['mode']} mode, world size {data['world_size']} "
            f"(fake process group), input {data['input_shape']} {data['dtype']}"
            f"{', channels_last' if data['channels_last'] else ''}")
    lines = [head, ""]
    lines += _table(data["sites"]) if data["sites"] else ["no BatchNorm found"]
    lines += [""] + _totals(data)
    if site is not None:
        lines += [""] + site_section(data["sites"][site])
    if kernels:
        lines += kernels_section(data, site)
    return "\n".join(lines) + "\n"
