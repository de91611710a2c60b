"""Section 1: compiled bnpass against a float64 reference of a conv-BN model, on CUDA.

(a) a world-size-1 NCCL group with ``force_sync`` (the collective runs), fp32 NCHW and bf16
channels_last, kernels "inductor" and "triton"; (b) the same step captured in CUDA graphs
(``inductor_config={"triton.cudagraphs": True}``, what mode="reduce-overhead" sets): no host-sync op,
no cudagraph skip; (c) 2 ranks sharing the GPU over gloo, really synced. A quantity passes if its
error is within 2e-5 of its largest value (fp32) or within 10x the error eager PyTorch makes in the
same dtype (as tests/checks.py judges).
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import CONFIGS, format_table

FP32_TOL, EAGER_MULTIPLIER = 2e-5, 10.0
ERROR_HEADERS = ["case", "quantity", "error", "scale", "eager error", "allowed", "verdict"]


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


def compile_bnpass(model, group, kernels, **options):
    import bnpass

    bnpass.register()
    return torch.compile(model, backend="bnpass", dynamic=False,
                         options={"force_sync": True, "process_group": group, "kernels": kernels, **options})


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
            out = run_step(model, compile_bnpass(model, group, kernels), x, dy, dtype, fmt)
            rows += [[f"{cfg} kernels={kernels}"] + r for r in errors(out, ref, eager, dtype == torch.float32)]
    report.add(format_table(ERROR_HEADERS, rows))
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
    report.add(format_table(ERROR_HEADERS, rows))
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
    report.add(format_table(ERROR_HEADERS, rows))
    return all(r[-1] == "ok" for r in rows)
