"""bnpass: ``torch.compile(model, backend="bnpass")`` synchronizes every training-mode BatchNorm.

Public API: the backend name ``"bnpass"`` and its options (see ``bnpass.options``),
``compile_records()`` / ``clear_records()`` (what the pass did), ``create_syncbn_process_group``
(subgroups made up front, see ``bnpass.groups``), ``bnpass.lightning.SyncBatchNorm`` (a Lightning
``LayerSync`` plugin), ``Joinable`` (DDP's ``Join`` for uneven inputs, see ``bnpass.join``), and
the ``bnpass`` CLI.
"""

from __future__ import annotations

from ._layout import map_backends_folder

map_backends_folder()

from .backend import bnpass_backend, bnpass_eager_backend  # noqa: E402
from . import lightning  # noqa: E402  (bnpass.lightning.SyncBatchNorm; imports Lightning only when used)
from .errors import BNPassError  # noqa: E402
from .groups import create_syncbn_process_group  # noqa: E402
from .join import Joinable  # noqa: E402
from .options import Options  # noqa: E402
from .record import GraphRecord, clear_records, compile_records  # noqa: E402
from .sites import Site  # noqa: E402

__all__ = ["bnpass_backend", "bnpass_eager_backend", "BNPassError", "Options", "GraphRecord", "Site",
           "compile_records", "clear_records", "create_syncbn_process_group", "Joinable", "register"]
__version__ = "0.1.0"


def register() -> None:
    """Make ``backend="bnpass"`` and ``"bnpass_eager"`` known where the package is not pip-installed
    (PYTHONPATH runs).

    With the package installed its entry point does this; calling it anyway is harmless.
    """
    from torch._dynamo.backends import registry

    registry._lazy_import()
    for name, fn in (("bnpass", bnpass_backend), ("bnpass_eager", bnpass_eager_backend)):
        if name not in registry._BACKENDS:
            registry.register_backend(compiler_fn=fn, name=name)
