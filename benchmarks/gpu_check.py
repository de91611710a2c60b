"""One command that checks and measures bnpass on one GPU (H100/H200, about 5 minutes).

    PYTHONPATH=. python benchmarks/gpu_check.py [--out benchmarks/gpu_results.md] [--budget-s 290]
    python benchmarks/gpu_check.py --dry-run --out /tmp/dry.md      # no GPU: the CPU-side logic only

Needs torch (2.11 on the GPU machine), triton, torchvision; no network, no pip install (bnpass runs
from this source tree: ``import bnpass; bnpass.register()``). Results go to stdout and to ``--out``.

1. Correctness on CUDA, compiled bnpass against a float64 reference of a conv-BN model (fp32 NCHW
   and bf16 channels_last; kernels "inductor" and "triton"): (a) a world-size-1 NCCL group with
   ``force_sync`` (the collective runs), (b) the same step captured in CUDA graphs
   (``inductor_config={"triton.cudagraphs": True}``, what mode="reduce-overhead" sets): no host-sync
   op, no cudagraph skip, (c) 2 ranks sharing the GPU over gloo, really synced. A
   quantity passes if its error is within 2e-5 of its largest value (fp32) or within 10x the error
   eager PyTorch makes in the same dtype (as tests/checks.py judges).
2. BatchNorm forward+backward on ResNet-50's BN shapes, per provider: bnpass-triton, bnpass-inductor
   (both synced, forced, world size 1), inductor (unsynced), eager cuDNN (unsynced), eager
   SyncBatchNorm's kernel path (``torch.nn.modules._functions.SyncBatchNorm``, world-size-1 NCCL
   group). Bytes model, in x's dtype (``bytes_model``): forward reads x twice and writes y (3
   tensors); backward reads x and dy twice and writes dx (5 tensors). GB/s = bytes / median time;
   the device's copy bandwidth (read + write of a 1 GiB copy) in the same table.
3. End to end: torchvision resnet50, bf16 channels_last, one training step (SGD) on one GPU: eager
   with SyncBatchNorm's forced sync path, inductor (unsynced), bnpass (synced, forced), and
   bnpass with kernels="triton" when the budget allows.

Targets (printed against the measurements): BN fwd+bwd >= 85% of copy bandwidth for the large
shapes (x of at least 64 MiB), >= 1.3x eager SyncBatchNorm's kernel path, end to end <= 1.03x
inductor unsynced. Sections that would overrun ``--budget-s`` are reported as skipped.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# ResNet-50's BatchNorm input shapes at batch 64, 224x224 (C, H=W); "large" ones first.
RESNET50_BN = [(64, 112), (64, 56), (256, 56), (128, 56), (128, 28), (512, 28), (256, 28),
               (256, 14), (1024, 14), (512, 14), (512, 7), (2048, 7)]
DEFAULT_SHAPES = {
    "bf16_cl": ["64x64x112x112", "64x256x56x56", "64x512x28x28", "64x1024x14x14", "64x2048x7x7"],
    "fp32_nchw": ["64x64x112x112", "64x2048x7x7"],
}
CONFIGS = {"bf16_cl": (torch.bfloat16, torch.channels_last), "fp32_nchw": (torch.float32, torch.contiguous_format)}
PROVIDERS = ("bnpass-triton", "bnpass-inductor", "inductor", "eager-cudnn", "eager-syncbn-kernels")
LARGE_BYTES = 64 << 20
TARGET_COPY_FRACTION, TARGET_VS_SYNCBN, TARGET_E2E = 0.85, 1.3, 1.03
FP32_TOL, EAGER_MULTIPLIER = 2e-5, 10.0


# ---- pure logic (exercised by --dry-run and tests/test_gpu_check.py) ------------------------------

def parse_shape(text: str) -> tuple[int, ...]:
    dims = tuple(int(d) for d in text.lower().split("x"))
    if len(dims) not in (4, 5) or min(dims) <= 0:
        raise argparse.ArgumentTypeError(f"shape {text!r}: want NxCxHxW or NxCxDxHxW, positive")
    return dims


def bytes_model(shape, dtype: torch.dtype) -> tuple[int, int]:
    """(forward bytes, backward bytes): forward reads x twice and writes y; backward reads x and dy
    twice and writes dx. Per-channel vectors are ignored (C values against N*H*W*C)."""
    size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return 3 * size, 5 * size


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9 if ms and ms > 0 else float("nan")


def format_table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else (f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}")
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def errors(out: dict, ref: dict, eager: dict, fp32: bool) -> list[list]:
    """Rows [quantity, error, scale, eager error, allowed, ok] of ``out`` against float64 ``ref``."""
    rows = []
    for key, r in ref.items():
        r = r.double().cpu()
        scale = float(r.abs().max()) if r.numel() else 0.0
        err = float((out[key].double().cpu() - r).abs().max()) if r.numel() else 0.0
        eager_err = float((eager[key].double().cpu() - r).abs().max()) if r.numel() else 0.0
        allowed = max(FP32_TOL * scale if fp32 else 0.0, EAGER_MULTIPLIER * eager_err, 1e-12)
        rows.append([key, err, scale, eager_err, allowed, "ok" if err <= allowed else "FAIL"])
    return rows


def evaluate_targets(bn_rows: list[dict], copy_gbps: float, e2e: dict) -> list[list]:
    """Rows [target, measured, verdict]. ``bn_rows``: dicts with config, shape, provider, x_bytes,
    total_ms, total_gbps; ``e2e``: variant -> ms per step."""
    out = []
    by = {(r["config"], r["shape"], r["provider"]): r for r in bn_rows}
    for provider in ("bnpass-triton", "bnpass-inductor"):
        large = [r for r in bn_rows if r["provider"] == provider and r["x_bytes"] >= LARGE_BYTES]
        if large and copy_gbps > 0:
            worst = min(r["total_gbps"] / copy_gbps for r in large)
            out.append([f"{provider} fwd+bwd >= {TARGET_COPY_FRACTION:.0%} of copy bandwidth (large shapes)",
                        f"worst {worst:.0%} of {copy_gbps:.0f} GB/s", _verdict(worst >= TARGET_COPY_FRACTION)])
        ratios = []
        for r in bn_rows:
            sync = by.get((r["config"], r["shape"], "eager-syncbn-kernels"))
            if r["provider"] == provider and sync and r["total_ms"] > 0:
                ratios.append(sync["total_ms"] / r["total_ms"])
        if ratios:
            out.append([f"{provider} >= {TARGET_VS_SYNCBN}x eager SyncBatchNorm kernel path (every shape)",
                        f"worst {min(ratios):.2f}x, best {max(ratios):.2f}x", _verdict(min(ratios) >= TARGET_VS_SYNCBN)])
    base = e2e.get("inductor")
    for variant in ("bnpass", "bnpass-triton"):
        if base and e2e.get(variant):
            ratio = e2e[variant] / base
            out.append([f"end to end {variant} <= {TARGET_E2E}x inductor unsynced", f"{ratio:.3f}x",
                        _verdict(ratio <= TARGET_E2E)])
    if e2e.get("inductor-cudagraphs") and e2e.get("bnpass-cudagraphs"):
        ratio = e2e["bnpass-cudagraphs"] / e2e["inductor-cudagraphs"]
        out.append([f"end to end, both in CUDA graphs: bnpass <= {TARGET_E2E}x inductor", f"{ratio:.3f}x",
                    _verdict(ratio <= TARGET_E2E)])
    return out


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def auto_table(bn_rows: list[dict]) -> list[list]:
    """Per (config, shape): the faster of bnpass-triton and bnpass-inductor, for AUTO_RULES."""
    rows = []
    for key in sorted({(r["config"], r["shape"]) for r in bn_rows}):
        t = {r["provider"]: r["total_ms"] for r in bn_rows if (r["config"], r["shape"]) == key}
        if "bnpass-triton" in t and "bnpass-inductor" in t:
            win = "triton" if t["bnpass-triton"] < t["bnpass-inductor"] else "inductor"
            rows.append([key[0], key[1], f"{t['bnpass-triton']:.3f}", f"{t['bnpass-inductor']:.3f}", win])
    return rows


class Report:
    def __init__(self, path: Path):
        self.path, self.parts = path, []

    def add(self, text: str = "") -> None:
        print(text, flush=True)
        self.parts.append(text)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n".join(self.parts) + "\n")


# ---- the conv-BN model and its reference ---------------------------------------------------------

class ConvBN(nn.Module):
    """conv-BN-ReLU, conv-BN + residual, ReLU: the BN forms a CNN has (ReLU folded or not)."""

    def __init__(self, c=16):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        a = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(a)) + a)


def build_model(device, dtype, memory_format):
    torch.manual_seed(0)
    model = ConvBN()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    return model.to(device=device, dtype=dtype, memory_format=memory_format)


def global_batch(device, n=8, hw=12):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, hw, hw, generator=g, dtype=torch.float64) * 2 + 0.5
    dy = torch.randn(n, 16, hw, hw, generator=g, dtype=torch.float64)
    return x.to(device), dy.to(device)


def run_step(model, fn, x, dy, dtype, memory_format) -> dict:
    """One forward/backward; output, input grad, param grads and running stats as float64 CPU."""
    x = x.to(dtype=dtype, memory_format=memory_format).detach().requires_grad_()
    y = fn(x)
    y.backward(dy.to(dtype=dtype, memory_format=memory_format))
    out = {"y": y.detach(), "dx": x.grad}
    out.update({f"grad:{n}": p.grad for n, p in model.named_parameters()})
    out.update({f"buf:{n}": b for n, b in model.named_buffers() if "running" in n})
    return {k: v.detach().double().cpu() for k, v in out.items()}


def reference(device, x, dy) -> dict:
    model = build_model(device, torch.float64, torch.contiguous_format)
    return run_step(model, model, x, dy, torch.float64, torch.contiguous_format)


# ---- GPU sections ---------------------------------------------------------------------------------

def _compile_bnpass(model, group, kernels, **options):
    import bnpass

    bnpass.register()
    return torch.compile(model, backend="bnpass", dynamic=False,
                         options={"force_sync": True, "process_group": group, "kernels": kernels, **options})


E2E_VARIANTS = ("eager-syncbn", "inductor", "bnpass", "bnpass-triton", "bnpass-unscheduled",
                "inductor-cudagraphs", "bnpass-cudagraphs")
DEFAULT_E2E = ("eager-syncbn", "inductor", "bnpass", "bnpass-triton")


def _e2e_model(variant, model, group):
    """What section 3 runs for ``variant``: the model itself or a compiled one."""
    if variant == "eager-syncbn":
        ForcedSyncBatchNorm.group = group
        for m in model.modules():
            if type(m) is nn.BatchNorm2d:
                m.__class__ = ForcedSyncBatchNorm
        return model
    if variant == "inductor":
        return torch.compile(model, backend="inductor")
    if variant == "inductor-cudagraphs":
        return torch.compile(model, backend="inductor", mode="reduce-overhead")
    if variant == "bnpass-unscheduled":  # no packing, no overlap (bnpass/schedule.py)
        return _compile_bnpass(model, group, "inductor", pack_collectives=False, overlap=False)
    if variant == "bnpass-cudagraphs":
        return _compile_bnpass(model, group, "inductor", inductor_config={"triton.cudagraphs": True})
    return _compile_bnpass(model, group, "triton" if variant == "bnpass-triton" else "inductor")


def _profile(report, variant, step) -> None:
    """The ops that cost most host and device time in 3 steps of ``variant``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    for key in ("self_cpu_time_total", "self_device_time_total", "self_cuda_time_total"):
        try:
            table = averages.table(sort_by=key, row_limit=15, max_name_column_width=60)
        except Exception:  # noqa: BLE001 - the key's name differs across torch versions
            continue
        report.add(f"### profile of {variant}, 3 steps, by {key}\n```\n{table}\n```")


def correctness_ws1(report, group):
    device = torch.device("cuda")
    x, dy = global_batch(device)
    ref = reference(device, x, dy)
    rows = []
    for cfg, (dtype, fmt) in CONFIGS.items():
        eager_model = build_model(device, dtype, fmt)
        eager = run_step(eager_model, eager_model, x, dy, dtype, fmt)
        for kernels in ("inductor", "triton"):
            torch._dynamo.reset()
            model = build_model(device, dtype, fmt)
            out = run_step(model, _compile_bnpass(model, group, kernels), x, dy, dtype, fmt)
            rows += [[f"{cfg} kernels={kernels}"] + r for r in errors(out, ref, eager, dtype == torch.float32)]
    report.add(format_table(["case", "quantity", "error", "scale", "eager error", "allowed", "verdict"], rows))
    return all(r[-1] == "ok" for r in rows)


def correctness_cudagraphs(report, group):
    """CUDA graphs (what mode="reduce-overhead" turns on; torch.compile refuses mode= together with
    options=, so it goes through inductor_config): the synced step is captured and replayed, the
    compiled graphs hold no host-sync op, and Inductor skipped no graph for cudagraphs."""
    import bnpass

    device = torch.device("cuda")
    x, dy = global_batch(device)
    ref = reference(device, x, dy)
    dtype, fmt = torch.float32, torch.contiguous_format
    eager_model = build_model(device, dtype, fmt)
    eager = run_step(eager_model, eager_model, x, dy, dtype, fmt)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    bnpass.clear_records()
    model = build_model(device, dtype, fmt)
    compiled = torch.compile(model, backend="bnpass", options={
        "force_sync": True, "process_group": group, "inductor_config": {"triton.cudagraphs": True}})
    for _ in range(3):  # warm-up, record, replay
        model.zero_grad(set_to_none=True)
        out = run_step(model, compiled, x, dy, dtype, fmt)
    # the running statistics moved three steps; outputs and input gradients are the one-step ones
    rows = [["cudagraphs fp32 NCHW"] + r for r in errors(out, ref, eager, True) if r[0] in ("y", "dx")]
    skips = sum(v for k, v in torch._dynamo.utils.counters["inductor"].items() if "cudagraph_skip" in k)
    syncs = sum(sum(r.host_syncs.values()) for r in bnpass.compile_records())
    rows.append(["cudagraphs fp32 NCHW", "cudagraph skips", skips, "", "", 0, "ok" if skips == 0 else "FAIL"])
    rows.append(["cudagraphs fp32 NCHW", "host-sync ops", syncs, "", "", 0, "ok" if syncs == 0 else "FAIL"])
    report.add(format_table(["case", "quantity", "error", "scale", "eager error", "allowed", "verdict"], rows))
    return all(r[-1] == "ok" for r in rows)


def _rank_job(rank, world, store_path, result_dir):
    import torch.distributed as dist

    torch.cuda.set_device(0)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    device = torch.device("cuda")
    x, dy = global_batch(device)
    per = x.shape[0] // world
    sl = slice(rank * per, (rank + 1) * per)
    results = {}
    for cfg, (dtype, fmt) in CONFIGS.items():
        for kernels in ("inductor", "triton"):
            torch._dynamo.reset()
            model = build_model(device, dtype, fmt)
            compiled = torch.compile(model, backend="bnpass", dynamic=False, options={"kernels": kernels})
            results[(cfg, kernels)] = run_step(model, compiled, x[sl], dy[sl], dtype, fmt)
    torch.save(results, os.path.join(result_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _entry(rank, world, store_path, result_dir):
    import bnpass

    bnpass.register()
    _rank_job(rank, world, store_path, result_dir)


def correctness_two_ranks(report, timeout_s):
    import torch.multiprocessing as mp

    device = torch.device("cuda")
    x, dy = global_batch(device)
    ref = reference(device, x, dy)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_entry, args=(r, 2, os.path.join(tmp, "store"), tmp)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout_s)
        if any(p.is_alive() or p.exitcode != 0 for p in procs):
            for p in procs:
                if p.is_alive():
                    p.kill()
            report.add(f"2-rank gloo run FAILED: exit codes {[p.exitcode for p in procs]}")
            return False
        per_rank = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    rows = []
    for cfg, (dtype, fmt) in CONFIGS.items():
        eager_model = build_model(device, dtype, fmt)
        eager = run_step(eager_model, eager_model, x, dy, dtype, fmt)
        for kernels in ("inductor", "triton"):
            a, b = per_rank[0][(cfg, kernels)], per_rank[1][(cfg, kernels)]
            merged = {k: (torch.cat([a[k], b[k]]) if k in ("y", "dx") else a[k] + b[k] if k.startswith("grad:")
                          else a[k]) for k in a}
            rows += [[f"{cfg} kernels={kernels}"] + r for r in errors(merged, ref, eager, dtype == torch.float32)]
            for k in a:  # running statistics must be identical on both ranks: synced
                if k.startswith("buf:"):
                    diff = float((a[k] - b[k]).abs().max())
                    rows.append([f"{cfg} kernels={kernels}", f"{k} rank0-rank1", diff, "", "", 0.0,
                                 "ok" if diff == 0 else "FAIL"])
    report.add(format_table(["case", "quantity", "error", "scale", "eager error", "allowed", "verdict"], rows))
    return all(r[-1] == "ok" for r in rows)


def timer(device_is_cuda: bool):
    """A function (fn, reps) -> median ms; on CUDA with events and an L2 flush before each rep."""
    if not device_is_cuda:
        def cpu_time(fn, reps=5):
            fn()
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
            return statistics.median(times)
        return cpu_time
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")

    def cuda_time(fn, reps=20):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        events = []
        for _ in range(reps):
            flush.zero_()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            events.append((s, e))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events)
    return cuda_time


def copy_bandwidth(device, nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(device.type == "cuda")(lambda: dst.copy_(src), 10)
    return gbps(2 * src.numel(), ms)


def bn_providers(shape, dtype, fmt, device, group, names):
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
            fn = _compile_bnpass(bn, group, name.split("-")[1])
        out[name] = (bn, fn)
    return out


def bn_section(report, args, group, device, deadline) -> list[dict]:
    measure = timer(device.type == "cuda")
    rows = []
    skipped = []
    for cfg, shapes in args.shapes.items():
        dtype, fmt = CONFIGS[cfg]
        for shape in shapes:
            if time.monotonic() > deadline:
                skipped.append(f"{cfg} {'x'.join(map(str, shape))}")
                continue
            g = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(shape, generator=g, device=device).to(dtype=dtype, memory_format=fmt).requires_grad_()
            dy = torch.randn(shape, generator=g, device=device).to(dtype=dtype, memory_format=fmt)
            fwd_b, bwd_b = bytes_model(shape, dtype)
            y_ref = dx_ref = None
            names = sorted(args.providers, key=lambda n: n != "eager-cudnn")  # the baseline first
            for name, (bn, fn) in bn_providers(shape, dtype, fmt, device, group, names).items():
                try:
                    params = [x, bn.weight, bn.bias]
                    fwd_ms = measure(lambda: fn(x))
                    tot_ms = measure(lambda: torch.autograd.grad(fn(x), params, dy))
                    y = fn(x)
                    dx = torch.autograd.grad(y, params, dy)[0]
                    y = y.detach()
                    if y_ref is None:
                        y_ref, dx_ref = y.detach().float(), dx.float()
                    dev = max(float((y.float() - y_ref).abs().max()), float((dx.float() - dx_ref).abs().max()))
                    rows.append({"config": cfg, "shape": "x".join(map(str, shape)), "provider": name,
                                 "x_bytes": fwd_b // 3, "fwd_ms": fwd_ms, "bwd_ms": tot_ms - fwd_ms,
                                 "total_ms": tot_ms, "fwd_gbps": gbps(fwd_b, fwd_ms),
                                 "bwd_gbps": gbps(bwd_b, tot_ms - fwd_ms), "total_gbps": gbps(fwd_b + bwd_b, tot_ms),
                                 "max_dev": dev})
                except Exception as e:  # noqa: BLE001 - one provider failing must not hide the others
                    report.add(f"{cfg} {shape} {name}: FAILED {type(e).__name__}: {str(e)[:300]}")
    if skipped:
        report.add(f"skipped for the time budget: {', '.join(skipped)}")
    return rows


def bn_table(rows, copy_gbps) -> str:
    headers = ["config", "shape", "provider", "fwd ms", "fwd GB/s", "bwd ms", "bwd GB/s", "fwd+bwd ms",
               "fwd+bwd GB/s", "% of copy", "max abs diff of y, dx vs the first provider (eager-cudnn)"]
    body = [[r["config"], r["shape"], r["provider"], r["fwd_ms"], r["fwd_gbps"], r["bwd_ms"], r["bwd_gbps"],
             r["total_ms"], r["total_gbps"], f"{r['total_gbps'] / copy_gbps:.0%}" if copy_gbps else "n/a",
             r["max_dev"]] for r in rows]
    return format_table(headers, body)


class ForcedSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training forward is SyncBatchNorm's kernel path even on one rank."""

    group = None

    def forward(self, x):
        from torch.nn.modules._functions import SyncBatchNorm as SyncBNFn

        if not self.training:
            return super().forward(x)
        return SyncBNFn.apply(x, self.weight, self.bias, self.running_mean, self.running_var, self.eps,
                              self.momentum, self.group, 1)


def e2e_section(report, args, group, deadline) -> dict:
    import torchvision

    device = torch.device("cuda")
    batch = args.e2e_batch
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(batch, 3, 224, 224, generator=g, device=device).to(
        dtype=torch.bfloat16, memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (batch,), generator=g, device=device)
    measure = timer(True)
    results, rows = {}, []
    for variant in args.e2e_variants:
        if time.monotonic() > deadline - (10 if variant == "eager-syncbn" else 60):
            rows.append([variant, "skipped (time budget)", ""])
            continue
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = torchvision.models.resnet50().to(device=device, dtype=torch.bfloat16,
                                                 memory_format=torch.channels_last)
        fn = _e2e_model(variant, model, group)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step():
            loss = F.cross_entropy(fn(images).float(), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        try:
            start = time.monotonic()
            step()
            torch.cuda.synchronize()
            first_s = time.monotonic() - start
            results[variant] = measure(step, args.e2e_steps)
            rows.append([variant, results[variant], f"{first_s:.1f}"])
            if variant in args.profile and time.monotonic() < deadline - 30:
                _profile(report, variant, step)
        except Exception as e:  # noqa: BLE001
            rows.append([variant, f"FAILED {type(e).__name__}: {str(e)[:200]}", ""])
    report.add(format_table(["variant", "ms per step (median)", "first step s (compile)"], rows))
    return results


# ---- driver ---------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "gpu_results.md")
    p.add_argument("--budget-s", type=float, default=290.0, help="wall-clock budget; later items skip")
    p.add_argument("--dry-run", action="store_true", help="no GPU: CPU-side logic on tiny shapes")
    p.add_argument("--sections", default="1,2,3", help="comma-separated: 1 correctness, 2 BN, 3 e2e")
    p.add_argument("--bf16-cl-shapes", type=parse_shape, nargs="*", default=None)
    p.add_argument("--fp32-nchw-shapes", type=parse_shape, nargs="*", default=None)
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--e2e-batch", type=int, default=64)
    p.add_argument("--e2e-steps", type=int, default=10)
    p.add_argument("--e2e-variants", default=",".join(DEFAULT_E2E),
                   help=f"comma-separated, from {', '.join(E2E_VARIANTS)}")
    p.add_argument("--profile", default="", help="comma-separated e2e variants to profile (3 steps)")
    args = p.parse_args(argv)
    args.sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    args.providers = [s.strip() for s in args.providers.split(",") if s.strip()]
    args.e2e_variants = [s.strip() for s in args.e2e_variants.split(",") if s.strip()]
    args.profile = {s.strip() for s in args.profile.split(",") if s.strip()}
    bad_e2e = sorted((set(args.e2e_variants) | args.profile) - set(E2E_VARIANTS))
    if bad_e2e:
        p.error(f"unknown e2e variants {bad_e2e}; valid: {', '.join(E2E_VARIANTS)}")
    bad = sorted(set(args.providers) - set(PROVIDERS))
    if bad:
        p.error(f"unknown providers {bad}; valid: {', '.join(PROVIDERS)}")
    args.shapes = {
        "bf16_cl": args.bf16_cl_shapes if args.bf16_cl_shapes is not None
        else [parse_shape(s) for s in DEFAULT_SHAPES["bf16_cl"]],
        "fp32_nchw": args.fp32_nchw_shapes if args.fp32_nchw_shapes is not None
        else [parse_shape(s) for s in DEFAULT_SHAPES["fp32_nchw"]],
    }
    return args


def dry_run(args, report) -> int:
    """Everything that needs no GPU: the reference comparison, the timer, bytes model and tables."""
    report.add("## DRY RUN on the CPU: no GPU figures here; the real ones come from a run on a GPU")
    device = torch.device("cpu")
    x, dy = global_batch(device)
    ref = reference(device, x, dy)
    model = build_model(device, torch.float32, torch.contiguous_format)
    out = run_step(model, model, x, dy, torch.float32, torch.contiguous_format)
    # eager := the reference itself, so "allowed" is the fp32 bound 2e-5 x scale alone: a real check
    rows = [["fp32_nchw eager (cpu)"] + r for r in errors(out, ref, ref, True)]
    report.add("### Reference comparison (eager fp32 on the CPU vs float64, bound 2e-5 x scale)")
    report.add(format_table(["case", "quantity", "error", "scale", "eager error", "allowed", "verdict"], rows))
    args.shapes = {"bf16_cl": [(2, 8, 6, 6)], "fp32_nchw": [(2, 8, 6, 6)]}
    args.providers = ["eager-cudnn"]
    copy = copy_bandwidth(device, 64 << 20)
    bn_rows = bn_section(report, args, None, device, time.monotonic() + 60)
    report.add("### BN table (CPU eager BN, tiny shape)")
    report.add(f"copy bandwidth (cpu, 64 MiB): {copy:.1f} GB/s")
    report.add(bn_table(bn_rows, copy))
    report.add("### Targets (evaluated on the CPU rows: meaningless as figures)")
    report.add(format_table(["target", "measured", "verdict"], evaluate_targets(bn_rows, copy, {})))
    return 0 if all(r[-1] == "ok" for r in rows) and bn_rows else 1


def main(argv=None) -> int:
    args = parse_args(argv)
    report = Report(args.out)
    started = time.monotonic()
    deadline = started + args.budget_s
    report.add(f"# bnpass GPU check ({time.strftime('%Y-%m-%d %H:%M:%S')})")
    report.add(f"torch {torch.__version__}, python {sys.version.split()[0]}")
    if args.dry_run:
        return dry_run(args, report)
    if not torch.cuda.is_available():
        report.add("no CUDA device: nothing measured (use --dry-run to check the CPU-side logic)")
        return 2
    import torch.distributed as dist
    import triton

    import bnpass

    bnpass.register()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    report.add(f"device {torch.cuda.get_device_name()}, triton {triton.__version__}, "
               f"budget {args.budget_s:.0f} s")
    store = tempfile.NamedTemporaryFile(prefix="bnpass-gpu-check-", delete=False).name
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    group = dist.group.WORLD
    ok = True
    try:
        if "1" in args.sections:
            for title, fn in (("## 1a. Correctness: world-size-1 NCCL group, force_sync", lambda: correctness_ws1(report, group)),
                              ("## 1b. CUDA graphs: captured synced step, no host sync",
                               lambda: correctness_cudagraphs(report, group)),
                              ("## 1c. Correctness: 2 ranks on one GPU over gloo",
                               lambda: correctness_two_ranks(report, max(60.0, deadline - time.monotonic() - 150)))):
                report.add(title)
                try:
                    ok = fn() and ok
                except Exception:  # noqa: BLE001
                    ok = False
                    report.add("FAILED:\n```\n" + traceback.format_exc()[-3000:] + "\n```")
        bn_rows, copy, e2e = [], 0.0, {}
        if "2" in args.sections:
            report.add("## 2. BatchNorm forward+backward, ResNet-50 shapes")
            report.add("bytes model: forward = 3 x |x| (read x twice, write y), backward = 5 x |x| (read x "
                       "and dy twice, write dx), |x| in x's dtype; GB/s = bytes / median time (L2 flushed)")
            copy = copy_bandwidth(torch.device("cuda"))
            report.add(f"measured copy bandwidth (1 GiB device-to-device, read+write): {copy:.0f} GB/s")
            bn_rows = bn_section(report, args, group, torch.device("cuda"),
                                 started + args.budget_s * (0.6 if "3" in args.sections else 0.95))
            report.add(bn_table(bn_rows, copy))
            report.add("### auto table (faster of the two bnpass kernel choices; feed into "
                       "backends/triton_bn_op.py AUTO_RULES)")
            report.add(format_table(["config", "shape", "triton ms", "inductor ms", "faster"], auto_table(bn_rows)))
        if "3" in args.sections:
            report.add("## 3. End to end: resnet50, bf16 channels_last, one training step")
            e2e = e2e_section(report, args, group, deadline)
        report.add("## Targets")
        report.add(format_table(["target", "measured", "verdict"], evaluate_targets(bn_rows, copy, e2e)))
        report.add(f"correctness: {'all ok' if ok else 'FAILURES above'}; "
                   f"total {time.monotonic() - started:.0f} s")
    finally:
        dist.destroy_process_group()
        os.unlink(store)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
