"""The synchronized BatchNorm that the rewrite puts in place of each synced site.

Everything here is plain torch code that AOTAutograd traces and Inductor lowers: the statistics are
reductions, the collective is ``_c10d_functional.all_reduce`` + ``wait_tensor``, the rest is
pointwise work that Inductor fuses with the site's neighbours.

Notation, per channel c, over all ranks r: n_r local count, N = sum_r n_r, m_r / M2_r the local mean
and sum of squared deviations, mean / var the global (biased) statistics, invstd = rsqrt(var + eps),
xhat = (x - mean) * invstd.

Forward (one all_reduce, 2C+1 float64 values):
    local:   s_r = sum(x) in float64, M2_r by Welford in float32 (one pass: stable for any |mean|/std)
    packed:  [n_r, s_r, M2_r + s_r^2/n_r]                 in float64, summed over ranks
    global:  mean = S1/N, var = S2/N - mean^2             (float64 keeps ~8 digits at |mean|/std=1e4)
    y = xhat * w + b

Backward (one all_reduce, 2C values, float64 on the CPU and float32 elsewhere, as eager BatchNorm
accumulates on each device; none when x needs no gradient, e.g. a BN on the input):
    local:   [sum(dy), sum(dy * xhat)] = [db, dw]         summed over ranks (invstd is global, so
                                                          the sum of the dw_r is sum(dy*xhat) of all)
    dx = w * invstd * (dy - sum(dy)/N - xhat * sum(dy*xhat)/N)
    dw = local sum(dy * xhat), db = local sum(dy)         (as nn.SyncBatchNorm: DDP averages them)
The payload is this rank's weight and bias gradients themselves: they are made by the reduction's
kernel (under Inductor), not by a kernel of their own after the collective.

Running statistics are updated outside the autograd.Function (see ``synced_batch_norm``): an in-place
update inside it is an autograd trap under Inductor (shared/FACTS.md).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

__all__ = ["synced_batch_norm", "SyncedBatchNormFunction"]


def _reduce_dims(x: Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def _per_channel(t: Tensor, x: Tensor) -> Tensor:
    """Reshape a (C,) tensor so that it broadcasts against x of shape (N, C, *)."""
    return t.reshape([1, -1] + [1] * (x.dim() - 2))


def _centered(xf: Tensor, mean_hi: Tensor, mean_lo: Tensor) -> Tensor:
    return (xf - _per_channel(mean_hi, xf)) - _per_channel(mean_lo, xf)


@torch.library.custom_op("bnpass::site_all_reduce", mutates_args=())
def site_all_reduce(payload: Tensor, group_name: str, site: int, kind: str) -> Tensor:
    """Sum ``payload`` over the group's ranks: the collective of site ``site``'s ``kind`` ("forward":
    statistics, "backward": gradient terms). An opaque op until bnpass/schedule.py, which runs on every
    graph AOTAutograd traces, replaces it by ``_c10d_functional.all_reduce`` + ``wait_tensor``
    (packed with other sites' where the rank-independent site levels allow): the site it serves stays
    in the graph as data, so no graph pass can merge, drop or reorder it, and the packing and order
    are decided from what every rank shares. Run eagerly (outside a schedule), it is that pair."""
    out = torch.ops._c10d_functional.all_reduce(payload, "sum", group_name)
    return torch.ops._c10d_functional.wait_tensor(out)


@site_all_reduce.register_fake
def _(payload, group_name, site, kind):
    return torch.empty_like(payload)


torch.fx.node.has_side_effect(torch.ops.bnpass.site_all_reduce.default)


def _all_reduce_sum(t: Tensor, group_name: Optional[str], site: int, kind: str) -> Tensor:
    """Sum over the group's ranks; ``None`` is this rank alone (a local site)."""
    if group_name is None:
        return t
    return torch.ops.bnpass.site_all_reduce(t, group_name, site, kind)


def _local_moments(xf: Tensor, n_local) -> tuple[Tensor, Tensor]:
    """Local sum (float64) and M2 = sum of squared deviations (float32, Welford) per channel.

    The sum is accumulated in float64 in the same pass as the Welford reduction: a float32 mean is
    off by up to half an ulp of |mean|, which at |mean|/std = 1e4 shifts every x - mean by 5e-4 std.
    Zeros for an empty batch.
    """
    channels = xf.shape[1]
    if isinstance(n_local, int) and n_local == 0:
        zeros = xf.new_zeros(channels, dtype=torch.float64)
        return zeros, zeros
    dims = _reduce_dims(xf)
    var, _ = torch.var_mean(xf, dims, correction=0)
    total = xf.sum(dims, dtype=torch.float64)
    m2 = var.double() * n_local
    if not isinstance(n_local, int):  # symbolic batch size: n may be 0 at run time, no host sync
        m2 = torch.where(torch.full((), n_local, device=xf.device) > 0, m2, 0.0)
    return total, m2


_ONE_VALUE = ("Expected more than 1 value per channel when training, got at most 1 value per channel in "
              "the global batch of the process group (bnpass counts the batch over every rank of the "
              "group)")


class GlobalStatistics(NamedTuple):
    total: Tensor  # (1,) float64: N, the global count
    mean: Tensor  # (C,) float64: for the running statistics
    mean_hi: Tensor  # (C,) float32: mean = mean_hi + mean_lo to float64 precision
    mean_lo: Tensor
    invstd: Tensor  # (C,) float32: rsqrt(biased global variance + eps)
    unbiased_var: Tensor  # (C,) float64: for the running statistics


def global_statistics(sum_r: Tensor, m2_r: Tensor, n_local, eps: float,
                      group_name: Optional[str], site: int = -1) -> GlobalStatistics:
    """The forward's one all_reduce, of [n_r, s_r, M2_r + s_r^2/n_r] (2C+1 float64 values), and
    the global statistics it gives. Shared by every kernel choice (see backends/triton_bn_op.py)."""
    channels = sum_r.shape[0]
    if group_name is None and isinstance(n_local, int) and n_local == 1:
        raise ValueError("Expected more than 1 value per channel when training, got 1 value per "
                         "channel (a BatchNorm with this rank's own statistics)")
    count = torch.full((1,), n_local, dtype=torch.float64, device=sum_r.device)
    if isinstance(n_local, int):  # M2_r + s_r^2/n_r in one op
        second = torch.addcmul(m2_r, sum_r, sum_r, value=1.0 / max(n_local, 1))
    else:
        second = m2_r + sum_r * sum_r / torch.sym_max(n_local, 1)
    packed = _all_reduce_sum(torch.cat([count, sum_r, second]), group_name, site, "forward")  # crosses ranks
    if isinstance(n_local, int) and n_local <= 1 and group_name is not None:
        # Only now is the batch known: a rank with one value per channel is fine when the group
        # has more. Every rank whose own count is <= 1 checks (so all do when the global count is).
        torch._assert_async(packed[0] > 1, _ONE_VALUE)
    # Each traced op costs compile time (AOTAutograd, the partitioner, Inductor's lowering), so the
    # C-sized math below is written in as few ops as it allows, and the partitioner saves its
    # results for the backward rather than recomputing them (schedule.save_site_collectives).
    total, s1, s2 = packed[:1], packed[1 : channels + 1], packed[channels + 1 :]
    mean64 = s1 / total
    var64 = torch.clamp_min(torch.addcmul(s2 / total, mean64, mean64, value=-1.0), 0.0)
    # mean as a hi + lo float32 pair: x - mean stays exact to float32 even when |mean| >> std
    mean_hi = mean64.float()
    mean_lo = (mean64 - mean_hi).float()  # the subtraction promotes mean_hi to float64, exactly
    invstd = torch.rsqrt(var64 + eps).float()
    unbiased_var = var64 * (total / (total - 1))
    return GlobalStatistics(total, mean64, mean_hi, mean_lo, invstd, unbiased_var)


def global_grad_means(local: Tensor, total: Tensor, group_name: Optional[str],
                      site: int = -1) -> tuple[Tensor, Tensor]:
    """The backward's one all_reduce, of ``local`` = [sum dy, sum dy*xhat] (2C, float64 on the CPU), and
    the per-channel terms of dx = scale*(dy - mean_dy - xhat*mean_dy_xhat). Shared by every
    kernel choice (see backends/triton_bn_op.py)."""
    channels = local.shape[0] // 2
    means = _all_reduce_sum(local, group_name, site, "backward") / total.to(local.dtype)  # crosses ranks
    return means[:channels], means[channels:]


def _accumulation_dtype(x: Tensor) -> torch.dtype:
    """What the backward's sums accumulate in: float64 on the CPU, as eager's CPU BatchNorm does
    (its sums of dy and dy*(x-mean) are doubles); float32 elsewhere, as eager's CUDA kernels."""
    return torch.float64 if x.device.type == "cpu" else torch.float32


class SyncedBatchNormFunction(torch.autograd.Function):
    """y = BN(x) with statistics over the whole process group. Pure: touches no buffer."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, group_name: str, site: int = -1):
        channels = x.shape[1]
        n_local = x.numel() // channels if channels else 0
        xf = x.float()
        sum_r, m2_r = _local_moments(xf, n_local)
        stats = global_statistics(sum_r, m2_r, n_local, eps, group_name, site)
        mean_hi, mean_lo, invstd = stats.mean_hi, stats.mean_lo, stats.invstd
        scale = invstd if weight is None else invstd * weight.float()
        centered = _centered(xf, mean_hi, mean_lo)
        if bias is None:
            y = centered * _per_channel(scale, x)
        else:
            y = torch.addcmul(_per_channel(bias.float(), x), centered, _per_channel(scale, x))
        y = y.to(x.dtype)
        ctx.save_for_backward(x, mean_hi, mean_lo, invstd, scale, stats.total)  # scale: not again
        ctx.group_name, ctx.site = group_name, site
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(stats.mean, stats.unbiased_var)
        return y, stats.mean, stats.unbiased_var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):
        x, mean_hi, mean_lo, invstd, scale, total = ctx.saved_tensors
        channels = x.shape[1]
        dims = _reduce_dims(x)
        dyf = dy.float()
        xhat = _centered(x.float(), mean_hi, mean_lo) * _per_channel(invstd, x)
        acc = _accumulation_dtype(x)
        local = torch.cat([dyf.sum(dims, dtype=acc), (dyf * xhat).sum(dims, dtype=acc)])  # [db, dw] of this rank
        dw = local[channels:].to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        db = local[:channels].to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        dx = None
        if ctx.needs_input_grad[0]:  # otherwise no collective: dw and db are local sums
            mean_dy, mean_dy_xhat = (m.float() for m in global_grad_means(local, total, ctx.group_name, ctx.site))
            dx = ((dyf - _per_channel(mean_dy, x) - xhat * _per_channel(mean_dy_xhat, x))
                  * _per_channel(scale, x)).to(x.dtype)
        return dx, dw, db, None, None, None


def synced_batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float | Tensor,
    eps: float,
    group_name: Optional[str],
    kernels: str = "inductor",
    relu: bool = False,
    site: int = -1,
) -> Tensor:
    """Training-mode BN with global statistics; updates running stats (if given) in place.

    ``momentum`` is a float, or a 0-d tensor (the cumulative average's 1/num_batches_tracked).
    ``kernels="triton"`` (set by the rewrite only for CUDA sites, see backends/triton_bn_op.py) does
    the passes over x with bnpass's Triton kernels, then applies the ReLU too when ``relu``.
    ``site``: the site's index in its graph, carried by its collectives (``site_all_reduce``).
    """
    if kernels == "triton":
        from bnpass.backends.triton_bn_op import triton_synced_bn

        y, mean, unbiased_var = triton_synced_bn(x, weight, bias, eps, group_name, relu, site)
    else:
        y, mean, unbiased_var = SyncedBatchNormFunction.apply(x, weight, bias, eps, group_name, site)
    # The running statistics move in float64 and are rounded once, as eager's CPU kernel does
    # (its accumulation type for float32 is double), where a float32 lerp of a float32-rounded
    # statistic rounds three times.
    with torch.no_grad():
        if isinstance(momentum, Tensor):
            momentum = momentum.double()
        if running_mean is not None:
            running_mean.copy_(torch.lerp(running_mean.double(), mean.double(), momentum))
        if running_var is not None:
            running_var.copy_(torch.lerp(running_var.double(), unbiased_var.double(), momentum))
    return y
