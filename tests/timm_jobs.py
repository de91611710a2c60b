"""Rank-side job of tests/test_timm_train.py: timm's train.py, unmodified, run as torchrun would run
it (``runpy`` as ``__main__``, torchrun's variables; the script makes its own gloo group), with
``--torchcompile bnpass``. The job only observes: it wraps timm's ``create_model``, ``create_loader``
and ``create_optimizer_v2`` (as timm's own tests replace ``create_model``) to keep the model, the
training batches each rank saw and the gradients each optimizer step used, and applies one named
patch where timm fails on the CPU (``PATCHES``)."""

from __future__ import annotations

import runpy
import sys
from unittest import mock

import torch
import torch.distributed as dist

import bnpass
from tests.lightning_jobs import _torchrun_environment
from tests.rank_jobs import graph_breaks

# Where timm's train.py fails on the CPU in a distributed run, and what the job changes there.
PATCHES = {
    "ddp_cpu_device_ids": "train.py wraps the model in DistributedDataParallel(model, device_ids=[device]); "
                          "DDP refuses device_ids for a CPU module, so they are dropped when they name the CPU",
}


class _CPUDistributedDataParallel(torch.nn.parallel.DistributedDataParallel):
    """PATCHES["ddp_cpu_device_ids"]."""

    used = False

    def __init__(self, module, device_ids=None, *args, **kwargs):
        if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
            type(self).used = True
            device_ids = None
        super().__init__(module, device_ids, *args, **kwargs)


class _RecordingLoader:
    """timm's loader as it is, keeping each batch it yields."""

    def __init__(self, loader, batches: list):
        self._loader, self._batches = loader, batches

    def __len__(self):
        return len(self._loader)

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def __iter__(self):
        for x, y in self._loader:
            self._batches.append((x.detach().clone(), y.detach().clone()))
            yield x, y


def run_train_py(rank: int, world_size: int, script: str, argv: list[str]) -> dict:
    import timm.data
    import timm.models
    import timm.optim

    _torchrun_environment(rank, world_size)
    dist.destroy_process_group()  # the script initialises its own from torchrun's variables
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    bnpass.clear_records()
    seen: dict = {"batches": [], "steps": []}
    real_model, real_loader, real_optimizer = (timm.models.create_model, timm.data.create_loader,
                                               timm.optim.create_optimizer_v2)

    def create_model(*args, **kwargs):
        model = real_model(*args, **kwargs)
        seen.update(model=model, model_args=(args, kwargs),
                    initial={k: v.detach().clone() for k, v in model.state_dict().items()})
        return model

    def create_loader(*args, **kwargs):
        loader = real_loader(*args, **kwargs)
        return _RecordingLoader(loader, seen["batches"]) if kwargs.get("is_training") else loader

    def create_optimizer_v2(model, *args, **kwargs):
        optimizer = real_optimizer(model, *args, **kwargs)
        seen["optimizer_args"] = (args, kwargs)
        names = {id(p): n for n, p in seen["model"].named_parameters()}

        def keep(opt, a, kw):
            seen["steps"].append({"lr": [g["lr"] for g in opt.param_groups],
                                  "grads": {names[id(p)]: p.grad.detach().clone()
                                            for g in opt.param_groups for p in g["params"] if p.grad is not None}})
        optimizer.register_step_pre_hook(keep)
        return optimizer

    with mock.patch("timm.models.create_model", create_model), \
            mock.patch("timm.data.create_loader", create_loader), \
            mock.patch("timm.optim.create_optimizer_v2", create_optimizer_v2), \
            mock.patch("torch.nn.parallel.DistributedDataParallel", _CPUDistributedDataParallel), \
            mock.patch.object(sys, "argv", [script, *argv]):
        runpy.run_path(script, run_name="__main__")
    model = seen["model"]
    return {"initial": seen["initial"], "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "model_args": seen["model_args"], "optimizer_args": seen["optimizer_args"],
            "batches": seen["batches"], "steps": seen["steps"],
            "patches": ["ddp_cpu_device_ids"] if _CPUDistributedDataParallel.used else [],
            "records": [r.to_json() for r in bnpass.compile_records()], "graph_breaks": graph_breaks(),
            "graph_break_reasons": {k[:400]: v for k, v in torch._dynamo.utils.counters["graph_break"].items()},
            "initialized_after": dist.is_initialized()}


def reference(per_rank: list[dict], float64: bool = True) -> dict:
    """The script's model and optimizer in one process on the ranks' concatenated batches (rank 0's,
    then rank 1's), from rank 0's initial weights (DDP copies them to every rank), cross-entropy
    over the global batch (the mean of the ranks' equal-sized means, as DDP averages), the lr each
    step used."""
    import timm.models
    import timm.optim

    args, kwargs = per_rank[0]["model_args"]
    model = timm.models.create_model(*args, **kwargs)
    model.load_state_dict(per_rank[0]["initial"])
    model.to(torch.float64 if float64 else torch.float32)
    opt_args, opt_kwargs = per_rank[0]["optimizer_args"]
    opt = timm.optim.create_optimizer_v2(model, *opt_args, **opt_kwargs)
    model.train()
    out = {"grads": []}
    for step, recorded in enumerate(per_rank[0]["steps"]):
        x = torch.cat([r["batches"][step][0] for r in per_rank]).to(next(model.parameters()).dtype)
        y = torch.cat([r["batches"][step][1] for r in per_rank])
        torch.nn.functional.cross_entropy(model(x), y).backward()
        out["grads"].append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        for group, lr in zip(opt.param_groups, recorded["lr"]):
            group["lr"] = lr
        opt.step()
        opt.zero_grad()
    out["state"] = {k: v.detach() for k, v in model.state_dict().items()}
    return out
