"""Comparisons against the float64 global-batch reference, and the count checks every rewrite test makes.

The judgement (``assert_matches_reference``): a quantity passes when its error against float64 is at
most ``EAGER_MULTIPLIER`` (3) times eager PyTorch's own error in the same dtype on the same global
batch, or at most ``tol`` times its scale, whichever is larger. Two choices make that rule mean
what it says on real models:

* **Eager's error is the worst of four eager runs** (``eager_variants``): as it is; with its
  convolutions and linear layers called on the ranks' slices of the batch (a CPU convolution of one
  image rounds differently from the same image among four) in the other memory format
  (channels_last or contiguous); and twice with every BatchNorm output rounded the other way at
  random (the other correctly rounded answer, which a BatchNorm ordering its arithmetic otherwise,
  bnpass's among them, may give). They are equally valid float32 answers, and on deep nets they
  differ by far more than rounding: the U-Net of tests/zoo at 64x64 with four images has eager
  errors on its last decoder convolution's weight gradient of 0.07 contiguous and 1.49
  channels_last (scale 205); a model whose pre-activations sit closer to zero than float32's error
  (inception_v3 at 75x75 with three images: margins of 1e-6 to 4e-6 against eager's errors of up
  to 7e-5) flips a few ReLUs in any float32 implementation, which ones being a matter of rounding.
  One run's error is a sample of float32's error there, not a bound.
* **A gradient's scale has a floor: 1 % of the largest gradient of the model** (parameters and
  input alike; ``GRAD_FLOOR``), and a running mean's the standard deviation of its running
  variance. A quantity that is zero in exact arithmetic (a bias before a BatchNorm, the input
  gradient of a model whose input goes straight into one, the mean of a normalized input) is
  float32 rounding noise of the terms that cancelled, which are as large as the model's other
  gradients (or the channel's spread); judging it against its own near-zero value asks for more
  than any implementation gives (tests/test_property.py's case of a 1.9e-10 input gradient).
"""

from __future__ import annotations

import torch
from torch import nn

EAGER_MULTIPLIER = 3.0
GRAD_FLOOR = 1e-2


def abs_err(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max |actual - expected|, max |expected|); zeros for empty tensors."""
    if expected.numel() == 0:
        return 0.0, 0.0
    expected = expected.double()
    return float((actual.double() - expected).abs().max()), float(expected.abs().max())


def errors_vs_reference(per_rank: list[dict], ref: dict) -> dict[str, tuple[float, float]]:
    """Worst (error, scale) of each quantity over steps and ranks (``abs_err``)."""
    errs: dict[str, tuple[float, float]] = {}

    def note(key, pair):
        old = errs.get(key, (0.0, 0.0))
        errs[key] = (max(old[0], pair[0]), max(old[1], pair[1]))

    for step in range(len(ref["y"])):
        note("output", abs_err(torch.cat([r["y"][step] for r in per_rank]), ref["y"][step]))
        note("input_grad", abs_err(torch.cat([r["dx"][step] for r in per_rank]), ref["dx"][step]))
    for step in range(len(ref["grads"])):
        for name, g in ref["grads"][step].items():
            for r in per_rank:
                note(f"grad:{name}", abs_err(r["grads"][step][name], g))
    for name, b in ref["buffers"].items():
        for r in per_rank:
            note(f"buffer:{name}", abs_err(r["buffers"][name], b))
    return errs


class _Variant:
    """The spec as one of eager's equally valid runs (see ``eager_variants``)."""

    def __init__(self, spec, memory_format: str):
        self._spec, self.memory_format = spec, memory_format
        self.sizes_now = spec.sizes_at(0)

    def __getattr__(self, name):
        return getattr(self._spec, name)

    def batch(self, step: int) -> torch.Tensor:
        self.sizes_now = self._spec.sizes_at(step)
        return self._spec.batch(step)


_PER_SAMPLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _split_per_sample_layers(model: nn.Module, variant: _Variant) -> None:
    """Run every Conv and Linear of ``model`` on the ranks' slices of the global batch, one call per
    slice, as the ranks do (a convolution's rounding depends on its batch size: CPU conv on one
    image and on four differ in the last bit); the BatchNorms keep the whole batch."""
    for module in model.modules():
        if isinstance(module, _PER_SAMPLE):
            def forward(x, inner=module.forward):
                sizes = [n for n in variant.sizes_now if n]
                if x.dim() < 2 or x.shape[0] != sum(sizes) or len(sizes) < 2:
                    return inner(x)
                return torch.cat([inner(part) for part in x.split(sizes)])
            module.forward = forward


def _round_batchnorms_otherwise(model: nn.Module, seed: int) -> None:
    """Move each output of every BatchNorm of ``model`` by one ulp, up or down at random: the other
    correctly rounded answer, which another float32 BatchNorm (another order of its operations) may
    give as well as eager's. Gradients pass unchanged."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            def hook(_module, _inputs, out, g=g):
                up = torch.rand(out.shape, generator=g) < 0.5
                moved = torch.nextafter(out.detach(), torch.where(up, float("inf"), float("-inf")).to(out.dtype))
                return out + (moved - out.detach())
            module.register_forward_hook(hook)


def eager_global(spec, model=None, split: bool = False, memory_format: str | None = None,
                 rounding: int = 0) -> dict:
    """Eager PyTorch in the spec's own dtype on the whole global batch, one process. ``split``: its
    convolutions and linear layers on the ranks' slices of the batch; ``memory_format``: the model and
    input in that one instead of the spec's; ``rounding`` > 0: its BatchNorms' outputs rounded the
    other way at random (that seed; see ``_round_batchnorms_otherwise``)."""
    from tests.models import memory_format as to_format
    from tests.training import train

    model = model if model is not None else spec.build()
    for module in model.modules():  # as the reference: see CheckpointedNet
        if hasattr(module, "use_checkpoint"):
            module.use_checkpoint = False
    variant = _Variant(spec, memory_format or spec.memory_format)
    if variant.memory_format != "contiguous":
        model = model.to(memory_format=to_format(variant.memory_format))
    if split:
        _split_per_sample_layers(model, variant)
    if rounding:
        _round_batchnorms_otherwise(model, rounding)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs (tests/harness.py): a CPU conv's rounding follows its threads
    try:
        return train(variant, model, model, rank=None, float64=False)
    finally:
        torch.set_num_threads(threads)


def eager_variants(spec) -> list[dict]:
    """Eager's runs (``eager_global``'s arguments): as it is; with its convolutions and linear layers
    on the ranks' slices, in the other memory format (channels_last or channels_last_3d against
    contiguous, for 4-d and 5-d inputs); and twice with its BatchNorms' outputs rounded the other
    way at random, one of them also split and in the other format."""
    others = {4: "channels_last", 5: "channels_last_3d"}
    dims = len(spec.sample_shape) + 1
    other = {}
    if dims in others:
        other = {"memory_format": others[dims] if spec.memory_format == "contiguous" else "contiguous"}
    return [{}, {"split": True, **other}, {"rounding": 1}, {"rounding": 2, "split": True, **other}]


def eager_errors(spec, ref: dict) -> dict[str, tuple[float, float]]:
    """Eager's own error against ``ref``: the worst over ``eager_variants``."""
    worst: dict[str, tuple[float, float]] = {}
    for kwargs in eager_variants(spec):
        for key, (err, scale) in errors_vs_reference([eager_global(spec, **kwargs)], ref).items():
            old = worst.get(key, (0.0, 0.0))
            worst[key] = (max(old[0], err), max(old[1], scale))
    return worst


def floored_scales(errs: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Each quantity's scale with its floor: a gradient's, ``GRAD_FLOOR`` times the model's largest
    gradient; a running mean's, the standard deviation its running variance gives (a mean that is
    zero in exact arithmetic, after another normalization, is rounding noise of that size)."""
    grads = [scale for key, (_, scale) in errs.items() if key.startswith("grad:") or key == "input_grad"]
    floor = GRAD_FLOOR * max(grads, default=0.0)
    scales = {}
    for key, (_, scale) in errs.items():
        if key.startswith("grad:") or key == "input_grad":
            scale = max(scale, floor)
        elif key.startswith("buffer:") and key.endswith(".running_mean"):
            scale = max(scale, errs.get(key[: -len("mean")] + "var", (0.0, 0.0))[1] ** 0.5)
        scales[key] = scale
    return scales


def judge(per_rank: list[dict], spec, tol: float, eager: dict | None = None) -> dict[str, tuple]:
    """Each quantity's (error, allowed, scale, eager's error) against float64 (see the module's
    docstring). ``eager``: the eager run on the global batch to measure eager's own error by, where
    it is not eager in the spec's dtype (autocast, FSDP2's mixed precision)."""
    from tests.training import reference

    ref = reference(spec)
    ours = errors_vs_reference(per_rank, ref)
    eager_err = errors_vs_reference([eager], ref) if eager is not None else eager_errors(spec, ref)
    scales = floored_scales(ours)
    return {key: (err, max(tol * scales[key], EAGER_MULTIPLIER * eager_err[key][0]), scale, eager_err[key][0])
            for key, (err, scale) in ours.items()}


def assert_matches_reference(per_rank: list[dict], spec, tol: float, eager: dict | None = None) -> dict[str, float]:
    """``judge``, every quantity within what it allows; returns each quantity's relative error."""
    judged = judge(per_rank, spec, tol, eager)
    bad = {key: f"error {err:.3g} > allowed {allowed:.3g} (scale {scale:.3g}, eager error {eager_err:.3g})"
           for key, (err, allowed, scale, eager_err) in judged.items() if not err <= allowed}
    assert not bad, f"{spec.name}: errors against float64: {bad}"
    return {key: err / scale if scale else err for key, (err, _, scale, _) in judged.items()}


def verdict(per_rank: list[dict], spec, tol: float) -> tuple[bool, str]:
    """``judge`` summed up for a table: (every quantity passed, how many and the worst one)."""
    judged = judge(per_rank, spec, tol)
    ratios = {key: err / allowed if allowed else (0.0 if err == 0 else float("inf"))
              for key, (err, allowed, _, _) in judged.items()}
    worst = max(ratios, key=ratios.get)
    over = sum(r > 1.0 for r in ratios.values())
    return over == 0, (f"{len(ratios)} quantities, {over} over; worst {worst} at {ratios[worst]:.2f} of allowed")


def assert_counts(per_rank: list[dict], *, sites: int, synced: int, forward: int, backward: int,
                  graphs: int | None = 1, breaks_outside_bn: tuple = (), unpacked: tuple | None = None) -> None:
    """Sites found and synced, collectives per step (from the compiled graphs), no graph break,
    no host synchronisation in the compiled graphs. ``breaks_outside_bn``: words that mark graph
    breaks of code around the model (DDP's own forward) that stock backends have too.
    ``unpacked``: (forward, backward) collectives before packing (bnpass/schedule.py); by default
    the same as after, i.e. nothing packed."""
    for rank, r in enumerate(per_rank):
        records = r["records"]
        assert len(records) == graphs or (graphs is None and records), \
            f"rank {rank}: {len(records)} graphs compiled, expected {graphs or 'some'}"
        all_sites = [s for rec in records for s in rec["sites"]]
        got = {
            "sites": len(all_sites),
            "synced": sum(s["action"] == "sync" for s in all_sites),
            "forward": sum(rec["collectives"]["forward"] for rec in records),
            "backward": sum(rec["collectives"]["backward"] for rec in records),
            "graph_breaks": r["graph_breaks"] - sum(
                n for reason, n in r.get("graph_break_reasons", {}).items()
                if any(word in reason for word in breaks_outside_bn)),
            "host_syncs": sum(sum(rec["host_syncs"].values()) for rec in records),
            "unpacked": tuple(sum(rec["collectives_unpacked"][d] for rec in records)
                              for d in ("forward", "backward")),
        }
        want = {"sites": sites, "synced": synced, "forward": forward, "backward": backward,
                "graph_breaks": 0, "host_syncs": 0, "unpacked": unpacked or (forward, backward)}
        assert got == want, (f"rank {rank}: {got} != {want}; sites: {all_sites}; graph breaks: "
                             f"{r.get('graph_break_reasons')}")
