"""bnpass's schedule of its collectives (bnpass/schedule.py), seen in the graphs it compiles.

One process on torch's fake group of 2 ranks, ``bnpass_eager`` (the graphs the lowering gets, no
C++ build). The numbers of a packed, overlapped step against float64 on 2 real gloo ranks are in
tests/test_sync.py (``branches``, under Inductor) and tests/test_zoo.py.
"""

from __future__ import annotations

import pytest
import torch

from bnpass import BNPassError, Options
from tests.harness import run_ranks

SHAPE = (3, 8, 6, 6)
VARIANTS = {
    "default": {},
    "again": {},
    "pack_only": {"overlap": False},
    "unscheduled": {"pack_collectives": False, "overlap": False},
}


@pytest.fixture(scope="module")
def runs():
    (result,) = run_ranks("tests.rank_jobs:scheduled_graphs", 0, "branches", SHAPE, VARIANTS)
    return result


def _targets(digest: list) -> list[str]:
    return [node["target"] for node in digest]


def test_independent_batchnorms_share_one_collective_per_level(runs):
    """tests/models.py Branches: 6 BNs on 3 levels per direction (RepVGG's three; the block's first
    with the shortcut's; the block's second), so 3 + 3 collectives instead of 6 + 6."""
    for name in ("default", "pack_only"):
        record = runs[name]["record"]
        assert record["collectives"] == {"forward": 3, "backward": 3}, name
        assert record["collectives_unpacked"] == {"forward": 6, "backward": 6}, name
        packs = {d: sorted(r["packed"]) for d, r in runs[name]["schedules"].items()}
        assert packs == {"forward": [2, 3], "backward": [2, 3]}, packs
    unscheduled = runs["unscheduled"]["record"]
    assert unscheduled["collectives"] == unscheduled["collectives_unpacked"] == {"forward": 6, "backward": 6}
    # the same payloads travel, packed or not
    assert runs["default"]["record"]["collective_bytes"] == unscheduled["collective_bytes"]


def test_schedule_changes_no_number(runs):
    """Packing, splitting and reordering move work, never change it: the step's output and every
    gradient are the unscheduled step's, bit for bit."""
    want = runs["unscheduled"]
    for name in ("default", "pack_only"):
        got = runs[name]
        assert torch.equal(got["output"], want["output"]), name
        assert got["grads"].keys() == want["grads"].keys()
        for key, grad in want["grads"].items():
            assert torch.equal(got["grads"][key], grad), (name, key)


def test_backward_collectives_overlap_weight_gradients(runs):
    """Each backward all_reduce after the first is in flight while a convolution computes a weight
    gradient: convolution_backward is split in two, and the wait comes as late as it can."""
    digest = runs["default"]["graphs"]["backward"]
    targets = _targets(digest)
    reduces = [i for i, t in enumerate(targets) if t == "_c10d_functional.all_reduce"]
    waits = [i for i, t in enumerate(targets) if t == "_c10d_functional.wait_tensor"]
    assert len(reduces) == len(waits) == 3
    for start, end in list(zip(reduces, waits))[1:]:
        between = targets[start + 1 : end]
        assert "convolution_backward" in between, between
    splits = runs["default"]["schedules"]["backward"]["split_conv_backwards"]
    assert splits > 0
    assert targets.count("convolution_backward") == \
        _targets(runs["unscheduled"]["graphs"]["backward"]).count("convolution_backward") + splits
    # without overlap: no split, and every wait right where the traced graph had it
    assert runs["pack_only"]["schedules"]["backward"]["split_conv_backwards"] == 0


def test_schedule_is_deterministic(runs):
    """Every rank compiles the same graph into the same schedule (collectives in the same order)."""
    for direction in ("forward", "backward"):
        assert runs["default"]["graphs"][direction] == runs["again"]["graphs"][direction]


@pytest.mark.parametrize("key", ["pack_collectives", "overlap"])
def test_schedule_options(key):
    with pytest.raises(BNPassError, match=f"option {key} must be a bool"):
        Options.from_user({key: "yes"})
    assert Options.from_user({key: False}).fingerprint() != Options.from_user({}).fingerprint()


def test_inspect_reports_the_schedule(tmp_path):
    """``bnpass inspect`` shows what the schedule did: counts before and after, packs, splits."""
    import json
    import subprocess
    import sys

    args = ["inspect", "tests.models:Branches", "--input-shape", ",".join(map(str, SHAPE)),
            "--backend", "bnpass_eager"]
    # both formats from one fresh process (the CLI's main, twice: one interpreter start, not two)
    out_json, out_text = tmp_path / "schedule.json", tmp_path / "schedule.txt"
    code = ("import sys; from bnpass.inspect.cli import main; "
            f"a = {args!r}; sys.exit(main(a + ['--format', 'json', '-o', {str(out_json)!r}]) "
            f"or main(a + ['-o', {str(out_text)!r}]))")
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=600)
    data = json.loads(out_json.read_text())
    # the CLI's input needs no gradient: the identity BN on it has no backward collective
    assert data["collectives"]["unpacked"] == {"forward": 6, "backward": 5}
    assert (data["collectives"]["forward"], data["collectives"]["backward"]) == (3, 3)
    (graph,) = data["schedule"]
    assert sorted(graph["forward"]["packed"]) == [2, 3] and sorted(graph["backward"]["packed"]) == [2, 2]
    assert graph["backward"]["split_conv_backwards"] > 0 and graph["backward"]["reordered"]
    text = out_text.read_text()
    assert "forward 3 (6 before packing), backward 3 (5 before packing)" in text
    assert "schedule, graph 0 forward: 6 -> 3 collectives (packed 3+2" in text
