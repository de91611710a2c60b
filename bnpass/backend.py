"""The ``bnpass`` torch.compile backend: capture -> find -> rewrite -> lower.

Registered through the ``torch_dynamo_backends`` entry point (pyproject.toml); never by
``register_backend`` on import, which would collide with the entry point (shared/FACTS.md).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import capture
from .inspect_capture import after_rewrite, snapshot_sites
from .options import Options
from .record import new_record
from .rewrite import rewrite_sites
from .sites import find_sites

__all__ = ["bnpass_backend"]

capture.install()


def bnpass_backend(gm: torch.fx.GraphModule, example_inputs, options: Optional[dict] = None,
                   mode: Optional[str] = None):
    """torch.compile backend: synchronize every training-mode BatchNorm of ``gm``, then Inductor."""
    from bnpass.backends.inductor import lower

    opts = Options.from_user(options, mode)
    group = opts.group()
    sites = find_sites(gm, group.name, group.world_size, opts.force_sync, group.why_local)
    record = new_record(sites, group.name, group.world_size)
    before = snapshot_sites(gm, sites)
    rewrite_sites(gm, sites)
    record.site_nodes, record.snapshots = after_rewrite(gm, sites, before)
    compiled = lower(gm, example_inputs, opts, record)
    return compiled


setattr(bnpass_backend, capture.BACKEND_MARK, True)
