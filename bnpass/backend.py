"""The ``bnpass`` torch.compile backend: capture -> find -> rewrite -> lower.

Registered through the ``torch_dynamo_backends`` entry point (pyproject.toml); never by
``register_backend`` on import, which would collide with the entry point (shared/FACTS.md).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import capture
from .inspect.capture import after_rewrite, snapshot_sites
from .options import BNPassError, Options
from .record import keep, new_record
from .rewrite import rewrite_sites
from .sites import collective_levels, example_of, find_sites

__all__ = ["bnpass_backend", "bnpass_eager_backend"]

capture.install()


def bnpass_backend(gm: torch.fx.GraphModule, example_inputs, options: Optional[dict] = None,
                   mode: Optional[str] = None):
    """torch.compile backend: synchronize every training-mode BatchNorm of ``gm``, then Inductor."""
    from bnpass.backends.inductor import lower

    return _compile(gm, example_inputs, options, mode, lower)


def bnpass_eager_backend(gm: torch.fx.GraphModule, example_inputs, options: Optional[dict] = None,
                         mode: Optional[str] = None):
    """torch.compile backend ``bnpass_eager``: the same pass, AOTAutograd's graphs run op by op
    (no Inductor), as ``aot_eager`` to ``inductor``: fast compiles, for debugging and graph checks."""
    from bnpass.backends.eager import lower

    if mode is not None:
        raise BNPassError(f"backend bnpass_eager takes no mode (got {mode!r}): modes are Inductor's; "
                          "use backend='bnpass'")
    return _compile(gm, example_inputs, options, None, lower)


def _compile(gm, example_inputs, options, mode, lower):
    opts = Options.from_user(options, mode)
    group = opts.group()
    sites = find_sites(gm, group.name, group.world_size, opts.force_sync, group.why_local, opts.fold_eval)
    _check_group_devices(sites)
    collective_levels(gm, sites)  # before the rewrite: the Dynamo graph every rank traced alike
    record = new_record(sites, group.name, group.world_size)
    before = snapshot_sites(gm, sites)
    rewrite_sites(gm, sites, opts.kernels)
    record.site_nodes, record.snapshots = after_rewrite(gm, sites, before)
    compiled = lower(gm, example_inputs, opts, record)
    keep(record)
    return compiled  # each of its forward and backward graphs agrees first (bnpass/agree.py)


setattr(bnpass_backend, capture.BACKEND_MARK, True)
setattr(bnpass_eager_backend, capture.BACKEND_MARK, True)


def _check_group_devices(sites) -> None:
    """A synced site's tensors must be on a device its group has a backend for (not NCCL + CPU)."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    for site in sites:
        val = example_of(site.call.input) if site.action == "sync" else None
        if val is None:
            continue
        config = str(dist.get_backend_config(_resolve_process_group(site.group)))
        devices = {part.split(":")[0] for part in config.split(",") if ":" in part}
        if devices and val.device.type not in devices:
            raise BNPassError(
                f"bnpass: BatchNorm {site.name!r} runs on {val.device.type} tensors but its process "
                f"group {site.group} has backends only for {sorted(devices)} ({config}). Use a group "
                f"with a {val.device.type} backend (gloo for CPU, nccl for CUDA), e.g. "
                f"torch.distributed.new_group(backend=...), or move the model to {sorted(devices)[0]}.")
