"""Rank-side job of tests/test_lightning.py: ``trainer.fit`` with Lightning's DDP strategy on 2 CPU
processes, as torchrun would start them (the harness made the gloo group; Lightning finds it and
the torchelastic environment variables, and launches nothing itself)."""

from __future__ import annotations

import os
import socket
import tempfile

import torch
import torch.distributed as dist

import bnpass
from tests.models import Spec
from tests.rank_jobs import graph_breaks


def _torchrun_environment(rank: int, world_size: int) -> None:
    """What torchrun exports; the port is rank 0's pick (only used if Lightning re-initialises)."""
    port = [0]
    if rank == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port[0] = s.getsockname()[1]
    dist.broadcast_object_list(port, src=0)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0",
                       "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size),
                       "TORCHELASTIC_RUN_ID": "bnpass-test", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port[0])})


def lightning_module(spec: Spec, world_size: int):
    """A LightningModule around the spec's model: loss sum(y * w), scaled by the world size so
    that DDP's average of the ranks' gradients is their sum, as the float64 reference takes it
    (tests/training.py); SGD with the reference's learning rate."""
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = spec.build()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, w = batch
            return (self(x) * w).sum() * world_size

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Module()


def _batches(spec: Spec, rank: int) -> list:
    """This rank's slice of the spec's global batch, one per step (no sampler: the split is the
    reference's)."""
    with torch.no_grad():
        out_shape = spec.build()(spec.batch(0)).shape
    out = []
    for step in range(spec.steps):
        x = spec.local(spec.batch(step), rank, step)
        out.append((x, spec.local(spec.loss_weights(step, out_shape), rank, step)))
    return out


def _fit(spec: Spec, rank: int, module, **trainer_kwargs) -> dict:
    import lightning.pytorch as pl

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    bnpass.clear_records()
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=spec.steps,
                             enable_checkpointing=False, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, use_distributed_sampler=False,
                             default_root_dir=root, **trainer_kwargs)
        loader = torch.utils.data.DataLoader(_batches(spec, rank), batch_size=None)
        trainer.fit(module, loader)
    return {"state": {k: v.clone() for k, v in module.net.state_dict().items()},
            "steps": trainer.global_step,
            "records": [r.to_json() for r in bnpass.compile_records()],
            "graph_breaks": graph_breaks(),
            "graph_break_reasons": {k[:400]: v for k, v in torch._dynamo.utils.counters["graph_break"].items()}}


def fit_cases(rank: int, world_size: int, spec: Spec) -> dict:
    """compiled: trainer.fit(torch.compile(module, backend="bnpass")); plugin:
    Trainer(plugins=[bnpass.lightning.SyncBatchNorm()]).fit(module), and what revert left;
    stock_sync_batchnorm: Lightning's own Trainer(sync_batchnorm=True) on the CPU (its error)."""
    import lightning.pytorch as pl  # noqa: F401 - fail here, not in the middle, without Lightning

    _torchrun_environment(rank, world_size)
    out = {}
    module = lightning_module(spec, world_size)
    out["compiled"] = _fit(spec, rank, torch.compile(module, backend="bnpass"))

    module = lightning_module(spec, world_size)
    plain_step = module.training_step
    out["plugin"] = _fit(spec, rank, module, plugins=[bnpass.lightning.SyncBatchNorm()])
    out["plugin"]["reverted"] = module._compiler_ctx is None and module.training_step == plain_step

    try:
        _fit(spec, rank, lightning_module(spec, world_size), sync_batchnorm=True)
        out["stock_sync_batchnorm"] = None
    except Exception as e:  # noqa: BLE001 - the test reads it
        out["stock_sync_batchnorm"] = f"{type(e).__name__}: {e}"
    return out
