"""The judge every numerics test uses (tests/checks.py): eager's own error over sample orders, and the
floors of quantities that are zero in exact arithmetic. One process, seconds."""

from __future__ import annotations

import torch

from tests.checks import GRAD_FLOOR, _round_batchnorms_otherwise, eager_errors, eager_global, eager_variants, floored_scales
from tests.models import Spec
from tests.training import reference

SPEC = Spec("convnet", "convnet", (2, 3), (3, 6, 6), steps=2)


def test_eager_variants_are_the_same_answer_rounded_otherwise():
    """Eager with its convolutions on the ranks' slices, in channels_last, and with its BatchNorms'
    outputs rounded the other way agrees with the plain run to float32 rounding, not bitwise."""
    assert eager_variants(SPEC) == [{}, {"split": True, "memory_format": "channels_last"}, {"rounding": 1},
                                    {"rounding": 2, "split": True, "memory_format": "channels_last"}]
    first = eager_global(SPEC)
    for kwargs in eager_variants(SPEC)[1:]:
        other = eager_global(SPEC, **kwargs)
        differs = False
        for step in range(SPEC.steps):
            for key in ("y", "dx"):
                torch.testing.assert_close(other[key][step], first[key][step], rtol=1e-4, atol=1e-5)
                differs |= not torch.equal(other[key][step], first[key][step])
            largest = max(float(g.abs().max()) for g in first["grads"][step].values())
            for name, grad in first["grads"][step].items():  # a bias before a BatchNorm: noise of that size
                torch.testing.assert_close(other["grads"][step][name], grad, rtol=1e-4, atol=1e-4 * largest)
        for name, buf in first["buffers"].items():
            torch.testing.assert_close(other["buffers"][name], buf, rtol=1e-4, atol=1e-5)
        assert differs, f"{kwargs} rounds as the plain run: it would measure nothing more"


def test_batchnorm_outputs_rounded_otherwise_move_by_one_ulp():
    model = SPEC.build()
    _round_batchnorms_otherwise(model, 1)
    x = torch.randn(4, 6, 5, 5, requires_grad=True)
    with torch.no_grad():
        want = torch.nn.functional.batch_norm(x, None, None, model.bn1.weight, model.bn1.bias, True)
    got = model.bn1(x)
    ulps = (got - want).abs() / torch.finfo(torch.float32).eps / want.abs().clamp_min(1e-30)
    assert bool(((ulps > 0.25) & (ulps <= 1.0)).all()) and bool((got > want).any() and (got < want).any())
    got.sum().backward()  # the gradient passes through
    assert x.grad is not None and x.grad.shape == x.shape


def test_eager_error_is_the_worst_over_variants():
    from tests.checks import errors_vs_reference

    ref = reference(SPEC)
    worst = eager_errors(SPEC, ref)
    for kwargs in eager_variants(SPEC):
        single = errors_vs_reference([eager_global(SPEC, **kwargs)], ref)
        assert all(single[k][0] <= worst[k][0] for k in single)


def test_floors_of_quantities_that_are_zero_in_exact_arithmetic():
    errs = {"grad:conv.bias": (1e-9, 1e-10), "grad:fc.weight": (1e-6, 50.0), "input_grad": (0.0, 2.0),
            "output": (1e-7, 1e-8), "buffer:bn.running_mean": (1e-9, 1e-12), "buffer:bn.running_var": (0.0, 4.0)}
    scales = floored_scales(errs)
    assert scales["grad:conv.bias"] == GRAD_FLOOR * 50.0  # a bias before a BatchNorm
    assert scales["input_grad"] == 2.0 and scales["grad:fc.weight"] == 50.0
    assert scales["output"] == 1e-8  # outputs keep their own scale
    assert scales["buffer:bn.running_mean"] == 2.0  # the running variance's standard deviation
    assert scales["buffer:bn.running_var"] == 4.0
