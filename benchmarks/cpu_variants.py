"""The variants the CPU benchmarks compare (cpu_resnet18.py: 2 gloo ranks; profile_cpu_step.py: one
process on a fake group), how each is compiled, and one training step timed by phase.

A variant is a name:
* ``eager``; ``inductor`` (stock); ``inductor-nolayout`` (stock, ``layout_optimization=False``);
  ``bnpass_eager``;
* ``bnpass`` (defaults), ``bnpass-pg`` (``transport="process_group"``), ``bnpass-local``
  (``group_size=1``: the same compiled work, each rank's own statistics, no collective),
  ``bnpass-unscheduled`` (``pack_collectives=False, overlap=False``), ``bnpass-layout`` (Inductor's
  layout optimization back on), ``bnpass-nosplit`` / ``bnpass-split`` (convolution backwards kept
  whole / always split, whatever ``backends/inductor.py`` decides), ``bnpass-group`` (statistics
  over a process group of their own, made by the caller);
* ``bnpass-<key>=<value>``: bnpass with one ``inductor_config`` patch (``bnpass-cpp.simdlen=256``);
* any of them with ``@whole``: compiled with ``torch._dynamo.config.optimize_ddp=False`` (no
  DDPOptimizer: one graph, DDP's gradient all_reduces after the whole backward).
"""

from __future__ import annotations

import ast
import contextlib
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

OPTIONS = {
    "bnpass": {}, "bnpass-nosplit": {}, "bnpass-split": {}, "bnpass-group": {}, "bnpass-blocking": {},
    "bnpass-pg": {"transport": "process_group"}, "bnpass-local": {"group_size": 1},
    "bnpass-unscheduled": {"pack_collectives": False, "overlap": False},
    "bnpass-layout": {"inductor_config": {"layout_optimization": True}},
}
STOCK = {"eager": None, "inductor": "inductor", "inductor-nolayout": "inductor", "bnpass_eager": "bnpass_eager"}
NAMES = tuple(STOCK) + tuple(OPTIONS)


def base(variant: str) -> str:
    return variant.removesuffix("@whole")


def spec(variant: str, stats_group=None):
    """(backend, torch.compile kwargs) of ``variant``; ValueError for an unknown one."""
    name = base(variant)
    if name in STOCK:
        extra = {"options": {"layout_optimization": False}} if name == "inductor-nolayout" else {}
        return STOCK[name], extra
    if name in OPTIONS:
        options = dict(OPTIONS[name], **({"process_group": stats_group} if name == "bnpass-group" else {}))
        return "bnpass", ({"options": options} if options else {})
    if name.startswith("bnpass-") and "=" in name:
        key, value = name[len("bnpass-"):].split("=", 1)
        with contextlib.suppress(ValueError, SyntaxError):
            value = ast.literal_eval(value)
        return "bnpass", {"options": {"inductor_config": {key: value}}}
    raise ValueError(f"unknown variant {variant!r}: one of {', '.join(NAMES)}, bnpass-<inductor key>=<value>, "
                     "each optionally with @whole")


def build(variant: str, ddp: bool, stats_group=None, hook=None):
    """(model, what to call) for ``variant``: torchvision resnet18 (10 classes), seeded, in DDP if
    ``ddp`` (with communication hook ``hook`` if given), compiled as the variant says."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    # A class of its own per variant: Dynamo would otherwise serve a variant the graph compiled for
    # an earlier one with an equal backend (torch.compile's backend wrappers compare equal by name
    # and options: bnpass-nosplit and the @whole variants differ from another in neither).
    model.__class__ = type(f"ResNet_{variant}", (type(model),), {})
    if ddp:
        model = nn.parallel.DistributedDataParallel(model)
        if hook is not None:
            model.register_comm_hook(None, hook)
    backend, kwargs = spec(variant, stats_group)
    return model, (model if backend is None else torch.compile(model, backend=backend, **kwargs))


@contextlib.contextmanager
def compiling(variant: str):
    """Around a variant's first steps (its compile): the split of convolution backwards forced off
    (bnpass-nosplit, bnpass-blocking) or on (bnpass-split); one blocking same-host call per
    collective (bnpass-blocking); DDPOptimizer off for ``@whole``."""
    import bnpass.backends.inductor as lowering
    import bnpass.transport.rewrite as transport

    keep, halves = lowering.split_conv_backwards, transport.HALVES
    if base(variant) in ("bnpass-nosplit", "bnpass-split", "bnpass-blocking"):
        forced = base(variant) == "bnpass-split"
        lowering.split_conv_backwards = lambda device: forced
    transport.HALVES = base(variant) != "bnpass-blocking"
    try:
        with torch._dynamo.config.patch(optimize_ddp=not variant.endswith("@whole")):
            yield
    finally:
        lowering.split_conv_backwards, transport.HALVES = keep, halves


def step(compiled, opt, images, labels) -> tuple[float, float, float]:
    """One SGD training step; seconds spent in (forward + loss, backward, optimizer)."""
    t0 = time.perf_counter()
    loss = F.cross_entropy(compiled(images), labels)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return t1 - t0, t2 - t1, time.perf_counter() - t2
