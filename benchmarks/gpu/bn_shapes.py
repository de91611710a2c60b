"""Section 2: BatchNorm forward+backward on ResNet-50's BN shapes, per provider, in device time.

Providers: bnpass-triton, bnpass-inductor (both synced, forced, world size 1), inductor (unsynced),
eager cuDNN (unsynced), eager SyncBatchNorm's kernel path (``torch.nn.modules._functions
.SyncBatchNorm``, world-size-1 NCCL group). Bytes model (``common.bytes_model``): forward reads x
twice and writes y; backward reads x and dy twice and writes dx; GB/s = bytes / device time.
Columns: forward and forward+backward as the sum of kernel durations (the clock's ``kernel_ms``),
backward their difference, and the forward+backward replayed as one CUDA graph (n/a where it
cannot be captured). The copy bandwidth is measured with the same clock.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .common import CONFIGS, bytes_model, format_table, gbps, shape_text
from .correctness import compile_bnpass


def bn_providers(shape, device, group, names):
    """name -> (module holding params, fn(x) -> y) for one shape; BN parameters in float32."""
    from torch.nn.modules._functions import SyncBatchNorm as SyncBNFn

    out = {}
    for name in names:
        torch._dynamo.reset()
        bn = nn.BatchNorm2d(shape[1]).to(device)
        if name == "eager-cudnn":
            fn = bn
        elif name == "eager-syncbn-kernels":
            fn = (lambda m: lambda x: SyncBNFn.apply(x, m.weight, m.bias, m.running_mean, m.running_var,
                                                     m.eps, m.momentum, group, 1))(bn)
        elif name == "inductor":
            fn = torch.compile(bn, backend="inductor", dynamic=False)
        else:
            fn = compile_bnpass(bn, group, name.split("-")[1])
        out[name] = (bn, fn)
    return out


def measure_provider(clock, fn, params, x, dy) -> dict:
    """Forward, forward+backward (kernel sums) and the CUDA-graph replay of forward+backward, ms."""
    def fwd_bwd():
        return torch.autograd.grad(fn(x), params, dy)

    fwd_ms = clock.kernel_ms(lambda: fn(x))
    total_ms = clock.kernel_ms(fwd_bwd)
    return {"fwd_ms": fwd_ms, "total_ms": total_ms, "bwd_ms": total_ms - fwd_ms, "graph_ms": clock.graph_ms(fwd_bwd)}


def bn_row(config, shape, provider, dtype, times: dict, max_dev: float) -> dict:
    fwd_b, bwd_b = bytes_model(shape, dtype)
    return {"config": config, "shape": shape_text(shape), "provider": provider, "x_bytes": fwd_b // 3,
            **times, "fwd_gbps": gbps(fwd_b, times["fwd_ms"]), "bwd_gbps": gbps(bwd_b, times["bwd_ms"]),
            "total_gbps": gbps(fwd_b + bwd_b, times["total_ms"]),
            "graph_gbps": gbps(fwd_b + bwd_b, times["graph_ms"]) if times.get("graph_ms") else float("nan"),
            "max_dev": max_dev}


def bn_section(report, shapes: dict, providers, group, device, clock, budget) -> list[dict]:
    """One row per (config, shape, provider) measured; shapes past ``budget`` are skipped."""
    rows = []
    for cfg, cfg_shapes in shapes.items():
        dtype, fmt = CONFIGS[cfg]
        for shape in cfg_shapes:
            if not budget.allows(f"section 2: {cfg} {shape_text(shape)}"):
                continue
            g = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(shape, generator=g, device=device).to(dtype=dtype, memory_format=fmt).requires_grad_()
            dy = torch.randn(shape, generator=g, device=device).to(dtype=dtype, memory_format=fmt)
            y_ref = dx_ref = None
            names = sorted(providers, key=lambda n: n != "eager-cudnn")  # the baseline first
            for name, (bn, fn) in bn_providers(shape, device, group, names).items():
                try:
                    params = [x, bn.weight, bn.bias]
                    times = measure_provider(clock, fn, params, x, dy)
                    y = fn(x)
                    dx = torch.autograd.grad(y, params, dy)[0]
                    if y_ref is None:
                        y_ref, dx_ref = y.detach().float(), dx.float()
                    dev = max(float((y.detach().float() - y_ref).abs().max()), float((dx.float() - dx_ref).abs().max()))
                    rows.append(bn_row(cfg, shape, name, dtype, times, dev))
                except Exception as e:  # noqa: BLE001 - one provider failing must not hide the others
                    report.add(f"{cfg} {shape} {name}: FAILED {type(e).__name__}: {str(e)[:300]}")
    return rows


def bn_table(rows, copy_gbps) -> str:
    headers = ["config", "shape", "provider", "fwd ms", "fwd GB/s", "bwd ms", "bwd GB/s", "fwd+bwd ms",
               "fwd+bwd GB/s", "% of copy", "CUDA-graph fwd+bwd ms", "graph GB/s",
               "max abs diff of y, dx vs the first provider (eager-cudnn)"]
    body = [[r["config"], r["shape"], r["provider"], r["fwd_ms"], r["fwd_gbps"], r["bwd_ms"], r["bwd_gbps"],
             r["total_ms"], r["total_gbps"], f"{r['total_gbps'] / copy_gbps:.0%}" if copy_gbps else "n/a",
             r["graph_ms"], r["graph_gbps"], r["max_dev"]] for r in rows]
    return format_table(headers, body)
