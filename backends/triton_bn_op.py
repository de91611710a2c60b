"""The Triton kernels of triton_bn.py as operators that run inside compiled graphs, and the choice
between them and Inductor's own code (the backend option ``kernels``).

Operators (``torch.library.triton_op``: AOTAutograd traces each into its ``wrap_triton`` kernel
launches, which Inductor calls as user kernels; it fuses nothing into them):

    bnpass::triton_bn_stats(x) -> (sum, m2)                      stages 1+2 of the statistics
    bnpass::triton_bn_normalize(x, mean_hi, mean_lo, scale, shift, relu) -> y
    bnpass::triton_bn_backward_reduce(dy, x, mean_hi, mean_lo, scale, shift, relu) -> local (2C,)
    bnpass::triton_bn_backward_dx(dy, x, mean_hi, mean_lo, mean_dy, coef, scale, shift, relu) -> dx

``TritonSyncedBatchNormFunction`` is their autograd formula: the same math, packing and collectives
as ``bnpass.ops.SyncedBatchNormFunction`` (the all_reduce sits between the local reduction and the
normalize / dx kernels, as a ``_c10d_functional`` op in the graph), with the passes over x done by
these kernels instead of Inductor's generated ones.

Kernel choice per synced site (``resolve``): "inductor" always; "triton" needs Triton and a CUDA
input of float16/bfloat16/float32 and is otherwise a BNPassError (an explicit request that cannot be
honoured is an error, not a silent fallback); "auto" takes the table ``AUTO_RULES`` where "triton"
could run and "inductor" otherwise, the reason going into the site's reason.

NOT YET VERIFIED inside torch.compile: the kernels and this autograd formula are tested eagerly
under TRITON_INTERPRET=1 (tests/test_triton_kernels.py). Tracing them through AOTAutograd on a
machine without a GPU driver makes Triton's mutation analysis fall back to "every input is mutated",
and AOTAutograd's partitioner then fails ("Node ... was invalid, but is output"); on a GPU the
analysis runs. benchmarks/gpu_check.py section 1 is the first real check of the compiled path.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from bnpass.options import BNPassError

from . import triton_bn

__all__ = ["resolve", "AUTO_RULES", "TritonSyncedBatchNormFunction", "OPS_REGISTERED"]

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# kernels="auto": (layout, minimum elements per channel on this rank) -> kernels, first match wins.
# Measured once, on an H200 with torch 2.11 (benchmarks/gpu_results.md, "auto table", ResNet-50's BN
# shapes at batch 64): bnpass's Triton kernels won only at 64x64x112x112 bf16 channels_last (802,816
# elements per channel: 1.32 vs 1.45 ms fwd+bwd); Inductor's code won at 64x256x56x56 (200,704) and
# below, and in fp32 NCHW. The threshold sits between the two.
AUTO_RULES: tuple[tuple[str, int, str], ...] = (
    ("channels_last", 1 << 19, "triton"),
    ("any", 0, "inductor"),
)


def _layout_name(x: Tensor) -> str:
    return "nchw" if x.is_contiguous() else "channels_last"


def resolve(requested: str, example: Optional[Tensor], site_name: str) -> tuple[str, str]:
    """(kernels for this site, a note for the site's reason; "" when nothing to say)."""
    if requested == "inductor":
        return "inductor", ""
    why_not = None
    if not triton_bn.AVAILABLE:
        why_not = "triton is not installed"
    elif example is None:
        why_not = "the input's device is unknown at compile time"
    elif example.device.type != "cuda":
        why_not = f"the input is on {example.device.type}, the Triton kernels run on CUDA only"
    elif example.dtype not in KERNEL_DTYPES:
        why_not = f"the input is {example.dtype}, the Triton kernels take float16/bfloat16/float32"
    elif example.dim() < 2 or example.shape[1] == 0:
        why_not = "the input has no channel dimension"
    if requested == "triton":
        if why_not is not None:
            raise BNPassError(
                f"bnpass: options['kernels']='triton' cannot run BatchNorm {site_name!r}: {why_not}. "
                "Use kernels='inductor' (the default) or 'auto' (falls back to inductor per site).")
        return "triton", "kernels: triton"
    if why_not is not None:
        return "inductor", f"kernels: inductor (auto: {why_not})"
    per_channel = example.numel() // example.shape[1]
    layout = _layout_name(example) if example.dim() > 2 else "nchw"
    for rule_layout, min_per_channel, choice in AUTO_RULES:
        if rule_layout in ("any", layout) and per_channel >= min_per_channel:
            return choice, f"kernels: {choice} (auto: {layout}, {per_channel}/channel)"
    return "inductor", "kernels: inductor (auto: no rule matched)"


OPS_REGISTERED = False
if triton_bn.AVAILABLE:
    from torch.library import triton_op, wrap_triton

    @triton_op("bnpass::triton_bn_stats", mutates_args=())
    def _stats(x: Tensor) -> tuple[Tensor, Tensor]:
        return triton_bn.stats(x, wrap=wrap_triton)

    @triton_op("bnpass::triton_bn_normalize", mutates_args=())
    def _normalize(x: Tensor, mean_hi: Tensor, mean_lo: Tensor, scale: Tensor, shift: Tensor,
                   relu: bool) -> Tensor:
        return triton_bn.normalize(x, mean_hi, mean_lo, scale, shift, relu, wrap=wrap_triton)

    @triton_op("bnpass::triton_bn_backward_reduce", mutates_args=())
    def _backward_reduce(dy: Tensor, x: Tensor, mean_hi: Tensor, mean_lo: Tensor, scale: Tensor,
                         shift: Tensor, relu: bool) -> Tensor:
        return triton_bn.backward_reduce(dy, x, mean_hi, mean_lo, scale, shift, relu, wrap=wrap_triton)

    @triton_op("bnpass::triton_bn_backward_dx", mutates_args=())
    def _backward_dx(dy: Tensor, x: Tensor, mean_hi: Tensor, mean_lo: Tensor, mean_dy: Tensor,
                     coef: Tensor, scale: Tensor, shift: Tensor, relu: bool) -> Tensor:
        return triton_bn.backward_dx(dy, x, mean_hi, mean_lo, mean_dy, coef, scale, shift, relu,
                                     wrap=wrap_triton)

    OPS_REGISTERED = True


class TritonSyncedBatchNormFunction(torch.autograd.Function):
    """y = BN(x) (then ReLU) with statistics over the whole group, by the Triton kernels."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, group_name: Optional[str], relu: bool, site: int = -1):
        from bnpass.ops import global_statistics

        ops = torch.ops.bnpass
        x, _ = triton_bn.layout_of(x)
        channels = x.shape[1]
        n_local = x.numel() // channels
        sum_r, m2_r = ops.triton_bn_stats(x)
        stats = global_statistics(sum_r, m2_r, n_local, eps, group_name, site)  # 2C+1 float64 cross ranks
        mean_hi, mean_lo, invstd = stats.mean_hi, stats.mean_lo, stats.invstd
        scale = invstd if weight is None else invstd * weight.float()
        shift = torch.zeros_like(invstd) if bias is None else bias.float()
        y = ops.triton_bn_normalize(x, mean_hi, mean_lo, scale, shift, relu)
        ctx.save_for_backward(x, weight, mean_hi, mean_lo, invstd, scale, shift, stats.total)
        ctx.group_name, ctx.relu, ctx.site = group_name, relu, site
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(stats.mean, stats.unbiased_var)
        return y, stats.mean, stats.unbiased_var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        from bnpass.ops import global_grad_means

        ops = torch.ops.bnpass
        x, weight, mean_hi, mean_lo, invstd, scale, shift, total = ctx.saved_tensors
        channels = x.shape[1]
        dy = triton_bn.like(dy, x)
        sums = ops.triton_bn_backward_reduce(dy, x, mean_hi, mean_lo, scale, shift, ctx.relu)
        # this rank's [db, dw] = [sum dy', sum dy' * xhat] (invstd is global), the payload of
        # Inductor's path too
        local = torch.cat([sums[:channels], sums[channels:] * invstd])
        dx = None
        if ctx.needs_input_grad[0]:  # otherwise no collective: dw and db are local sums
            mean_dy, mean_dy_xhat = global_grad_means(local, total, ctx.group_name, ctx.site)  # 2C float32
            coef = invstd * mean_dy_xhat  # invstd^2 * S_dyxmu / N of triton_bn.py's (2)
            dx = ops.triton_bn_backward_dx(dy, x, mean_hi, mean_lo, mean_dy, coef, scale, shift, ctx.relu)
        dw = local[channels:].to(weight.dtype) if ctx.needs_input_grad[1] else None
        db = local[:channels].to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None


def triton_synced_bn(x, weight, bias, eps, group_name, relu=False, site=-1):
    """(y, mean, unbiased_var) like ``SyncedBatchNormFunction.apply``, by the Triton kernels."""
    if not OPS_REGISTERED:
        raise BNPassError("bnpass: the Triton BatchNorm kernels need triton, which is not installed")
    return TritonSyncedBatchNormFunction.apply(x, weight, bias, eps, group_name, relu, site)
