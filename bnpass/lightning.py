"""Lightning's layer-sync switch through bnpass: ``Trainer(plugins=[bnpass.lightning.SyncBatchNorm()])``.

Lightning's own ``Trainer(sync_batchnorm=True)`` (its ``TorchSyncBatchNorm`` plugin) converts every
BatchNorm into ``nn.SyncBatchNorm``, which DDP refuses on the CPU ("SyncBatchNorm layers only work
with GPU modules") and torch.compile breaks the graph at on the GPU. This plugin leaves the
BatchNorm modules as they are and compiles the LightningModule with ``backend="bnpass"``, the way
Lightning compiles a ``torch.compile(module)`` passed to ``fit``
(``lightning.pytorch.utilities.compile.from_compiled``: ``forward`` and the ``*_step`` methods), so
every training-mode BatchNorm is synced over the strategy's process group.

Lightning calls ``apply`` when it sets up a fit under a DDP or FSDP strategy (never on one device:
nothing to sync) and ``revert`` at its teardown, which puts the uncompiled methods back. A module
the user compiled with bnpass already is left as it is; one compiled with another backend is a
``BNPassError`` (its BatchNorms would not be synced). ``Trainer(sync_batchnorm=True)`` together
with this plugin is refused by Lightning itself (``MisconfigurationException``: "Choose one or the
other"): pass the plugin instead of the flag.

Importing this module needs no Lightning; making the plugin does (``pip install lightning``).
"""

from __future__ import annotations

from typing import Any, Optional

from .options import BNPassError

__all__ = ["SyncBatchNorm"]

_CLASS = None


def __getattr__(name: str):
    if name == "SyncBatchNorm":
        return _plugin_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _plugin_class():
    global _CLASS
    if _CLASS is None:
        try:
            from lightning.pytorch.plugins import LayerSync
        except ImportError as e:
            raise BNPassError(
                "bnpass.lightning.SyncBatchNorm needs PyTorch Lightning (the `lightning` package, "
                f"lightning.pytorch), which cannot be imported here ({e}). Install it with "
                "`pip install lightning`, or compile the module yourself: "
                "trainer.fit(torch.compile(module, backend='bnpass')).") from e
        _CLASS = _make_class(LayerSync)
    return _CLASS


def _is_bnpass(callback) -> bool:
    """Whether a Dynamo context's callback wraps the bnpass backend."""
    from .capture import wraps_bnpass

    return wraps_bnpass(callback)


def _make_class(layer_sync):
    class SyncBatchNorm(layer_sync):
        """Lightning ``LayerSync`` plugin: sync every training-mode BatchNorm through bnpass.

        ``backend``: ``"bnpass"`` or ``"bnpass_eager"``; ``options``: bnpass's options (e.g.
        ``{"group_size": 8}``); other keyword arguments go to ``torch.compile`` (``fullgraph``,
        ``dynamic``)."""

        def __init__(self, backend: str = "bnpass", options: Optional[dict] = None, **compile_kwargs: Any):
            if backend not in ("bnpass", "bnpass_eager"):
                raise BNPassError(f"bnpass.lightning.SyncBatchNorm: backend must be 'bnpass' or "
                                  f"'bnpass_eager', not {backend!r}")
            self.backend = backend
            self.options = options
            self.compile_kwargs = compile_kwargs
            self._compiled_here: set[int] = set()

        def apply(self, model):
            import torch
            from lightning.pytorch.utilities.compile import from_compiled

            ctx = getattr(model, "_compiler_ctx", None)
            if ctx is not None:  # the user passed torch.compile(module, backend=...) to fit
                if _is_bnpass(getattr(ctx.get("dynamo_ctx"), "callback", None)):
                    return model
                raise BNPassError(
                    f"bnpass.lightning.SyncBatchNorm: {type(model).__name__} was compiled with "
                    "another backend, so its BatchNorms would not be synced. Pass the module "
                    "uncompiled (the plugin compiles it with backend='bnpass'), or compile it with "
                    "torch.compile(module, backend='bnpass') and drop the plugin.")
            kwargs = dict(self.compile_kwargs)
            if self.options is not None:
                kwargs["options"] = self.options
            model = from_compiled(torch.compile(model, backend=self.backend, **kwargs))
            self._compiled_here.add(id(model))
            return model

        def revert(self, model):
            from lightning.pytorch.utilities.compile import to_uncompiled

            if id(model) in self._compiled_here:
                self._compiled_here.discard(id(model))
                return to_uncompiled(model)
            return model

    SyncBatchNorm.__module__ = __name__
    return SyncBatchNorm
