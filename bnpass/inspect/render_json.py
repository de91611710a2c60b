"""``bnpass inspect --format json``: the documented, stable schema (see ``SCHEMA`` and bnpass/inspect/cli.py)."""

from __future__ import annotations

import json
from typing import Optional

from .kernels import kernel_sites, marked_source
from .render_collectives import collective_entries, transport_counts

__all__ = ["to_schema", "render_json", "SCHEMA"]

SCHEMA = "bnpass-inspect/1"
_SITE_KEYS = ("index", "graph", "name", "op", "channels", "dtype", "layout", "action", "reason", "group")


def _site_kernels(data: dict) -> dict[int, dict[str, list[str]]]:
    out = {s["index"]: {"forward": [], "backward": []} for s in data["sites"]}
    for graph in data["graphs"]:
        for direction in ("forward", "backward"):
            marks = kernel_sites(graph, direction)
            for kernel, touched in (marks or {}).get("kernels", {}).items():
                for site in touched:
                    out[site][direction].append(kernel)
    return out


def to_schema(data: dict, site: Optional[int] = None, kernels: bool = False) -> dict:
    sites = [{k: s[k] for k in _SITE_KEYS} for s in data["sites"]]
    entries = collective_entries(data)
    totals = {"sites": len(sites)}
    for action in ["sync", "local", "skip"] + sorted({s["action"] for s in sites} - {"sync", "local", "skip"}):
        totals[action] = sum(s["action"] == action for s in sites)
    out = {
        "schema": SCHEMA,
        "target": data["target"], "mode": data["mode"], "world_size": data["world_size"],
        "input_shape": data["input_shape"], "dtype": data["dtype"], "channels_last": data["channels_last"],
        "backward": data["backward"], "graphs": len(data["graphs"]),
        "sites": sites, "totals": totals,
        "collectives": {**data["collectives"], "transport": transport_counts(entries)},
        "sequence": entries, "graph_breaks": data["graph_breaks"],
        "schedule": [{"graph": g["index"], **g.get("schedule", {})} for g in data["graphs"]],
    }
    if site is not None:
        s = data["sites"][site]
        out["site"] = {"index": site, "before": s["before"], "after": s["after"]}
    if kernels:
        per_site = _site_kernels(data)
        for entry in sites:
            entry["kernels"] = per_site[entry["index"]]
        names = {s["index"]: s["name"] for s in data["sites"]}
        out["kernels"] = [
            {"graph": g["index"], "direction": d,
             "source": marked_source(g["kernels"][d]["source"], kernel_sites(g, d), names)}
            for g in data["graphs"] for d in ("forward", "backward")
            if (g["kernels"] or {}).get(d) and g["kernels"][d].get("source")
        ]
    return out


def render_json(data: dict, site: Optional[int] = None, kernels: bool = False) -> str:
    return json.dumps(to_schema(data, site, kernels), indent=2) + "\n"
