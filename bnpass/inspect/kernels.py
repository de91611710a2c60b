"""Which generated kernels touch which site, and the generated source with those kernels marked.

Inductor's provenance tracking (on for ``bnpass inspect --kernels``) gives, for each kernel call in
the generated wrapper (``kernel:handle``; the wrapper carries a ``[Provenance debug handles]``
comment before the call), the FX nodes it was generated from. The record's graph digest gives each
node's site and phase. A call touches site K when one of its origin nodes was traced from K; a kernel
definition touches the union of its calls. That is all the marks claim: a fused kernel that touches
a site usually does other work too.
"""

from __future__ import annotations

import re
from typing import Optional

__all__ = ["kernel_sites", "marked_source"]

_DEFINITION = re.compile(r"^(\w+) = async_compile\.\w+\(")
_HANDLE = re.compile(r"^(\s*)(#|//) \[Provenance debug handles\] (.+):(\d+)\s*$")


def _node_phases(graph: dict, direction: str, offset: int) -> dict[str, tuple[int, str]]:
    digest = (graph.get("graphs") or {}).get(direction) or []
    return {n["name"]: (offset + n["site"], n["phase"]) for n in digest if n.get("site") is not None}


def kernel_sites(graph: dict, direction: str) -> Optional[dict]:
    """{"calls": {"kernel:handle": {site: [phases]}}, "kernels": {kernel: {site: [phases]}},
    "unattributed": origin nodes not in the graph handed to Inductor (made by its post-grad passes),
    so of no known site}; None without provenance."""
    info = (graph.get("kernels") or {}).get(direction) or {}
    calls = info.get("calls")
    if calls is None:
        return None
    phases = _node_phases(graph, direction, graph["site_offset"])
    known = {n["name"] for n in (graph.get("graphs") or {}).get(direction) or []}
    by_call: dict[str, dict[int, list[str]]] = {}
    by_kernel: dict[str, dict[int, list[str]]] = {}
    unattributed = 0
    for call, origins in calls.items():
        kernel = call.rsplit(":", 1)[0]
        touched: dict[int, list[str]] = {}
        for name in origins:
            if name not in phases:
                unattributed += name not in known
                continue
            site, phase = phases[name]
            if phase not in touched.setdefault(site, []):
                touched[site].append(phase)
        by_call[call] = touched
        merged = by_kernel.setdefault(kernel, {})
        for site, ph in touched.items():
            merged.setdefault(site, [])
            merged[site] += [p for p in ph if p not in merged[site]]
    return {"calls": by_call, "kernels": by_kernel, "unattributed": unattributed}


def _mark(comment: str, touched: dict, site_names: dict) -> str:
    parts = [f"site {s} {site_names.get(s, '?')} [{', '.join(sorted(ph))}]" for s, ph in sorted(touched.items())]
    return f"{comment} bnpass: touches " + "; ".join(parts)


def marked_source(source: str, marks: Optional[dict], site_names: dict) -> str:
    """``source`` with a ``bnpass: touches site K ...`` comment before each kernel definition and
    after each call's provenance comment, for the kernels that touch a site."""
    if not marks:
        return source
    out = []
    for line in source.splitlines():
        definition = _DEFINITION.match(line)
        if definition and marks["kernels"].get(definition.group(1)):
            out.append(_mark("#", marks["kernels"][definition.group(1)], site_names))
        out.append(line)
        handle = _HANDLE.match(line)
        if handle:
            touched = marks["calls"].get(f"{handle.group(3)}:{handle.group(4)}")
            if touched:
                out.append(handle.group(1) + _mark(handle.group(2), touched, site_names))
    return "\n".join(out) + "\n"
