"""Which kernels serve which BatchNorm site, and the per-site table of what bnpass adds on the device.

The map from a kernel's name to the sites it touches comes from Inductor's generated code and its
provenance tracking (kernel call -> FX nodes), through ``bnpass.inspect.kernels.kernel_sites``, the
same attribution ``bnpass inspect --kernels`` marks: for bnpass from its compile records, for stock
Inductor from ``StockInductor``, a backend that compiles exactly as ``backend="inductor"`` does and
keeps the same digest of its graphs. Sites are numbered by their BN call's order in the Dynamo
graph, which both backends trace alike, so site K is the same BatchNorm in both.

A kernel's time is split evenly between the sites it touches (a fused kernel that touches two sites
gives each half); kernels that touch no site (convolutions, matmuls, the optimizer) and collectives (NCCL's
kernels; on the CPU the collective ops the wrapper calls) are totalled apart. A name defined in both directions' code counts in the first.
"""

from __future__ import annotations

import functools

import torch

from .device_time import COLLECTIVE_OPS, kernel_name

DIRECTIONS = ("forward", "backward")


def kernel_map(graphs: list[dict]) -> dict[str, dict]:
    """{kernel name: {"direction": d, "sites": set of site indices}} from graph dicts of the form
    ``bnpass inspect`` builds (site_offset, graphs: digests, kernels: generated code + provenance)."""
    from bnpass.inspect.kernels import kernel_sites

    out: dict[str, dict] = {}
    for graph in graphs:
        for direction in DIRECTIONS:
            marks = kernel_sites(graph, direction)
            for kernel, touched in (marks or {}).get("kernels", {}).items():
                entry = out.setdefault(kernel, {"direction": direction, "sites": set()})
                entry["sites"] |= set(touched)
    return out


def record_graphs(records) -> list[dict]:
    """bnpass's compile records as ``kernel_map``'s graph dicts."""
    graphs, offset = [], 0
    for record in records:
        graphs.append({"site_offset": offset, "graphs": record.graphs, "kernels": record.kernels})
        offset += len(record.sites)
    return graphs


def attribute(kmap: dict[str, dict], kernels: dict[str, list]) -> dict:
    """Per-step kernel times (``{profiled name: [calls, µs]}``) by site and direction:
    {"sites": {(site, direction): [kernels, µs]}, "collective_us": ..., "other_us": ...}."""
    sites: dict[tuple, list] = {}
    collective = other = 0.0
    for profiled_name, (_, us) in kernels.items():
        entry = kmap.get(kernel_name(profiled_name))
        if entry and entry["sites"]:
            share = us / len(entry["sites"])
            for site in entry["sites"]:
                acc = sites.setdefault((site, entry["direction"]), [0, 0.0])
                acc[0] += 1
                acc[1] += share
        elif profiled_name.lower().startswith("nccl") or profiled_name in COLLECTIVE_OPS:
            collective += us
        else:
            other += us
    return {"sites": sites, "collective_us": collective, "other_us": other}


def site_table(site_names: list[tuple[int, str, object]], bnpass: dict, stock: dict) -> tuple[list, list]:
    """(headers, rows): per site, bnpass's and stock Inductor's kernels and µs per step in each
    direction (``attribute`` results), and what bnpass adds; a last row of totals."""
    headers = ["site", "module", "C"]
    for who in ("bnpass", "inductor"):
        headers += [f"{who} fwd kernels", f"{who} fwd µs", f"{who} bwd kernels", f"{who} bwd µs"]
    headers.append("bnpass adds µs")
    rows, sums = [], [0.0] * 9
    for index, name, channels in site_names:
        cells = []
        for result in (bnpass, stock):
            for direction in DIRECTIONS:
                cells += result["sites"].get((index, direction), [0, 0.0])
        added = sum(cells[1:4:2]) - sum(cells[5:8:2])
        rows.append([index, name, channels] + cells + [added])
        sums = [a + b for a, b in zip(sums, cells + [added])]
    rows.append(["all", "(per step)", ""] + sums)
    for label, key in (("collective kernels", "collective_us"), ("kernels of no site", "other_us")):
        rows.append(["", label, "", "", bnpass[key], "", "", "", stock[key], "", "", bnpass[key] - stock[key]])
    return headers, rows


class StockInductor:
    """A torch.compile backend that is stock Inductor (``compile_fx``, AOTAutograd's cache off so
    that every graph is seen) keeping, per compiled graph, what bnpass keeps for ``bnpass inspect``:
    the sites of its Dynamo graph, a digest of the forward and backward graphs and the generated
    code with provenance. ``graphs`` is ``kernel_map``'s input."""

    def __init__(self, inductor_config: dict | None = None):
        """``inductor_config``: Inductor settings for its compiles; provenance tracking must be
        among them (``trace.provenance_tracking_level=1``) for ``kernel_map`` to find the sites."""
        self.config = dict(inductor_config or {})
        self.graphs: list[dict] = []
        self.sites: list[tuple[int, str, object]] = []

    def __call__(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        from bnpass.inspect.capture import snapshot_sites
        from bnpass.sites import find_sites

        found = find_sites(gm, None, 1, False, "stock Inductor", fold_eval=False)
        offset = len(self.sites)
        self.sites += [(offset + s.index, s.name, s.channels) for s in found]
        names = {index: entry["names"] for index, entry in snapshot_sites(gm, found)["sites"].items()}
        graph = {"site_offset": offset, "graphs": {}, "kernels": {}}
        self.graphs.append(graph)
        patches = dict(self.config)  # provenance on: end_to_end.provenance()
        with torch._functorch.config.patch(enable_autograd_cache=False):
            return compile_fx(gm, example_inputs, config_patches=patches,
                              inner_compile=functools.partial(_keeping_inner_compile, graph, names))


def _keeping_inner_compile(graph, site_nodes, gm, example_inputs, **kwargs):
    from torch._inductor.compile_fx import compile_fx_inner

    from bnpass.backends.inductor import _provenance_scope
    from bnpass.inspect.capture import digest, kernel_info

    direction = "backward" if kwargs.get("is_backward") else "forward"
    graph["graphs"][direction] = digest(gm, site_nodes, direction)
    with _provenance_scope():
        compiled = compile_fx_inner(gm, example_inputs, **kwargs)
    graph["kernels"][direction] = kernel_info(compiled)
    return compiled
