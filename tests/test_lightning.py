"""PyTorch Lightning with bnpass: ``trainer.fit`` under the DDP strategy on 2 CPU processes, of a
LightningModule compiled with backend="bnpass" and of one synced by the ``bnpass.lightning``
plugin: running statistics identical on both ranks and equal to the float64 model trained on the
global batch (final parameters too); counts of synced sites and collectives. One 2-rank job runs
every fit (Lightning's start-up is slow); the plugin's other behaviours are checked in-process."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

# Not imported here: importing Lightning replaces torch.compile for the whole process with a wrapper
# that deep-copies its keyword arguments (lightning/fabric/wrappers.py), which a ProcessGroup in
# bnpass's options cannot survive; the tests that import it in this process restore torch.compile.
if importlib.util.find_spec("lightning") is None:
    pytest.skip("lightning is not installed", allow_module_level=True)

import bnpass  # noqa: E402
from bnpass.options import BNPassError  # noqa: E402
from tests.checks import EAGER_MULTIPLIER, abs_err, assert_counts  # noqa: E402
from tests.harness import run_ranks  # noqa: E402
from tests.models import Spec  # noqa: E402
from tests.training import train  # noqa: E402

SPEC = Spec("lightning", "mlp1d", (3, 5), (3, 7), steps=2)
TOL = 2e-5


@pytest.fixture(autouse=True)
def stock_torch_compile():
    """Put torch.compile back after a test that imported Lightning in this process."""
    compile_fn = torch.compile
    yield
    torch.compile = compile_fn


@pytest.fixture(scope="module")
def fits():
    return run_ranks("tests.lightning_jobs:fit_cases", 2, SPEC, deadline_s=900)


def _final_state(float64: bool) -> dict:
    """The spec's model after the reference's training (one process, the global batch)."""
    model = SPEC.build(torch.float64 if float64 else None)
    train(SPEC, model, model, None, float64=float64)
    return {k: v.detach() for k, v in model.state_dict().items()}


def _assert_matches(per_rank_states: list[dict]) -> None:
    ref, eager = _final_state(True), _final_state(False)
    first = per_rank_states[0]
    for rank, state in enumerate(per_rank_states):
        for name, value in state.items():
            assert torch.equal(value, first[name]), f"rank {rank}'s {name} differs from rank 0's"
            err, scale = abs_err(value, ref[name])
            allowed = max(TOL * scale, EAGER_MULTIPLIER * abs_err(eager[name], ref[name])[0])
            assert err <= allowed, f"{name}: error {err:.3g} > allowed {allowed:.3g} against float64"


@pytest.mark.parametrize("case", ["compiled", "plugin"])
def test_fit_ddp_two_cpu_processes(fits, case):
    per_rank = [r[case] for r in fits]
    assert [r["steps"] for r in per_rank] == [SPEC.steps] * 2
    _assert_matches([r["state"] for r in per_rank])
    assert {"bn.running_mean", "bn_seq.running_var"} <= set(per_rank[0]["state"])
    # DDP's own forward is not compiled (Lightning compiles training_step): one graph per rank;
    # mlp1d's two BNs are independent: one packed collective forward; backward only bn's (bn_seq
    # normalizes the input batch, which needs no gradient: no collective)
    assert_counts(per_rank, sites=2, synced=2, forward=1, backward=1, unpacked=(2, 1))


def test_plugin_reverts_at_teardown(fits):
    assert all(r["plugin"]["reverted"] for r in fits)


def test_lightning_sync_batchnorm_true_fails_on_the_cpu(fits):
    """What the plugin replaces: Lightning's own switch converts to nn.SyncBatchNorm, which DDP
    refuses on CPU modules."""
    for r in fits:
        assert r["stock_sync_batchnorm"] is not None
        assert "SyncBatchNorm layers only work with GPU modules" in r["stock_sync_batchnorm"]


def test_plugin_with_sync_batchnorm_true_is_refused_by_lightning():
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch import Trainer

    with pytest.raises(MisconfigurationException, match="Choose one or the other"):
        Trainer(accelerator="cpu", sync_batchnorm=True, plugins=[bnpass.lightning.SyncBatchNorm()])


def test_plugin_leaves_a_bnpass_compiled_module_and_refuses_another_backend():
    from lightning.pytorch.utilities.compile import from_compiled

    from tests.lightning_jobs import lightning_module

    plugin = bnpass.lightning.SyncBatchNorm(backend="bnpass_eager")
    ours = from_compiled(torch.compile(lightning_module(SPEC, 2), backend="bnpass"))
    step = ours.training_step
    assert plugin.apply(ours) is ours and ours.training_step is step
    assert plugin.revert(ours) is ours and ours._compiler_ctx is not None
    other = from_compiled(torch.compile(lightning_module(SPEC, 2), backend="inductor"))
    with pytest.raises(BNPassError, match="compiled with another backend"):
        plugin.apply(other)
    fresh = lightning_module(SPEC, 2)
    assert plugin.apply(fresh)._compiler_ctx is not None
    assert plugin.revert(fresh)._compiler_ctx is None
    with pytest.raises(BNPassError, match="backend must be"):
        bnpass.lightning.SyncBatchNorm(backend="inductor")


def test_importable_without_lightning():
    """`import bnpass` and `bnpass.lightning` need no Lightning; making the plugin names the fix."""
    code = ("import sys; sys.modules['lightning'] = None\n"
            "import bnpass, bnpass.lightning\n"
            "try:\n    bnpass.lightning.SyncBatchNorm()\nexcept bnpass.BNPassError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "needs PyTorch Lightning" in out.stdout and "pip install lightning" in out.stdout, out.stdout
