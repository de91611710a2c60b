"""mmengine's Runner with bnpass: the README's config (``compile=dict(backend="bnpass")``) and its
CPU workaround, executed as written, on 2 gloo ranks under ``launcher="pytorch"``. A segmenter from
mmengine's registry (``norm_cfg=dict(type="BN")`` backbone, ``dict(type="SyncBN")`` head) trains 3
iterations: every BatchNorm synced (counts), each rank's loss, the gradients DDP averaged and the
final parameters and running statistics against the float64 model on the global batch, running
statistics bitwise equal on both ranks (DDP does not copy buffers here); the Runner's validation
loop on every rank, and a bnpass-compiled evaluation on rank 0 alone that does not wait for rank 1.
Without the workaround the Runner fails on the CPU before training (asserted, so that a fixed
mmengine shows here)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("mmengine")

from tests.checks import EAGER_MULTIPLIER, abs_err, assert_counts  # noqa: E402
from tests.harness import run_ranks  # noqa: E402

TOL = 2e-5
ITERS = 3
# Graph breaks in mmengine's train_step around the model (DDP's own forward: its Logger;
# loss.backward(); the test's recording optimizer step): none inside the model's graph.
BREAKS_OUTSIDE_BN = ("Logger", "backward()", "torch.compiler.disable")


def _run(backend: str) -> list[dict]:
    return run_ranks("tests.mmengine_jobs:train_runner", 2, backend, ITERS, deadline_s=600)


@pytest.fixture(scope="module")
def eager_pass():
    """The Runner under bnpass_eager: what is checked is decided before Inductor's code generation."""
    return _run("bnpass_eager")


def _assert_close(name: str, ours, ref, eager) -> None:
    err, scale = abs_err(ours, ref)
    allowed = max(TOL * scale, EAGER_MULTIPLIER * abs_err(eager, ref)[0])
    assert err <= allowed, f"{name}: error {err:.3g} > allowed {allowed:.3g} against float64"


def _check_training(per_rank: list[dict]) -> None:
    from tests.mmengine_jobs import reference

    assert [r["iters"] for r in per_rank] == [ITERS] * 2
    assert [r["wrapper"] for r in per_rank] == ["CPUDistributedDataParallel"] * 2
    assert [r["init_calls"] for r in per_rank] == [[("gloo",)]] * 2  # the README's line ran
    assert set(per_rank[0]["indices"]).isdisjoint(per_rank[1]["indices"])  # ranks saw other images
    ref, eager = reference(per_rank), reference(per_rank, float64=False)
    for rank, r in enumerate(per_rank):
        for step, (loss, ref_loss, eager_loss) in enumerate(zip(r["losses"], ref["losses"][rank],
                                                                 eager["losses"][rank])):
            _assert_close(f"rank {rank} loss {step}", torch.tensor(loss), torch.tensor(ref_loss),
                          torch.tensor(eager_loss))
        for step, grads in enumerate(r["grads"]):
            for name, g in grads.items():
                _assert_close(f"rank {rank} step {step} grad {name}", g, ref["grads"][step][name],
                              eager["grads"][step][name])
        for name, value in r["state"].items():
            assert torch.equal(value, per_rank[0]["state"][name]), f"rank {rank}'s {name} differs from rank 0's"
            _assert_close(f"rank {rank} {name}", value, ref["state"][name], eager["state"][name])
    assert "decode_head.1.running_var" in per_rank[0]["state"]  # the SyncBN head, reverted and synced
    # 3 BatchNorms in sequence: 3 collectives each way, one model graph compiled once (train_step's
    # other graphs, split by mmengine's code around the model, hold no BatchNorm)
    for rank, r in enumerate(per_rank):
        with_bn = [rec for rec in r["records"] if rec["sites"]]
        assert len(with_bn) == 1, f"rank {rank}: {len(with_bn)} graphs with BatchNorms compiled, expected 1"
    assert_counts(per_rank, sites=3, synced=3, forward=3, backward=3, graphs=None,
                  breaks_outside_bn=BREAKS_OUTSIDE_BN)


def test_runner_trains_synced_against_float64(eager_pass):
    _check_training(eager_pass)


def test_validation_on_every_rank_and_on_rank_0_alone(eager_pass):
    metrics = [r["metrics"] for r in eager_pass]
    assert metrics[0] == metrics[1] and 0.0 <= metrics[0]["pixel_accuracy"] <= 1.0
    rank0, rank1 = eager_pass
    # eval mode: every BatchNorm folded into its convolution, no collective, so no agreement wait
    sites = [s for rec in rank0["eval_records"] for s in rec["sites"]]
    assert [s["action"] for s in sites] == ["fold"] * 3
    assert sum(rec["collectives"]["forward"] + rec["collectives"]["backward"] for rec in rank0["eval_records"]) == 0
    assert rank0["eval_s"] < 60, f"rank 0's evaluation took {rank0['eval_s']:.1f} s"
    assert rank1["eval_records"] == [] and rank1["eval_s"] is None


def test_without_the_workaround_the_runner_fails_on_the_cpu(eager_pass):
    """mmengine 0.10.7's launcher="pytorch" calls torch.cuda.set_device, its DDP wrapper passes
    device_ids, and DDP refuses nn.SyncBatchNorm in a CPU module: what the README's lines work
    around."""
    for r in eager_pass:
        if not torch.cuda.is_available():
            assert r["stock"]["launcher"], "mmengine's launcher set-up no longer needs CUDA: drop the README's line"
        assert "device_ids and output_device arguments only work" in r["stock"]["device_ids"]
        assert "SyncBatchNorm layers only work with GPU modules" in r["stock"]["sync_bn"]


@pytest.mark.slow
def test_runner_under_inductor():
    """The README's config as written: backend="bnpass" (Inductor)."""
    _check_training(_run("bnpass"))
