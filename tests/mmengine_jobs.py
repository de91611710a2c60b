"""Rank-side job of tests/test_mmengine.py: mmengine's Runner (``launcher="pytorch"``, as torchrun
starts it: the harness made the gloo group and exports torchrun's variables) training a small
segmenter built from mmengine's registry, with the README's config and CPU workaround executed as
written.

The model is an MMSegmentation-shaped encoder-decoder: a backbone whose norm layers come from
``norm_cfg=dict(type="BN")``, a decode head from ``dict(type="SyncBN")`` (the names mmcv registers
in mmengine's ``MODELS``: ``nn.BatchNorm2d`` and ``nn.SyncBatchNorm``; mmcv itself is a compiled
package and not installed here, so the job registers the two names as ``mmcv.cnn`` does), a 1x1
classifier, bilinear upsampling and a per-pixel cross-entropy."""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import bnpass
from tests.lightning_jobs import _torchrun_environment
from tests.rank_jobs import graph_breaks

README = Path(__file__).resolve().parent.parent / "README.md"
CLASSES, SIZE, PER_RANK = 3, 8, 2


def readme_block(first_line: str) -> str:
    """The README's python block whose first line is ``first_line``."""
    for body in re.findall(r"^```python\n(.*?)^```", README.read_text(), re.M | re.S):
        if body.startswith(first_line):
            return body
    raise AssertionError(f"README.md has no python block starting {first_line!r}")


def conv_norm(cin: int, cout: int, norm_cfg: dict, stride: int = 1) -> nn.Sequential:
    from mmengine.registry import MODELS

    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                         MODELS.build(dict(norm_cfg, num_features=cout)), nn.ReLU())


def register() -> None:
    """The norm names mmcv registers, the segmenter, its data and its metric (once per process)."""
    from mmengine.dataset import default_collate  # noqa: F401 - registers the collate function
    from mmengine.evaluator import BaseMetric
    from mmengine.model import BaseModel
    from mmengine.registry import DATASETS, METRICS, MODELS

    if "TinySegmenter" in MODELS.module_dict:
        return
    MODELS.register_module("BN", module=nn.BatchNorm2d)
    MODELS.register_module("SyncBN", module=nn.SyncBatchNorm)

    @MODELS.register_module()
    class TinySegmenter(BaseModel):
        def __init__(self, norm_cfg: dict, head_norm_cfg: dict):
            super().__init__()
            self.backbone = nn.Sequential(conv_norm(3, 8, norm_cfg), conv_norm(8, 16, norm_cfg, stride=2))
            self.decode_head = conv_norm(16, 8, head_norm_cfg)
            self.classifier = nn.Conv2d(8, CLASSES, 1)

        def forward(self, inputs, data_samples=None, mode="tensor"):
            logits = F.interpolate(self.classifier(self.decode_head(self.backbone(inputs))),
                                   size=inputs.shape[-2:], mode="bilinear", align_corners=False)
            if mode == "loss":
                return {"loss_seg": F.cross_entropy(logits, data_samples)}
            if mode == "predict":
                return [{"pred": p.argmax(0), "gt": t} for p, t in zip(logits, data_samples)]
            return logits

    @DATASETS.register_module()
    class SyntheticScenes(torch.utils.data.Dataset):
        """Image i and its label map from seed i; image i shifted by i % 4 (ranks see different
        distributions)."""

        def __len__(self):
            return 32

        def __getitem__(self, i):
            return sample(i)

    @METRICS.register_module()
    class PixelAccuracy(BaseMetric):
        def process(self, data_batch, data_samples):
            self.results += [float((d["pred"] == d["gt"]).float().mean()) for d in data_samples]

        def compute_metrics(self, results):
            return {"pixel_accuracy": sum(results) / len(results)}


def sample(i: int) -> dict:
    g = torch.Generator().manual_seed(i)
    return {"inputs": torch.randn(3, SIZE, SIZE, generator=g) + (i % 4),
            "data_samples": torch.randint(0, CLASSES, (SIZE, SIZE), generator=g)}


def base_config(work_dir: str, iters: int) -> dict:
    """Everything but the README's lines: the model, data, schedule, launcher."""
    loader = dict(dataset=dict(type="SyntheticScenes"), batch_size=PER_RANK, num_workers=0,
                  sampler=dict(type="DefaultSampler", shuffle=False), collate_fn=dict(type="default_collate"))
    return dict(model=dict(type="TinySegmenter", norm_cfg=dict(type="BN"), head_norm_cfg=dict(type="SyncBN")),
                work_dir=work_dir, train_dataloader=loader, val_dataloader=dict(loader, batch_size=4),
                val_evaluator=dict(type="PixelAccuracy"), val_cfg=dict(),
                train_cfg=dict(by_epoch=False, max_iters=iters, val_interval=iters),
                optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.1)),
                launcher="pytorch", env_cfg=dict(dist_cfg=dict(backend="gloo")),
                randomness=dict(seed=0), default_hooks=dict(checkpoint=None), log_level="WARNING")


def _stock_errors(base: dict) -> dict:
    """What the Runner does on the CPU without the README's workaround: its launcher's set-up
    fails (torch.cuda.set_device), and the model fails to wrap (mmengine's DDP wrapper with
    device_ids; DDP without them, refusing nn.SyncBatchNorm)."""
    from mmengine.config import Config
    from mmengine.runner import Runner

    from mmengine.dist import init_dist

    out = {"launcher": None}
    if not torch.cuda.is_available():
        try:
            init_dist("pytorch", backend="gloo")  # the group exists: only its CUDA step can fail
        except RuntimeError as e:
            out["launcher"] = str(e)
    for name, change in (("device_ids", {}),
                         ("sync_bn", {"model_wrapper_cfg": dict(type="MMDistributedDataParallel",
                                                                device_ids=None)})):
        try:
            Runner.from_cfg(Config(dict(base, **change)))
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    return out


def train_runner(rank: int, world_size: int, backend: str, iters: int) -> dict:
    """The Runner trains ``iters`` iterations with the README's config (``backend`` in place of
    bnpass where the test asks for bnpass_eager), validates on every rank, then rank 0 alone
    evaluates a bnpass-compiled copy while rank 1 waits at a barrier."""
    from mmengine.config import Config
    from mmengine.registry import OPTIMIZERS
    from mmengine.runner import Runner

    _torchrun_environment(rank, world_size)
    register()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    bnpass.clear_records()
    seen_grads = []

    @OPTIMIZERS.register_module(force=True)
    class RecordingSGD(torch.optim.SGD):
        """SGD that keeps the gradients it steps with (DDP's average over the ranks)."""

        @torch._dynamo.disable
        def step(self, closure=None):
            seen_grads.append([p.grad.clone() for g in self.param_groups for p in g["params"]])
            return super().step(closure)

    with tempfile.TemporaryDirectory() as work_dir:
        readme_cfg: dict = {}
        exec(readme_block("# mmengine config"), readme_cfg)
        stock = _stock_errors(base_config(work_dir, iters))
        cfg = Config(dict(base_config(work_dir, iters), compile=readme_cfg["compile"]))
        with mock.patch("torch.distributed.init_process_group") as init:  # the harness made it
            exec(readme_block("# mmengine on the CPU"), {"cfg": cfg})
        cfg.compile = dict(cfg.compile, backend=backend)
        cfg.model_wrapper_cfg.broadcast_buffers = False  # as mmengine's default wrapper: no copy of rank 0's stats
        cfg.optim_wrapper.optimizer.type = "RecordingSGD"
        runner = Runner.from_cfg(cfg)
        model = runner.model.module
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        indices = list(runner.train_dataloader.sampler)  # this rank's samples, in its batches' order
        runner.train()
        train_records = [r.to_json() for r in bnpass.compile_records()]
        breaks = graph_breaks()
        reasons = {k[:400]: v for k, v in torch._dynamo.utils.counters["graph_break"].items()}
        losses = list(runner.message_hub.get_scalar("train/loss").data[0])
        metrics = runner.val()  # the Runner's validation loop, eval mode, every rank

        # Evaluation on rank 0 only, compiled with bnpass; the other rank waits at a barrier.
        bnpass.clear_records()
        eval_s, eval_records = None, []
        if rank == 0:
            batch = {"inputs": torch.stack([sample(i)["inputs"] for i in range(4)]),
                     "data_samples": torch.stack([sample(i)["data_samples"] for i in range(4)])}
            model.eval()
            start = time.monotonic()
            torch.compile(model.val_step, backend=backend)(batch)
            eval_s = time.monotonic() - start
            eval_records = [r.to_json() for r in bnpass.compile_records()]
        dist.barrier()

    names = [n for n, p in model.named_parameters()]
    return {"initial": initial, "state": {k: v.clone() for k, v in model.state_dict().items()},
            "indices": indices[:PER_RANK * iters], "losses": losses,
            "grads": [dict(zip(names, g)) for g in seen_grads],
            "records": train_records, "graph_breaks": breaks, "graph_break_reasons": reasons,
            "metrics": metrics, "eval_s": eval_s, "eval_records": eval_records,
            "init_calls": [c.args for c in init.call_args_list], "stock": stock,
            "wrapper": type(runner.model).__name__, "iters": runner.iter}


def reference(per_rank: list[dict], float64: bool = True) -> dict:
    """The segmenter in one process on the ranks' concatenated batches (rank 0's, then rank 1's),
    from the same initial weights, mean cross-entropy over the global batch, SGD 0.1; ``losses``:
    each rank's own loss per iteration (the mean over its part of the global batch)."""
    register()
    model = TinyRef(per_rank[0]["initial"], torch.float64 if float64 else torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = {"losses": [[] for _ in per_rank], "grads": []}
    for step in range(len(per_rank[0]["grads"])):
        parts = [[sample(i) for i in r["indices"][PER_RANK * step:PER_RANK * (step + 1)]] for r in per_rank]
        x = torch.stack([s["inputs"] for part in parts for s in part]).to(model.dtype)
        t = torch.stack([s["data_samples"] for part in parts for s in part])
        logits = model.net(x)
        pixel_loss = F.cross_entropy(logits, t, reduction="none")
        pixel_loss.mean().backward()
        for rank in range(len(per_rank)):
            out["losses"][rank].append(float(pixel_loss[PER_RANK * rank:PER_RANK * (rank + 1)].mean().detach()))
        out["grads"].append({n: p.grad.clone() for n, p in model.net.named_parameters()})
        opt.step()
        opt.zero_grad()
    out["state"] = {k: v.detach() for k, v in model.net.state_dict().items()}
    return out


class TinyRef(nn.Module):
    """The registry's segmenter with plain BatchNorms (the eager reference: one process)."""

    def __init__(self, state: dict, dtype: torch.dtype):
        from mmengine.registry import MODELS

        super().__init__()
        self.dtype = dtype
        self.net = MODELS.build(dict(type="TinySegmenter", norm_cfg=dict(type="BN"), head_norm_cfg=dict(type="BN")))
        self.net.load_state_dict(state)
        self.net.to(dtype)
