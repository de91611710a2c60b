"""Comparisons against the float64 global-batch reference, and the count checks every rewrite test makes.

A quantity passes when its error against float64 is at most ``tol`` relative to its largest value,
or at most ``EAGER_MULTIPLIER`` times the error of eager PyTorch in the same dtype on the same
global batch (in one process). The second clause is how PyTorch's own accuracy checks judge a
quantity that is exactly zero in exact arithmetic (the bias gradient of a layer followed by BN) or a
dtype with its own rounding: no better than eager can be asked of anyone.
"""

from __future__ import annotations

import torch

EAGER_MULTIPLIER = 10.0


def abs_err(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max |actual - expected|, max |expected|); zeros for empty tensors."""
    if expected.numel() == 0:
        return 0.0, 0.0
    expected = expected.double()
    return float((actual.double() - expected).abs().max()), float(expected.abs().max())


def rmse_err(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(root-mean-square of actual - expected, root-mean-square of expected): the measure of
    PyTorch's model accuracy checks (torch._dynamo.utils.same with a float64 reference)."""
    if expected.numel() == 0:
        return 0.0, 0.0
    expected = expected.double()
    return (float((actual.double() - expected).square().mean().sqrt()),
            float(expected.square().mean().sqrt()))


def errors_vs_reference(per_rank: list[dict], ref: dict, metric=abs_err) -> dict[str, tuple[float, float]]:
    """Worst (error, scale) of each quantity over steps and ranks; ``metric`` abs_err or rmse_err."""
    errs: dict[str, tuple[float, float]] = {}

    def note(key, pair):
        old = errs.get(key, (0.0, 0.0))
        errs[key] = (max(old[0], pair[0]), max(old[1], pair[1]))

    for step in range(len(ref["y"])):
        note("output", metric(torch.cat([r["y"][step] for r in per_rank]), ref["y"][step]))
        note("input_grad", metric(torch.cat([r["dx"][step] for r in per_rank]), ref["dx"][step]))
    for step in range(len(ref["grads"])):
        for name, g in ref["grads"][step].items():
            for r in per_rank:
                note(f"grad:{name}", metric(r["grads"][step][name], g))
    for name, b in ref["buffers"].items():
        for r in per_rank:
            note(f"buffer:{name}", metric(r["buffers"][name], b))
    return errs


def eager_global(spec, model=None) -> dict:
    """Eager PyTorch in the spec's own dtype on the whole global batch, one process."""
    from tests.training import train

    model = model if model is not None else spec.build()
    for module in model.modules():  # as the reference: see CheckpointedNet
        if hasattr(module, "use_checkpoint"):
            module.use_checkpoint = False
    return train(spec, model, model, rank=None, float64=False)


def assert_matches_reference(per_rank: list[dict], spec, tol: float, eager: dict | None = None) -> dict[str, float]:
    """Judge the ranks' results against float64; returns each quantity's relative error.
    ``eager``: the eager run on the global batch to measure eager's own error by, where it is not
    ``eager_global(spec)`` (autocast, FSDP2's mixed precision)."""
    from tests.training import reference

    ref = reference(spec)
    ours = errors_vs_reference(per_rank, ref)
    eager = errors_vs_reference([eager if eager is not None else eager_global(spec)], ref)
    bad = {}
    for key, (err, scale) in ours.items():
        allowed = max(tol * scale, EAGER_MULTIPLIER * eager[key][0])
        if not err <= allowed:
            bad[key] = f"error {err:.3g} > allowed {allowed:.3g} (scale {scale:.3g}, eager error {eager[key][0]:.3g})"
    assert not bad, f"{spec.name}: errors against float64: {bad}"
    return {key: err / scale if scale else err for key, (err, scale) in ours.items()}


# torch._dynamo.utils.same(fp64_ref=...): rmse(res) <= multiplier * rmse(eager) + tol / 10, with a
# multiplier of 2 to 3 and an absolute tol (1e-3 for training: a floor of 1e-4); here that floor,
# relative to the quantity's own RMS where that is above 1.
RMSE_MULTIPLIER = 3.0
RMSE_FLOOR = 1e-4


def rmse_verdict(per_rank: list[dict], spec) -> tuple[bool, str]:
    """The model-zoo judgement: each quantity's RMSE against float64 at most ``RMSE_MULTIPLIER``
    times eager's (same dtype, same global batch, one process) plus ``RMSE_FLOOR`` x max(its RMS,
    1); (passed, the worst)."""
    from tests.training import reference

    ref = reference(spec)
    ours = errors_vs_reference(per_rank, ref, rmse_err)
    eager = errors_vs_reference([eager_global(spec)], ref, rmse_err)
    worst_key, worst_ratio = "", 0.0
    for key, (err, scale) in ours.items():
        allowed = RMSE_MULTIPLIER * eager[key][0] + RMSE_FLOOR * max(scale, 1.0)
        ratio = err / allowed if allowed else (0.0 if err == 0 else float("inf"))
        if ratio >= worst_ratio:
            worst_key, worst_ratio = key, ratio
    return worst_ratio <= 1.0, f"{len(ours)} quantities, worst {worst_key} at {worst_ratio:.2f} of allowed"


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
