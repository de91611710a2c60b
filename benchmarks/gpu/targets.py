"""Issue 16's targets (item 4) against the figures, and the table ``kernels="auto"`` is derived from.

A target is "met" or "NOT met" only from device figures; without its figure it is "not measured",
and on CPU figures (the dry run) "no verdict (CPU figures)".
"""

from __future__ import annotations

import math
from typing import Optional

from .common import BNPASS_PROVIDERS

DEVICE_STEP_RATIO = 1.05   # device time per step: bnpass <= 1.05 x inductor
GRAPH_STEP_RATIO = 1.05    # step in CUDA graphs: bnpass <= 1.05 x inductor
COPY_FRACTION = 0.70       # BN fwd+bwd, bf16 channels_last, 3 largest shapes: >= 70 % of copy bandwidth
LARGEST_SHAPES = 3
HOST_US_PER_SITE = 40.0    # out of graphs: host µs per synced site per direction


def verdict(ok: Optional[bool], device_figures: bool) -> str:
    if ok is None:
        return "not measured"
    if not device_figures:
        return "no verdict (CPU figures)"
    return "met" if ok else "NOT met"


def _ratio_row(label, e2e, key, limit, device_figures):
    bn, ind = (e2e.get(v, {}).get(key) for v in label[1])
    if not bn or not ind or math.isnan(bn) or math.isnan(ind):
        return [label[0], "n/a", verdict(None, device_figures)]
    ratio = bn / ind
    return [label[0], f"{ratio:.3f}x ({bn:.3g} / {ind:.3g} ms)", verdict(ratio <= limit, device_figures)]


def copy_fraction(bn_rows: list[dict], copy_gbps: float) -> tuple[Optional[float], str]:
    """(worst fraction of copy bandwidth over the three largest bf16 channels_last shapes, each at
    bnpass's better kernel choice; None unless all three were measured), and what it rests on."""
    rows = [r for r in bn_rows if r["config"] == "bf16_cl" and r["provider"] in BNPASS_PROVIDERS]
    sizes = sorted({(r["x_bytes"], r["shape"]) for r in rows}, reverse=True)[:LARGEST_SHAPES]
    if len(sizes) < LARGEST_SHAPES or not copy_gbps or copy_gbps <= 0:
        return None, f"{len(sizes)} of {LARGEST_SHAPES} shapes measured"
    parts, worst = [], math.inf
    for _, shape in sizes:
        best = max((r for r in rows if r["shape"] == shape), key=lambda r: r["total_gbps"])
        fraction = best["total_gbps"] / copy_gbps
        worst = min(worst, fraction)
        parts.append(f"{shape} {best['provider']} {fraction:.0%}")
    return worst, f"worst {worst:.0%} of {copy_gbps:.0f} GB/s ({'; '.join(parts)})"


def evaluate_targets(bn_rows: list[dict], copy_gbps: float, e2e: dict, host_us_per_site: Optional[float],
                     device_figures: bool = True) -> list[list]:
    """Rows [target, measured, verdict]. ``bn_rows``: section 2's rows; ``e2e``: variant ->
    {"step_ms", "device_ms", ...} from section 3; ``host_us_per_site``: bnpass's host µs per synced
    site out of graphs, in the worse direction."""
    rows = [
        _ratio_row((f"device time per step: bnpass <= {DEVICE_STEP_RATIO}x inductor", ("bnpass", "inductor")),
                   e2e, "device_ms", DEVICE_STEP_RATIO, device_figures),
        _ratio_row((f"CUDA-graph step: bnpass <= {GRAPH_STEP_RATIO}x inductor",
                    ("bnpass-cudagraphs", "inductor-cudagraphs")), e2e, "step_ms", GRAPH_STEP_RATIO, device_figures),
    ]
    worst, text = copy_fraction(bn_rows, copy_gbps)
    rows.append([f"BN fwd+bwd bf16 channels_last, {LARGEST_SHAPES} largest shapes: >= {COPY_FRACTION:.0%} of "
                 "copy bandwidth (bnpass's better kernel choice, device time)", text,
                 verdict(None if worst is None else worst >= COPY_FRACTION, device_figures)])
    if host_us_per_site is None or math.isnan(host_us_per_site):
        rows.append([f"host µs per synced site per direction <= {HOST_US_PER_SITE:.0f} (out of graphs)", "n/a",
                     verdict(None, device_figures)])
    else:
        rows.append([f"host µs per synced site per direction <= {HOST_US_PER_SITE:.0f} (out of graphs)",
                     f"{host_us_per_site:.1f} µs (the worse direction)", verdict(host_us_per_site <= HOST_US_PER_SITE, device_figures)])
    return rows


def auto_table(bn_rows: list[dict]) -> list[list]:
    """Per (config, shape): the faster of bnpass-triton and bnpass-inductor in device time, for
    ``backends/triton_bn_op.py``'s AUTO_RULES."""
    rows = []
    for key in sorted({(r["config"], r["shape"]) for r in bn_rows}):
        t = {r["provider"]: r["total_ms"] for r in bn_rows if (r["config"], r["shape"]) == key}
        if "bnpass-triton" in t and "bnpass-inductor" in t:
            win = "triton" if t["bnpass-triton"] < t["bnpass-inductor"] else "inductor"
            rows.append([key[0], key[1], f"{t['bnpass-triton']:.3f}", f"{t['bnpass-inductor']:.3f}", win])
    return rows
