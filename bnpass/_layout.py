"""Map the repository's ``backends/`` folder to ``bnpass.backends`` when bnpass runs from a source
tree (``PYTHONPATH=.``); an installed bnpass gets the same mapping from pyproject's package-dir."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def map_backends_folder() -> None:
    if "bnpass.backends" in sys.modules or importlib.util.find_spec("bnpass.backends") is not None:
        return
    folder = Path(__file__).resolve().parent.parent / "backends"
    spec = importlib.util.spec_from_file_location(
        "bnpass.backends", folder / "__init__.py", submodule_search_locations=[str(folder)])
    if spec is None:
        raise ImportError(f"bnpass: cannot find its lowerings at {folder}; reinstall bnpass")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bnpass.backends"] = module
    spec.loader.exec_module(module)
