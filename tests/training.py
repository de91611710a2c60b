"""One training protocol, run by every rank (compiled, synced) and by the float64 reference
(eager, one process, the concatenated global batch): forward, loss sum(y * w), backward (with
gradient accumulation over ``spec.accumulate`` passes), gradients summed over ranks (by hand, or by
DDP and scaled back from its average), SGD step; outputs and input gradients recorded per pass,
gradients per optimizer step, buffers at the end."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from tests.models import Spec, memory_format


def train(spec: Spec, model, forward, rank: int | None = None, ddp=None, float64: bool = True,
          group=None) -> dict:
    """``rank`` None: one process on the global batch, in float64 unless ``float64`` is false.
    Otherwise this rank's slice (``rank``: its place in ``group``, whose ranks' batches make up the
    spec's global batch and over which gradients are summed; default: the default group).
    ``ddp``: the DistributedDataParallel module that averages this rank's gradients."""
    reference = rank is None
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = {"y": [], "dx": [], "grads": [], "buffers": None}
    for step in range(spec.steps):
        x = spec.batch(step)
        if reference:
            x = x.double() if float64 else x
        else:
            x = spec.local(x, rank, step)
        x = x.contiguous(memory_format=memory_format(spec.memory_format)) if x.dim() >= 4 else x
        x = x.detach().requires_grad_()
        last_pass = (step + 1) % spec.accumulate == 0
        with ddp.no_sync() if ddp is not None and not last_pass else contextlib.nullcontext():
            y = forward(x)
            w = spec.loss_weights(step, y.shape)
            if reference:
                w = w.double() if float64 else w
            else:
                w = spec.local(w, rank, step)
            (y.to(w.dtype) * w).sum().backward()
        out["y"].append(y.detach().clone())
        out["dx"].append(x.grad.clone())
        if not last_pass:
            continue
        if not reference and dist.is_initialized():
            for p in model.parameters():
                if p.grad is None:
                    continue
                if ddp is not None:
                    p.grad.mul_(dist.get_world_size(group))  # DDP averaged; the reference sums
                else:
                    dist.all_reduce(p.grad, group=group)
        out["grads"].append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
        opt.zero_grad()
    out["buffers"] = {n: b.clone() for n, b in model.named_buffers()}
    return out


def reference(spec: Spec) -> dict:
    model = spec.build(torch.float64)
    for module in model.modules():  # see CheckpointedNet: eager recompute updates BN stats twice
        if hasattr(module, "use_checkpoint"):
            module.use_checkpoint = False
    return train(spec, model, model, None)
