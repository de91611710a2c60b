"""Triton kernels for bnpass's synchronized BatchNorm (the ``kernels="triton"`` lowering).

The math (per channel c; n_r, N the local and global counts; shapes (N, C, *spatial)).

Forward statistics, in two stages on each rank, then one all_reduce across ranks:

    stage 1 (``_stats_partial_kernel``), program p of channel block cb, over its tiles t:
        K       = x[0, c, 0...]                        a per-channel shift: the first element
        xs      = x - K                                float32; |xs| ~ std, whatever |mean| is
        n_t, m_t = count, mean(xs) over the tile        two-pass inside the tile (load once)
        M2_t    = sum((xs - m_t)^2)
        (n, m, M2) <- Chan(n, m, M2; n_t, m_t, M2_t)   float32 over the program's tiles:
                    d = m_t - m;  m += d * n_t / (n + n_t);  M2 += M2_t + d^2 * n * n_t / (n + n_t)
    stage 2 (``_stats_final_kernel``), one program per channel block, in float64:
        n_r = sum_p n_p;  ms = sum_p n_p m_p / n_r;  M2_r = sum_p M2_p + sum_p n_p (m_p - ms)^2
        sum_r = n_r * (K + ms)                         the local sum, float64 (as bnpass/ops.py)

    The shift is what keeps the ops.py guarantee (float64 local sum) without a float64 pass over x:
    every float32 quantity is a mean or deviation of xs, whose size is the std, so its rounding error
    is ~1e-7 std however large |mean|/std is (1e4 in the tests); K and the combination are exact or
    float64. The packed [n_r, sum_r, M2_r + sum_r^2/n_r] is then summed over ranks (CROSSES RANKS:
    2C+1 float64 values) exactly as in ops.py, which also derives mean (as a float32 hi + lo pair),
    var and invstd = rsqrt(var + eps) in float64 on C-sized tensors.

Normalize (``_normalize_kernel``), elementwise, float32 inside, output in x's dtype:
    y = ((x - mean_hi) - mean_lo) * scale + shift,  scale = invstd * w,  shift = b
    y = max(y, 0) when the graph has a ReLU right after the BatchNorm (RELU).

Backward. With xhat = (x - mean) * invstd and y = w * xhat + b (a the ReLU mask, dy' = dy * a, or
dy' = dy without ReLU), the global-batch derivative is

    dL/dx = w * invstd * (dy' - mean(dy') - xhat * mean(dy' * xhat))                     (1)

because mean and var both depend on every x of every rank: d mean / dx = 1/N and d var / dx =
2 (x - mean) / N, so dx collects the direct term w * invstd * dy', the mean term -w * invstd *
mean(dy'), and the variance term -w * invstd * xhat * mean(dy' xhat). Rewritten with sums of
(x - mean), which need no invstd inside the reduction:

    dx = scale * (dy' - S_dy / N - (x - mean) * invstd^2 * S_dyxmu / N)                 (2)
    S_dy = sum over ALL RANKS of sum(dy'),   S_dyxmu = sum over ALL RANKS of sum(dy' * (x - mean))

    stage 1/2 (``_bwd_partial_kernel`` / ``_bwd_final_kernel``): the local [sum dy', sum dy'(x-mean)]
        in float32, per-block partials then a per-channel sum; the caller (triton_bn_op.py) scales
        the second half by invstd (global) into this rank's [db, dw] = [sum dy', sum dy' * xhat],
        the payload of Inductor's path too, and all_reduces it (CROSSES RANKS: 2C float32 values,
        ``bnpass.ops.global_grad_means``); then ``_dx_kernel`` applies (2) elementwise with
        mean_dy = S_dy / N and coef = invstd * S_dyxhat / N = invstd^2 * S_dyxmu / N. dw and db
        stay local sums (as nn.SyncBatchNorm: DDP averages them).

Layouts. A (N, C, *spatial) tensor dense in NCHW order (``contiguous``) or in channels-last order
(NHWC, NDHWC) is addressed as rows m = (n, s) of C channels:
    address(m, c) = (m // S) * STRIDE_N + (m % S) * STRIDE_S + c * STRIDE_C
    NCHW:          S = prod(spatial), STRIDE_N = C*S, STRIDE_S = 1, STRIDE_C = S
    channels-last: S = 1,             STRIDE_N = C,   STRIDE_S = 0, STRIDE_C = 1
(Triton specializes an int argument equal to 1, so the channels-last division folds away.) For
elementwise kernels the flat memory index i has channel (i // STRIDE_C) % C in both layouts.

Triton is optional: without it this module imports, ``AVAILABLE`` is False, and nothing else is
defined; the caller (triton_bn_op.py) falls back or raises.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

try:  # Triton is optional: the package imports and the CPU tests run without it.
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the machine
    triton = tl = None
    AVAILABLE = False

__all__ = ["AVAILABLE", "Layout", "layout_of", "stats", "normalize", "backward_reduce", "backward_dx"]

# Target number of programs of a stage-1 reduction: enough to fill an H100/H200 (132/132 SMs) a few
# times over. Not tuned on a GPU yet: benchmarks/gpu_check.py measures the kernels as they are.
_TARGET_PROGRAMS = 1024
_ELEMENTWISE_BLOCK = 1024


class Layout:
    """How a dense (N, C, *spatial) tensor is addressed: see the module docstring."""

    def __init__(self, x: torch.Tensor):
        channels = x.shape[1]
        spatial = math.prod(x.shape[2:])
        self.channels, self.rows = channels, x.shape[0] * spatial
        if x.is_contiguous():
            self.name = "nchw"
            self.s, self.stride_n, self.stride_s, self.stride_c = spatial, channels * spatial, 1, spatial
        else:
            self.name = "channels_last"
            self.s, self.stride_n, self.stride_s, self.stride_c = 1, channels, 0, 1


def layout_of(x: torch.Tensor) -> tuple[torch.Tensor, Layout]:
    """``x`` dense in NCHW or channels-last order (copied to NCHW if it is neither), and its layout."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if not x.is_contiguous() and not (fmt is not None and x.is_contiguous(memory_format=fmt)):
        x = x.contiguous()
    return x, Layout(x)


def like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` (same shape as x) dense in x's memory order: the elementwise kernels index both alike."""
    if x.is_contiguous():
        return t.contiguous()
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return t.contiguous(memory_format=fmt)


def _reduction_blocks(lay: Layout, block_m: int | None, programs: int | None) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_C, programs per channel block) of a stage-1 reduction."""
    if lay.name == "nchw":  # one channel per program, long runs of contiguous spatial elements
        block_c, default_m = 1, 1024
    else:  # a tile of rows x channels, contiguous along the channels
        block_c = min(triton.next_power_of_2(max(lay.channels, 1)), 64)
        default_m = max(4096 // block_c, 16)
    block_m = block_m or default_m
    channel_blocks = triton.cdiv(lay.channels, block_c)
    tiles = max(triton.cdiv(lay.rows, block_m), 1)
    if programs is None:
        programs = max(1, min(tiles, triton.cdiv(_TARGET_PROGRAMS, channel_blocks)))
    return block_m, block_c, min(programs, tiles)


if AVAILABLE:

    @triton.jit
    def _stats_partial_kernel(
        X,  # input, (N, C, *spatial) dense in the layout given by S / STRIDE_* (any float dtype)
        SHIFT,  # out (C,) float32: K, the first element of each channel (0 for an empty batch)
        COUNT,  # out (C, P) int32: elements seen by program p of each channel
        MEAN,  # out (C, P) float32: mean of x - K over those elements
        M2,  # out (C, P) float32: sum of squared deviations from that mean
        rows, channels, S, STRIDE_N, STRIDE_S, STRIDE_C, P,
        BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        cb = tl.program_id(0)
        p = tl.program_id(1)
        cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < channels
        coff = cols.to(tl.int64) * STRIDE_C
        k = tl.load(X + coff, mask=cmask & (rows > 0), other=0.0).to(tl.float32)
        n = tl.zeros([BLOCK_C], dtype=tl.float32)
        mean = tl.zeros([BLOCK_C], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        count = tl.zeros([BLOCK_C], dtype=tl.int32)
        for start in range(p * BLOCK_M, rows, P * BLOCK_M):
            m = start + tl.arange(0, BLOCK_M)
            rmask = m < rows
            m64 = m.to(tl.int64)
            roff = (m64 // S) * STRIDE_N + (m64 % S) * STRIDE_S
            mask = rmask[:, None] & cmask[None, :]
            xs = tl.load(X + roff[:, None] + coff[None, :], mask=mask, other=0.0).to(tl.float32)
            xs = tl.where(mask, xs - k[None, :], 0.0)
            n_t = tl.sum(rmask.to(tl.int32), axis=0)
            n_tf = n_t.to(tl.float32)
            m_t = tl.sum(xs, axis=0) / n_tf
            dev = tl.where(mask, xs - m_t[None, :], 0.0)
            m2_t = tl.sum(dev * dev, axis=0)
            total = n + n_tf
            delta = m_t - mean
            mean = mean + delta * (n_tf / total)
            m2 = m2 + m2_t + delta * delta * (n * n_tf / total)
            n = total
            count += n_t
        out = cols * P + p
        tl.store(COUNT + out, count, mask=cmask)
        tl.store(MEAN + out, mean, mask=cmask)
        tl.store(M2 + out, m2, mask=cmask)
        tl.store(SHIFT + cols, k, mask=cmask & (p == 0))

    @triton.jit
    def _stats_final_kernel(
        SHIFT,  # (C,) float32: the per-channel shift K of stage 1
        COUNT,  # (C, P) int32: per-program counts of stage 1
        MEAN,  # (C, P) float32: per-program means of x - K
        M2,  # (C, P) float32: per-program sums of squared deviations
        SUM_OUT,  # out (C,) float64: the local sum of x, n_r * (K + mean of x - K)
        M2_OUT,  # out (C,) float64: the local sum of squared deviations from the local mean
        channels, P,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < channels
        n = tl.zeros([BLOCK_C], dtype=tl.float64)
        s = tl.zeros([BLOCK_C], dtype=tl.float64)
        for start in range(0, P, BLOCK_P):
            ps = start + tl.arange(0, BLOCK_P)
            mask = cmask[:, None] & (ps < P)[None, :]
            idx = cols[:, None] * P + ps[None, :]
            n_p = tl.load(COUNT + idx, mask=mask, other=0).to(tl.float64)
            m_p = tl.load(MEAN + idx, mask=mask, other=0.0).to(tl.float64)
            n += tl.sum(n_p, axis=1)
            s += tl.sum(n_p * m_p, axis=1)
        ms = tl.where(n > 0, s / tl.maximum(n, 1.0), 0.0)
        m2 = tl.zeros([BLOCK_C], dtype=tl.float64)
        for start in range(0, P, BLOCK_P):
            ps = start + tl.arange(0, BLOCK_P)
            mask = cmask[:, None] & (ps < P)[None, :]
            idx = cols[:, None] * P + ps[None, :]
            n_p = tl.load(COUNT + idx, mask=mask, other=0).to(tl.float64)
            m_p = tl.load(MEAN + idx, mask=mask, other=0.0).to(tl.float64)
            m2_p = tl.load(M2 + idx, mask=mask, other=0.0).to(tl.float64)
            d = m_p - ms[:, None]
            m2 += tl.sum(m2_p + n_p * d * d, axis=1)
        k = tl.load(SHIFT + cols, mask=cmask, other=0.0).to(tl.float64)
        tl.store(SUM_OUT + cols, n * (k + ms), mask=cmask)
        tl.store(M2_OUT + cols, m2, mask=cmask)

    @triton.jit
    def _normalize_kernel(
        X,  # input, dense in NCHW or channels-last order (any float dtype)
        Y,  # out, same shape, strides and dtype as X
        MEAN_HI,  # (C,) float32: the global mean rounded to float32
        MEAN_LO,  # (C,) float32: the global mean's float64 remainder, mean - MEAN_HI
        SCALE,  # (C,) float32: invstd * weight (invstd without affine weight)
        SHIFT,  # (C,) float32: bias (zeros without affine bias)
        numel, channels, STRIDE_C,
        RELU: tl.constexpr, BLOCK: tl.constexpr,
    ):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < numel
        c = (i // STRIDE_C) % channels
        x = tl.load(X + i, mask=mask, other=0.0).to(tl.float32)
        y = ((x - tl.load(MEAN_HI + c, mask=mask, other=0.0)) - tl.load(MEAN_LO + c, mask=mask, other=0.0)) \
            * tl.load(SCALE + c, mask=mask, other=0.0) + tl.load(SHIFT + c, mask=mask, other=0.0)
        if RELU:
            y = tl.maximum(y, 0.0)
        tl.store(Y + i, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _bwd_partial_kernel(
        DY,  # upstream gradient, same shape and strides as X
        X,  # the forward input, dense in the layout given by S / STRIDE_*
        MEAN_HI,  # (C,) float32: global mean, high part
        MEAN_LO,  # (C,) float32: global mean, low part
        SCALE,  # (C,) float32: invstd * weight (read only with RELU, to recompute the mask)
        SHIFT,  # (C,) float32: bias (read only with RELU)
        PART,  # out (2, C, P) float32: per-program sum(dy') and sum(dy' * (x - mean))
        rows, channels, S, STRIDE_N, STRIDE_S, STRIDE_C, P,
        RELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        cb = tl.program_id(0)
        p = tl.program_id(1)
        cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < channels
        coff = cols.to(tl.int64) * STRIDE_C
        hi = tl.load(MEAN_HI + cols, mask=cmask, other=0.0)
        lo = tl.load(MEAN_LO + cols, mask=cmask, other=0.0)
        scale = tl.load(SCALE + cols, mask=cmask, other=0.0)
        shift = tl.load(SHIFT + cols, mask=cmask, other=0.0)
        s_dy = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        s_dyxmu = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
        for start in range(p * BLOCK_M, rows, P * BLOCK_M):
            m = (start + tl.arange(0, BLOCK_M)).to(tl.int64)
            roff = (m // S) * STRIDE_N + (m % S) * STRIDE_S
            mask = (m < rows)[:, None] & cmask[None, :]
            off = roff[:, None] + coff[None, :]
            xmu = (tl.load(X + off, mask=mask, other=0.0).to(tl.float32) - hi[None, :]) - lo[None, :]
            dy = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
            if RELU:
                dy = tl.where(xmu * scale[None, :] + shift[None, :] > 0.0, dy, 0.0)
            s_dy += dy
            s_dyxmu += tl.where(mask, dy * xmu, 0.0)
        out = cols * P + p
        tl.store(PART + out, tl.sum(s_dy, axis=0), mask=cmask)
        tl.store(PART + channels * P + out, tl.sum(s_dyxmu, axis=0), mask=cmask)

    @triton.jit
    def _bwd_final_kernel(
        PART,  # (2, C, P) float32: the per-program sums of stage 1
        OUT,  # out (2C,) float32: [sum(dy') per channel, sum(dy' * (x - mean)) per channel]
        channels, P,
        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < channels
        a = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        b = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
        for start in range(0, P, BLOCK_P):
            ps = start + tl.arange(0, BLOCK_P)
            mask = cmask[:, None] & (ps < P)[None, :]
            idx = cols[:, None] * P + ps[None, :]
            a += tl.load(PART + idx, mask=mask, other=0.0)
            b += tl.load(PART + channels * P + idx, mask=mask, other=0.0)
        tl.store(OUT + cols, tl.sum(a, axis=1), mask=cmask)
        tl.store(OUT + channels + cols, tl.sum(b, axis=1), mask=cmask)

    @triton.jit
    def _dx_kernel(
        DY,  # upstream gradient, same shape and strides as X
        X,  # the forward input, dense in NCHW or channels-last order
        DX,  # out, same shape, strides and dtype as X
        MEAN_HI,  # (C,) float32: global mean, high part
        MEAN_LO,  # (C,) float32: global mean, low part
        MEAN_DY,  # (C,) float32: S_dy / N (global, after the all_reduce)
        COEF,  # (C,) float32: invstd^2 * S_dyxmu / N (global, after the all_reduce)
        SCALE,  # (C,) float32: invstd * weight
        SHIFT,  # (C,) float32: bias (read only with RELU)
        numel, channels, STRIDE_C,
        RELU: tl.constexpr, BLOCK: tl.constexpr,
    ):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < numel
        c = (i // STRIDE_C) % channels
        scale = tl.load(SCALE + c, mask=mask, other=0.0)
        xmu = (tl.load(X + i, mask=mask, other=0.0).to(tl.float32) - tl.load(MEAN_HI + c, mask=mask, other=0.0)) \
            - tl.load(MEAN_LO + c, mask=mask, other=0.0)
        dy = tl.load(DY + i, mask=mask, other=0.0).to(tl.float32)
        if RELU:
            dy = tl.where(xmu * scale + tl.load(SHIFT + c, mask=mask, other=0.0) > 0.0, dy, 0.0)
        dx = (dy - tl.load(MEAN_DY + c, mask=mask, other=0.0) - xmu * tl.load(COEF + c, mask=mask, other=0.0)) \
            * scale
        tl.store(DX + i, dx.to(DX.dtype.element_ty), mask=mask)


def _direct(kernel):
    return kernel


# The launchers take ``wrap``: ``torch.library.wrap_triton`` inside a triton_op (so that the launch
# is traced into the graph), the identity when called eagerly (e.g. the TRITON_INTERPRET=1 tests).


def stats(x: torch.Tensor, *, wrap: Callable = _direct, block_m: int | None = None,
          programs: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Local per-channel (sum of x, sum of squared deviations), both float64 (C,); x dense."""
    lay = Layout(x)
    block_m, block_c, p = _reduction_blocks(lay, block_m, programs)
    channel_blocks = triton.cdiv(lay.channels, block_c)
    shift = torch.empty(lay.channels, device=x.device, dtype=torch.float32)
    count = torch.empty(lay.channels * p, device=x.device, dtype=torch.int32)
    mean = torch.empty(lay.channels * p, device=x.device, dtype=torch.float32)
    m2 = torch.empty(lay.channels * p, device=x.device, dtype=torch.float32)
    wrap(_stats_partial_kernel)[(channel_blocks, p)](
        x, shift, count, mean, m2, lay.rows, lay.channels, lay.s, lay.stride_n, lay.stride_s,
        lay.stride_c, p, BLOCK_M=block_m, BLOCK_C=block_c)
    total = torch.empty(lay.channels, device=x.device, dtype=torch.float64)
    m2_out = torch.empty(lay.channels, device=x.device, dtype=torch.float64)
    final_c = 16
    wrap(_stats_final_kernel)[(triton.cdiv(lay.channels, final_c),)](
        shift, count, mean, m2, total, m2_out, lay.channels, p,
        BLOCK_C=final_c, BLOCK_P=min(triton.next_power_of_2(p), 64))
    return total, m2_out


def normalize(x, mean_hi, mean_lo, scale, shift, relu: bool, *, wrap: Callable = _direct):
    """y = ((x - mean_hi) - mean_lo) * scale + shift (then ReLU), in x's dtype and memory order."""
    lay = Layout(x)
    y = torch.empty_like(x)
    numel = x.numel()
    wrap(_normalize_kernel)[(triton.cdiv(numel, _ELEMENTWISE_BLOCK),)](
        x, y, mean_hi, mean_lo, scale, shift, numel, lay.channels, lay.stride_c,
        RELU=relu, BLOCK=_ELEMENTWISE_BLOCK)
    return y


def backward_reduce(dy, x, mean_hi, mean_lo, scale, shift, relu: bool, *, wrap: Callable = _direct,
                    block_m: int | None = None, programs: int | None = None) -> torch.Tensor:
    """The local [sum(dy'), sum(dy' * (x - mean))] per channel, (2C,) float32; dy laid out as x."""
    lay = Layout(x)
    block_m, block_c, p = _reduction_blocks(lay, block_m, programs)
    if lay.name == "channels_last":  # two (BLOCK_M, BLOCK_C) float32 accumulators per program
        block_m = max(min(block_m, 2048 // block_c), 1)
        p = _reduction_blocks(lay, block_m, programs)[2]
    part = torch.empty(2 * lay.channels * p, device=x.device, dtype=torch.float32)
    wrap(_bwd_partial_kernel)[(triton.cdiv(lay.channels, block_c), p)](
        dy, x, mean_hi, mean_lo, scale, shift, part, lay.rows, lay.channels, lay.s, lay.stride_n,
        lay.stride_s, lay.stride_c, p, RELU=relu, BLOCK_M=block_m, BLOCK_C=block_c)
    out = torch.empty(2 * lay.channels, device=x.device, dtype=torch.float32)
    final_c = 16
    wrap(_bwd_final_kernel)[(triton.cdiv(lay.channels, final_c),)](
        part, out, lay.channels, p, BLOCK_C=final_c, BLOCK_P=min(triton.next_power_of_2(p), 64))
    return out


def backward_dx(dy, x, mean_hi, mean_lo, mean_dy, coef, scale, shift, relu: bool, *,
                wrap: Callable = _direct) -> torch.Tensor:
    """dx by formula (2) of the module docstring, in x's dtype and memory order; dy laid out as x."""
    lay = Layout(x)
    dx = torch.empty_like(x)
    numel = x.numel()
    wrap(_dx_kernel)[(triton.cdiv(numel, _ELEMENTWISE_BLOCK),)](
        dy, x, dx, mean_hi, mean_lo, mean_dy, coef, scale, shift, numel, lay.channels, lay.stride_c,
        RELU=relu, BLOCK=_ELEMENTWISE_BLOCK)
    return dx
