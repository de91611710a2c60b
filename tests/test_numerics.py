"""The synced op's arithmetic against eager BatchNorm's, one process, no group (bnpass/ops.py run
eagerly): each quantity's error against float64 no larger than eager float32's by more than a
rounding or two. Seconds; the whole-model comparisons are tests/test_zoo.py's."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bnpass.ops import synced_batch_norm


def _run(fn, dtype, steps: int = 8):
    g = torch.Generator().manual_seed(0)
    shape = (4, 64, 5, 5)
    running_mean, running_var = torch.zeros(64, dtype=dtype), torch.ones(64, dtype=dtype)
    for _ in range(steps):
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 7).to(dtype)
        fn(x, running_mean, running_var)
    return running_mean.double(), running_var.double()


def eager(x, rm, rv):
    F.batch_norm(x, rm, rv, None, None, True, 0.1, 1e-5)


def ours(x, rm, rv):
    synced_batch_norm(x, rm, rv, None, None, 0.1, 1e-5, None)


def test_running_statistics_are_rounded_once_as_eager_rounds_them():
    """Eager's CPU kernel updates the running statistics in double and rounds once; so does bnpass
    (with float64 global statistics its error is about half eager's here, which rounds its mean to
    float32 first; before issue 24's float64 lerp it was too, by a smaller margin)."""
    ref_mean, ref_var = _run(eager, torch.float64)
    eager_mean, eager_var = _run(eager, torch.float32)
    ours_mean, ours_var = _run(ours, torch.float32)
    for name, got, want, base in (("running_mean", ours_mean, ref_mean, eager_mean),
                                  ("running_var", ours_var, ref_var, eager_var)):
        err, eager_err = float((got - want).abs().max()), float((base - want).abs().max())
        assert err <= 1.2 * eager_err, f"{name}: error {err:.3g} against float64, eager's {eager_err:.3g}"


def test_backward_sums_on_the_cpu_are_as_accurate_as_eagers():
    """One BatchNorm over 4x8x64x64 (16,384 values per channel): dx, dw, db against float64 within
    1.5x of eager float32's own error (the backward's sums accumulate in float64 on the CPU, as
    eager's do)."""
    g = torch.Generator().manual_seed(1)
    x64 = torch.randn(4, 8, 64, 64, generator=g, dtype=torch.float64) * 2 + 0.5
    w64 = torch.randn(x64.shape, generator=g, dtype=torch.float64)

    def grads(fn, dtype):
        x = x64.detach().to(dtype).requires_grad_()
        weight, bias = torch.ones(8, dtype=dtype, requires_grad=True), torch.zeros(8, dtype=dtype, requires_grad=True)
        (torch.relu(fn(x, weight, bias)) * w64.to(dtype)).sum().backward()
        return [t.grad.double() for t in (x, weight, bias)]

    ref = grads(lambda x, w, b: F.batch_norm(x, None, None, w, b, True), torch.float64)
    base = grads(lambda x, w, b: F.batch_norm(x, None, None, w, b, True), torch.float32)
    got = grads(lambda x, w, b: synced_batch_norm(x, None, None, w, b, 0.1, 1e-5, None), torch.float32)
    for name, g_ours, g_eager, g_ref in zip(("dx", "dw", "db"), got, base, ref):
        err, eager_err = float((g_ours - g_ref).abs().max()), float((g_eager - g_ref).abs().max())
        assert err <= 1.5 * eager_err, f"{name}: error {err:.3g} against float64, eager's {eager_err:.3g}"
