"""Capture: what Dynamo must see of BatchNorm modules for the pass to find and rewrite them.

Stock Dynamo cannot capture two BatchNorm forms:

* ``nn.SyncBatchNorm`` raises ValueError on CPU input and graph-breaks on GPU (its autograd.Function
  calls eager collectives), pytorch issues 161302, 156680, 107372.
* ``momentum=None`` (cumulative average) computes ``1 / float(num_batches_tracked)`` on the host, a
  graph break followed by a recompile on every step.

While Dynamo traces for the bnpass backend (and only then) the forwards of ``_BatchNorm`` and
``SyncBatchNorm`` take a path that emits a plain ``F.batch_norm`` whose input goes through the
identity op ``bnpass::bn_site``. The tag carries what the Dynamo graph would otherwise lose: the
SyncBatchNorm's own process group, and the ``num_batches_tracked`` tensor for the cumulative average.
The rewrite removes every tag. Eager code and every other backend run the stock forwards unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["install", "bn_site", "batch_norm_any_local_batch"]

BACKEND_MARK = "_bnpass_backend"  # attribute set on the backend entry function
EVAL_BATCH_STATS = ""  # tag group name: a module in eval mode normalizing with batch statistics
# How Dynamo's wrappers hold the backend they wrap: _TorchCompileWrapper, WrapBackendDebug,
# DDPOptimizer (whose bound compile_fn is what Dynamo holds: __self__), functools.wraps.
_WRAPPER_ATTRS = ("compiler_fn", "_torchdynamo_orig_backend", "backend_compile_fn", "__self__",
                  "__wrapped__")


@torch.library.custom_op("bnpass::bn_site", mutates_args=())
def bn_site(x: Tensor, num_batches_tracked: Optional[Tensor], group_name: Optional[str]) -> Tensor:
    """Identity tag on a BatchNorm input; only ever seen by the bnpass rewrite, which removes it."""
    return x.clone()


@bn_site.register_fake
def _(x, num_batches_tracked, group_name):
    return torch.empty_like(x)


bn_site.register_autograd(lambda ctx, grad: (grad, None, None))


@torch._dynamo.allow_in_graph
def batch_norm_any_local_batch(input, running_mean, running_var, weight=None, bias=None, training=False,
                               momentum=0.1, eps=1e-5):
    """``F.batch_norm`` for a training-mode call whose local batch has one value per channel.

    ``F.batch_norm`` raises "Expected more than 1 value per channel" for it while Dynamo traces (in
    Python and in the ATen op's fake-tensor rule), though a synced site counts the batch over the
    whole group. So the capture path emits this call instead; its fake result lets the trace go on,
    and the rewrite replaces it: by the synced op at a synced site (which checks the global count at
    run time), by ``F.batch_norm`` anywhere else, whose own check then raises as in stock PyTorch.
    Called eagerly (never, after the rewrite), it is ``F.batch_norm``."""
    if torch._subclasses.fake_tensor.is_fake(input):
        return torch.empty_like(input)
    return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def _one_value_per_channel(input: Tensor) -> bool:
    """Whether ``input`` (N, C, *) has, statically, one value per channel."""
    if input.dim() < 2:
        return False
    n = input.numel() // input.shape[1] if isinstance(input.shape[1], int) and input.shape[1] else None
    return isinstance(n, int) and n == 1


def wraps_bnpass(fn) -> bool:
    """Whether ``fn`` is the bnpass backend or one of Dynamo's wrappers around it (breadth-first
    through the wrappers; a bound method: its function and its object)."""
    seen = set()
    todo = [fn]
    while todo:
        fn = todo.pop(0)
        if fn is None or id(fn) in seen or len(seen) > 32:
            continue
        seen.add(id(fn))
        if getattr(fn, BACKEND_MARK, False):
            return True
        todo.extend(getattr(fn, attr, None) for attr in _WRAPPER_ATTRS)
    return False


@torch._dynamo.assume_constant_result
def _tracing_for_bnpass() -> bool:
    """True while Dynamo traces a frame whose backend is bnpass (evaluated at trace time)."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    tx = InstructionTranslator.current_tx()
    return wraps_bnpass(getattr(getattr(tx, "output", None), "compiler_fn", None))


def _group_name(module: nn.SyncBatchNorm) -> str:
    group = module.process_group or torch.distributed.group.WORLD
    return group.group_name


def _forward_for_bnpass(module: _BatchNorm, input: Tensor, group_name: Optional[str]) -> Tensor:
    """The stock forward's semantics, with the cumulative momentum and the group kept in the graph."""
    factor = 0.0 if module.momentum is None else module.momentum
    cumulative = None
    if module.training and module.track_running_stats and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        if module.momentum is None:
            cumulative = module.num_batches_tracked
    bn_training = module.training or (module.running_mean is None and module.running_var is None)
    use_buffers = not module.training or module.track_running_stats
    if bn_training and not module.training:
        group_name = EVAL_BATCH_STATS  # eval mode on batch statistics: never synced, as SyncBatchNorm
    if cumulative is not None or group_name is not None:
        input = bn_site(input, cumulative, group_name)
    batch_norm = batch_norm_any_local_batch if bn_training and _one_value_per_channel(input) else F.batch_norm
    return batch_norm(
        input,
        module.running_mean if use_buffers else None,
        module.running_var if use_buffers else None,
        module.weight,
        module.bias,
        bn_training,
        factor,
        module.eps,
    )


_STOCK_BN_FORWARD = _BatchNorm.forward
_STOCK_SYNCBN_FORWARD = nn.SyncBatchNorm.forward


def _bn_forward(self: _BatchNorm, input: Tensor) -> Tensor:
    if torch.compiler.is_compiling() and _tracing_for_bnpass():
        self._check_input_dim(input)
        return _forward_for_bnpass(self, input, None)
    return _STOCK_BN_FORWARD(self, input)


def _syncbn_forward(self: nn.SyncBatchNorm, input: Tensor) -> Tensor:
    if torch.compiler.is_compiling() and _tracing_for_bnpass():
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        need_sync = self.training and torch.distributed.is_available() and torch.distributed.is_initialized()
        return _forward_for_bnpass(self, input, _group_name(self) if need_sync else None)
    return _STOCK_SYNCBN_FORWARD(self, input)


def install() -> None:
    """Route BatchNorm forwards through the bnpass capture path while bnpass traces. Idempotent."""
    _BatchNorm.forward = _bn_forward
    nn.SyncBatchNorm.forward = _syncbn_forward
