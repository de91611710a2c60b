"""Section 3: one training step end to end, per variant: step time out of graphs and in CUDA graphs,
device time per step (the sum of kernel durations), the per-site table of what bnpass adds on the
device against stock Inductor, and the host time of bnpass's collectives out of graphs.

On the GPU the workload is torchvision resnet50, bf16 channels_last, batch 64, SGD, a one-rank NCCL
group with ``force_sync`` (an all_reduce there is a no-op or a device copy: what is measured is
bnpass's own kernels and host work). The dry run runs the same code on a tiny conv-BN model on the
CPU (``tiny_workload``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import site_kernels
from .common import format_table
from .correctness import compile_bnpass
from .device_time import host_per_collective, profiled, total_ms

E2E_VARIANTS = ("eager-syncbn", "inductor", "bnpass", "bnpass-triton", "bnpass-unscheduled",
                "inductor-cudagraphs", "bnpass-cudagraphs")
DEFAULT_E2E = ("inductor", "bnpass", "inductor-cudagraphs", "bnpass-cudagraphs")
GRAPHED = ("inductor-cudagraphs", "bnpass-cudagraphs")
PROFILE_STEPS = 3


def provenance() -> dict:
    """Inductor's provenance tracking (kernel -> FX nodes) for the per-site table; it does not
    change the kernels. Empty where this torch has no such setting (the table then says so)."""
    from torch._inductor import config

    return {"trace.provenance_tracking_level": 1} if hasattr(config.trace, "provenance_tracking_level") else {}


@dataclasses.dataclass
class Workload:
    name: str
    make_model: Callable[[], nn.Module]
    images: torch.Tensor
    labels: torch.Tensor
    compile_s: float  # what a variant's first step may take, for the budget


def resnet50_workload(batch: int) -> Workload:
    import torchvision

    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(batch, 3, 224, 224, generator=g, device=device).to(
        dtype=torch.bfloat16, memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,), generator=g, device=device)

    def make():
        torch.manual_seed(0)
        return torchvision.models.resnet50().to(device=device, dtype=torch.bfloat16, memory_format=torch.channels_last)

    return Workload(f"torchvision resnet50, bf16 channels_last, batch {batch}", make, images, labels, 60.0)


def tiny_workload() -> Workload:
    """Conv-BN-ReLU, pooled, a linear head: one BatchNorm site, float32, on the CPU."""
    g = torch.Generator().manual_seed(0)

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    return Workload("tiny conv-BN-ReLU + linear, float32, batch 4, 8x8, CPU", make,
                    torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g), 5.0)


class ForcedSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training forward is SyncBatchNorm's kernel path even on one rank."""

    group = None

    def forward(self, x):
        from torch.nn.modules._functions import SyncBatchNorm as SyncBNFn

        if not self.training:
            return super().forward(x)
        return SyncBNFn.apply(x, self.weight, self.bias, self.running_mean, self.running_var, self.eps,
                              self.momentum, self.group, 1)


def compile_variant(variant: str, model: nn.Module, group, config: dict, options: dict):
    """(what the step calls, the StockInductor that compiled it or None). ``config``: Inductor
    settings added to every compile (provenance; the dry run's C++ kernel profiling); ``options``:
    bnpass options added to bnpass's."""
    if variant == "eager-syncbn":
        ForcedSyncBatchNorm.group = group
        for m in model.modules():
            if type(m) is nn.BatchNorm2d:
                m.__class__ = ForcedSyncBatchNorm
        return model, None
    if variant == "inductor":
        stock = site_kernels.StockInductor(config)
        return torch.compile(model, backend=stock), stock
    if variant == "inductor-cudagraphs":
        return torch.compile(model, backend="inductor", mode="reduce-overhead"), None
    kernels = "triton" if variant == "bnpass-triton" else "inductor"
    options = {**options, "inductor_config": dict(config)}
    if variant == "bnpass-unscheduled":  # no packing, no overlap (bnpass/schedule.py)
        options.update(pack_collectives=False, overlap=False)
    if variant == "bnpass-cudagraphs":
        options["inductor_config"]["triton.cudagraphs"] = True
    return compile_bnpass(model, group, kernels, **options), None


def _top_ops(report, variant, step, cuda) -> None:
    """The ops that cost most host and device time in 3 steps of ``variant`` (``--profile``)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(PROFILE_STEPS):
            step()
        if cuda:
            torch.cuda.synchronize()
    averages = prof.key_averages()
    for key in ("self_cpu_time_total", "self_device_time_total"):
        try:
            table = averages.table(sort_by=key, row_limit=15, max_name_column_width=60)
        except Exception:  # noqa: BLE001 - the key's name differs across torch versions
            continue
        report.add(f"### profile of {variant}, {PROFILE_STEPS} steps, by {key}\n```\n{table}\n```")


def run_variant(variant, workload, group, clock, steps, config, options) -> dict:
    """Compile, first step, step time; out of graphs also the profile: kernels and host ops per step."""
    import bnpass

    torch._dynamo.reset()
    bnpass.clear_records()
    model = workload.make_model()
    fn, stock = compile_variant(variant, model, group, config, options)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        loss = F.cross_entropy(fn(workload.images).float(), workload.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    start = time.monotonic()
    step()
    if clock.cuda:
        torch.cuda.synchronize()
    out = {"first_s": time.monotonic() - start, "step_ms": clock.wall_ms(step, steps), "step": step}
    records = bnpass.compile_records()
    if variant not in GRAPHED:
        kernels, host = profiled(step, PROFILE_STEPS, clock.cuda)
        out.update(kernels=kernels, host=host, device_ms=total_ms(kernels))
        if stock is not None:
            out.update(kmap=site_kernels.kernel_map(stock.graphs), sites=stock.sites)
        elif records:
            out.update(kmap=site_kernels.kernel_map(site_kernels.record_graphs(records)),
                       synced=sum(r.count("sync") for r in records))
    return out


def e2e_section(report, workload, variants, group, clock, budget, steps, profile=(), config=None,
                options=None) -> dict:
    """{variant: figures}; variants the budget cannot fit are reported as skipped."""
    config = {**provenance(), **(config or {})}
    results, rows = {}, []
    for variant in variants:
        if variant in GRAPHED and not clock.cuda:
            rows.append([variant, "skipped (no CUDA graphs on the CPU)", "", ""])
            continue
        if not budget.allows(f"section 3: {variant}", 10 if variant == "eager-syncbn" else workload.compile_s):
            rows.append([variant, "skipped (time budget)", "", ""])
            continue
        try:
            results[variant] = r = run_variant(variant, workload, group, clock, steps, config, options or {})
            rows.append([variant, r["step_ms"], r.get("device_ms", float("nan")), f"{r['first_s']:.1f}"])
            if variant in profile and budget.allows(f"profile of {variant}", 30):
                _top_ops(report, variant, r["step"], clock.cuda)
            del r["step"]  # frees the variant's model, optimizer and graphs for the next one
        except Exception as e:  # noqa: BLE001 - one variant failing must not hide the others
            rows.append([variant, f"FAILED {type(e).__name__}: {str(e)[:200]}", "", ""])
    report.add(f"workload: {workload.name}; timing: {clock.label}")
    report.add(format_table(["variant", "ms per step (median)", "device ms per step (kernel sum)",
                             "first step s (compile)"], rows))
    return results


def site_report(report, results: dict) -> None:
    """The per-site table (bnpass against stock Inductor) and the host time of the collectives."""
    bn, ind = results.get("bnpass", {}), results.get("inductor", {})
    if "kmap" not in bn or "kmap" not in ind:
        report.add("per-site table: needs the bnpass and inductor variants out of graphs (not measured)")
    elif not all(any(e["sites"] for e in r["kmap"].values()) for r in (bn, ind)):
        report.add("per-site table: no kernel was mapped to a site (no provenance from Inductor on this "
                   "torch?): not measured")
    else:
        headers, rows = site_kernels.site_table(ind["sites"], site_kernels.attribute(bn["kmap"], bn["kernels"]),
                                                site_kernels.attribute(ind["kmap"], ind["kernels"]))
        report.add("### Per site: kernels and µs per step (a fused kernel's time split between the sites it touches)")
        report.add(format_table(headers, rows))
    rows = []
    for variant, r in results.items():
        for direction in ("forward", "backward") if r.get("host") else ():
            h = host_per_collective(r["host"], direction)
            rows.append([variant, direction, h["collectives_per_step"], h["issue_us"], h["wait_us"], h["blocking_us"],
                         h["per_collective_us"], h["per_step_us"], r.get("synced", ""), _per_site_us(r, direction)])
    report.add("### Host µs of the collectives out of graphs (torch.profiler CPU ops, inclusive)")
    report.add(format_table(["variant", "direction", "collectives per step", "issue µs", "wait µs",
                             "issue+wait in one call µs", "µs per collective", "µs per step", "synced sites",
                             "µs per synced site"], rows))


def _per_site_us(r: dict, direction: str) -> float:
    """Host µs of a variant's collectives in one direction per step, per synced site."""
    if not r.get("host") or not r.get("synced"):
        return float("nan")
    return host_per_collective(r["host"], direction)["per_step_us"] / r["synced"]


def host_us_per_site(results: dict) -> float:
    """bnpass's figure for the host target: the worse direction (nan when not measured)."""
    r = results.get("bnpass", {})
    return max(_per_site_us(r, d) for d in ("forward", "backward")) if r.get("host") else float("nan")
