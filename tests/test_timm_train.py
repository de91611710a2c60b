"""timm's train.py, unmodified, with ``--torchcompile bnpass`` on 2 gloo ranks (slow tier).

timm's packages (the wheel and the sdist of every 1.0 release) do not ship train.py: it lives at
the root of timm's repository. The test runs the script named by ``BNPASS_TIMM_TRAIN_PY`` (e.g. a
checkout of the tag matching the installed timm: ``git clone --branch v1.0.31
https://github.com/huggingface/pytorch-image-models``) and is skipped without it.

On a synthetic ImageFolder made here (8 training images of 2 classes, 16x16 PNGs), 2 ranks x 2
images x 2 steps, one epoch, no augmentation, plain cross-entropy, constant learning rate, timm's
own per-epoch BatchNorm averaging (``--dist-bn``) and DDP's buffer broadcast (``--no-ddp-bb``) off: every BatchNorm of timm's ``test_efficientnet``
synced (counts), the gradients each step used and the final parameters and running statistics
against the float64 model on the global batch, running statistics bitwise equal on both ranks; the
script's own validation (eval mode, every rank) ran. The job patches one thing, where timm itself
fails on the CPU (``tests/timm_jobs.py`` ``PATCHES``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("timm")

from tests.checks import EAGER_MULTIPLIER, abs_err, assert_counts  # noqa: E402
from tests.harness import run_ranks  # noqa: E402
from tests.test_docs import declared_options  # noqa: E402
from tests.test_reliability import DDP_FORWARD  # noqa: E402

TRAIN_PY = os.environ.get("BNPASS_TIMM_TRAIN_PY")
TOL = 2e-5
MODEL, SITES = "test_efficientnet", 13  # 13 BatchNormAct2d (timm's own F.batch_norm module)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not TRAIN_PY, reason="set BNPASS_TIMM_TRAIN_PY to timm's train.py "
                                                      "(not in timm's packages; see this file's docstring)")]


def _image_folder(root: Path) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, count in (("train", 4), ("validation", 2)):
        for cls in ("a", "b"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")


def _argv(data: Path, output: Path, backend: str) -> list[str]:
    return ["--data-dir", str(data), "--model", MODEL, "--num-classes", "2", "--img-size", "16",
            "--device", "cpu", "--workers", "0", "--batch-size", "2", "--epochs", "1",
            "--torchcompile", backend, "--no-aug", "--no-prefetcher", "--smoothing", "0",
            "--opt", "sgd", "--lr", "0.1", "--momentum", "0.9", "--weight-decay", "0",
            "--sched", "step", "--decay-epochs", "100", "--warmup-epochs", "0", "--dist-bn", "", "--no-ddp-bb",
            "--output", str(output), "--checkpoint-hist", "1"]


def _close(name: str, ours, ref, eager) -> None:
    err, scale = abs_err(ours, ref)
    allowed = max(TOL * scale, EAGER_MULTIPLIER * abs_err(eager, ref)[0])
    assert err <= allowed, f"{name}: error {err:.3g} > allowed {allowed:.3g} against float64"


@pytest.mark.parametrize("backend", ["bnpass"])
def test_train_py_torchcompile_bnpass(tmp_path, backend):
    from tests.timm_jobs import reference

    script = Path(TRAIN_PY).resolve()
    argv = _argv(tmp_path / "data", tmp_path / "output", backend)
    missing = sorted({a for a in argv if a.startswith("--")} - declared_options(script))
    assert not missing, f"{script} has no {missing}: another train.py than this test was written for"
    _image_folder(tmp_path / "data")
    per_rank = run_ranks("tests.timm_jobs:run_train_py", 2, str(script), argv, deadline_s=1200)

    assert all(len(r["batches"]) == 2 and len(r["steps"]) == 2 for r in per_rank)
    assert all(x.shape[0] == 2 for r in per_rank for x, _ in r["batches"])
    ref, eager = reference(per_rank), reference(per_rank, float64=False)
    for rank, r in enumerate(per_rank):
        for step, recorded in enumerate(r["steps"]):
            assert recorded["lr"] == [0.1] * len(recorded["lr"]), recorded["lr"]
            for name, g in recorded["grads"].items():
                _close(f"rank {rank} step {step} grad {name}", g, ref["grads"][step][name], eager["grads"][step][name])
        for name, value in r["state"].items():
            assert torch.equal(value, per_rank[0]["state"][name]), f"rank {rank}'s {name} differs from rank 0's"
            _close(f"rank {rank} {name}", value, ref["state"][name], eager["state"][name])
    # Training graphs: every BatchNorm synced, one collective per site each way (none packs: a
    # chain). The script's validation compiles the eval graphs: every BatchNorm folded or skipped.
    training = [dict(r, records=[rec for rec in r["records"] if any(s["action"] == "sync" for s in rec["sites"])])
                for r in per_rank]
    assert_counts(training, sites=SITES, synced=SITES, forward=SITES, backward=SITES, graphs=None,
                  breaks_outside_bn=DDP_FORWARD)
    for r in per_rank:
        evaluation = [s["action"] for rec in r["records"] for s in rec["sites"] if s["action"] != "sync"]
        assert evaluation and set(evaluation) <= {"fold", "skip"}, evaluation
    print("patches applied:", per_rank[0]["patches"])
