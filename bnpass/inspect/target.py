"""``bnpass inspect TARGET``: turn TARGET into an ``nn.Module``.

Accepted forms: ``path/to/file.py:factory``, ``package.module:factory``, ``torchvision:NAME``,
``timm:NAME``. A factory is called without arguments and must return an ``nn.Module``; its
train/eval state is kept. Bad input raises ``TargetError`` (the CLI's exit status 2) with a one-line
message that lists the accepted forms.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import sys
from pathlib import Path

from torch import nn

__all__ = ["TargetError", "FactoryError", "load_target", "FORMS"]

FORMS = "path/to/file.py:factory, package.module:factory, torchvision:NAME or timm:NAME"


class TargetError(ValueError):
    """TARGET names nothing that builds a model (exit status 2)."""

    def __init__(self, problem: str):
        super().__init__(f"bnpass: {problem}; TARGET must be {FORMS}")


class FactoryError(RuntimeError):
    """The factory was found but raised (exit status 1)."""


def _did_you_mean(name: str, names) -> str:
    close = difflib.get_close_matches(name, list(names), n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _torchvision(name: str) -> nn.Module:
    try:
        import torchvision.models as models
    except ImportError as e:
        raise TargetError(f"torchvision:{name} needs torchvision, which cannot be imported ({e})") from e
    known = models.list_models()
    if name not in known:
        raise TargetError(f"torchvision has no model {name!r}{_did_you_mean(name, known)}")
    return _call(lambda: models.get_model(name, weights=None), f"torchvision:{name}")


def _timm(name: str) -> nn.Module:
    try:
        import timm
    except ImportError as e:
        raise TargetError(f"timm:{name} needs timm, which is not installed (pip install timm)") from e
    known = timm.list_models()
    if name not in known:
        raise TargetError(f"timm has no model {name!r}{_did_you_mean(name, known)}")
    return _call(lambda: timm.create_model(name, pretrained=False), f"timm:{name}")


def _from_file(path_text: str, factory: str):
    path = Path(path_text)
    if not path.is_file():
        raise TargetError(f"no file {path_text}")
    module_name = f"_bnpass_target_{abs(hash(str(path.resolve())))}_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise TargetError(f"cannot load {path_text} as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    sys.path.insert(0, str(path.resolve().parent))  # the file's own imports of its neighbours
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - reported in one line
        del sys.modules[module_name]
        raise TargetError(f"importing {path_text} raised {type(e).__name__}: {_first_line(e)}") from e
    finally:
        sys.path.remove(str(path.resolve().parent))
    return module


def _from_module(module_name: str):
    try:
        return importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - ModuleNotFoundError, or the module's own error
        raise TargetError(f"cannot import {module_name!r} ({type(e).__name__}: {_first_line(e)})") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _call(factory, label: str) -> nn.Module:
    try:
        model = factory()
    except Exception as e:  # noqa: BLE001 - the user's factory failed
        raise FactoryError(f"bnpass: {label}() raised {type(e).__name__}: {_first_line(e)}") from e
    if not isinstance(model, nn.Module):
        raise TargetError(f"{label}() returned {type(model).__name__}, not an nn.Module")
    return model


def load_target(target: str) -> nn.Module:
    """Build the model TARGET names."""
    source, sep, name = target.rpartition(":")
    if not sep or not source or not name:
        raise TargetError(f"cannot read TARGET {target!r}")
    if source == "torchvision":
        return _torchvision(name)
    if source == "timm":
        return _timm(name)
    if source.endswith(".py") or "/" in source or "\\" in source:
        module = _from_file(source, name)
    elif all(part.isidentifier() for part in source.split(".")):
        module = _from_module(source)
    else:
        raise TargetError(f"cannot read TARGET {target!r}")
    factory = getattr(module, name, None)
    if factory is None or not callable(factory):
        raise TargetError(f"{source} has no factory {name!r}")
    return _call(factory, target)
