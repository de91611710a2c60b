"""Activation checkpointing keeps recomputing the region, but not its statistics' collective
(schedule.save_site_collectives): the backward graph of CheckpointedNet, on torch's fake group of 2 ranks
in one process. The 2-rank numbers and counts are in tests/test_reliability.py."""

from __future__ import annotations

import pytest
import torch

from tests.harness import run_ranks


def backward_graph(rank: int, world_size: int, backend: str, use_checkpoint: bool) -> dict:
    """One training step of CheckpointedNet under ``backend``; its record and backward graph digest."""
    import bnpass
    from bnpass.inspect.run import fake_world
    from tests.models import CheckpointedNet

    with fake_world(2):
        bnpass.clear_records()
        torch.manual_seed(0)
        net = CheckpointedNet()
        net.use_checkpoint = use_checkpoint
        x = torch.randn(4, 3, 5, 5, requires_grad=True)
        torch.compile(net, backend=backend)(x).square().sum().backward()
        (record,) = bnpass.compile_records()
        return {"record": record.to_json(), "backward": record.graphs["backward"],
                "num_batches_tracked": int(net.bn1.num_batches_tracked)}


@pytest.fixture(scope="module")
def graphs():
    return {ckpt: run_ranks("tests.test_checkpointing:backward_graph", 0, "bnpass_eager", ckpt)[0]
            for ckpt in (True, False)}


def test_region_is_recomputed_but_not_its_all_reduce(graphs):
    nodes = graphs[True]["backward"]
    recomputed = [n["target"] for n in nodes if n["recomputed"]]
    assert any("convolution" in t for t in recomputed), recomputed  # checkpointing still works
    assert not any("all_reduce" in t or "wait_tensor" in t for t in recomputed), recomputed
    plain = [n["target"] for n in graphs[False]["backward"] if n["recomputed"]]
    assert not any("convolution" in t for t in plain), plain


def test_collectives_as_without_checkpointing(graphs):
    with_ckpt, without = graphs[True]["record"], graphs[False]["record"]
    assert with_ckpt["collectives"] == without["collectives"] == {"forward": 2, "backward": 2}
    assert with_ckpt["collective_bytes"] == without["collective_bytes"]
    assert graphs[True]["num_batches_tracked"] == graphs[False]["num_batches_tracked"] == 1


def test_statistics_are_saved_not_recomputed(graphs):
    """The forward's C-sized statistics math (bnpass/ops.py ``global_statistics``) is saved for the
    backward (schedule.save_site_collectives), not traced again there: compile time, ~15 ops a site."""
    for ckpt in (True, False):
        targets = [n["target"] for n in graphs[ckpt]["backward"] if n["op"] == "call_function"]
        assert not any(t.split(".")[-1].startswith(("rsqrt", "clamp_min", "var_mean")) for t in targets), targets
        assert sum("all_reduce" in t for t in targets) == 2, targets  # the backward's own, one per site
