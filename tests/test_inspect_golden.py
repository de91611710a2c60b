"""``bnpass inspect``'s JSON for the models of tests/cli_models.py against the golden files, what
each golden case means, and its collective counts against the same models compiled and really
synced on 2 gloo ranks."""

from __future__ import annotations

import json
import os

import pytest

from bnpass.inspect.render_json import SCHEMA
from tests.harness import run_ranks
from tests.inspect_common import FAST, GOLDEN, GOLDEN_RUNS, portable, run_from_repo, run_json  # noqa: F401


@pytest.fixture(scope="module")
def golden_runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("golden")
    return {name: run_json(tmp, argv) for name, argv in GOLDEN_RUNS.items()}


@pytest.mark.parametrize("name", sorted(GOLDEN_RUNS))
def test_golden_json(golden_runs, name):
    got = portable(golden_runs[name])
    path = GOLDEN / f"inspect_{name}.json"
    if os.environ.get("BNPASS_UPDATE_GOLDEN"):
        path.write_text(json.dumps(got, indent=2) + "\n")
    assert got == json.loads(path.read_text())


def test_golden_runs_say_what_each_case_means(golden_runs):
    """What the golden files pin down, stated: decisions per mode and world size, graph breaks."""
    tiny = golden_runs["tiny"]
    assert tiny["schema"] == SCHEMA and tiny["mode"] == "train" and tiny["backward"]
    assert [s["action"] for s in tiny["sites"]] == ["sync", "sync", "sync", "skip"]
    assert [s["op"] for s in tiny["sites"]] == ["nn.BatchNorm2d", "nn.BatchNorm2d", "F.batch_norm", "nn.BatchNorm2d"]
    assert tiny["collectives"]["forward"] == tiny["collectives"]["backward"] == 3
    assert tiny["totals"] == {"sites": 4, "sync": 3, "local": 0, "skip": 1}

    # eval mode: the modules' BN normalize with running statistics, folded into the conv before
    # them (the last one follows a BN, not a conv: skipped); the functional call passes
    # training=True itself, so it still computes (and syncs) batch statistics
    for name in ("tiny_eval_flag", "tiny_eval_factory"):
        run = golden_runs[name]
        assert run["mode"] == "eval" and [s["action"] for s in run["sites"]] == ["fold", "fold", "sync", "skip"]
        assert run["collectives"]["forward"] == 1
    assert not golden_runs["tiny_eval_flag"]["backward"]  # --eval: forward only, under no_grad
    assert golden_runs["tiny_eval_flag"]["collectives"]["backward"] == 0
    assert golden_runs["tiny_eval_factory"]["backward"]  # an eval model as given still runs a backward
    assert golden_runs["tiny_eval_factory"]["collectives"]["backward"] == 1

    local = golden_runs["tiny_world_size_1"]
    assert [s["action"] for s in local["sites"]] == ["local", "local", "local", "skip"]
    assert local["collectives"]["bytes_per_step"] == 0

    half = golden_runs["tiny_bf16_channels_last"]
    assert {(s["dtype"], s["layout"]) for s in half["sites"]} == {("bfloat16", "channels_last")}
    assert half["collectives"]["bytes"] == tiny["collectives"]["bytes"]  # statistics stay float32/64

    broken = golden_runs["broken"]
    assert broken["graphs"] == 2 and broken["graph_breaks"] == 1
    assert [(s["index"], s["graph"], s["name"]) for s in broken["sites"]] == [(0, 0, "bn_a"), (1, 1, "bn_b")]
    assert "3 rank(s)" in broken["sites"][0]["reason"]
    # bn_a normalizes the model's input, which needs no gradient: no dx, so no backward collective
    assert broken["collectives"]["forward"] == 2 and broken["collectives"]["backward"] == 1


def test_collectives_match_a_real_two_rank_run(golden_runs):
    """The CLI (fake group, one process) against the same models compiled on 2 gloo ranks: the
    counts, and each collective, with the transport each takes."""
    jobs = {"tiny": ((2, 3, 6, 6), "tiny"), "broken": ((2, 3, 4, 4), "broken")}
    per_rank = run_ranks("tests.cli_models:rank_jobs", 2, {k: v for k, v in jobs.items()}, deadline_s=600)
    for name in jobs:
        cli = golden_runs[name]
        for rank in per_rank:
            real = rank[name]
            records = real["records"]
            assert real["graph_breaks"] == cli["graph_breaks"]
            assert len(records) == cli["graphs"]
            real_sites = [(s["name"], s["action"]) for r in records for s in r["sites"]]
            assert real_sites == [(s["name"], s["action"]) for s in cli["sites"]]
            for direction in ("forward", "backward"):
                assert sum(r["collectives"][direction] for r in records) == cli["collectives"][direction]
                assert sum(r["collective_bytes"][direction] for r in records) == cli["collectives"]["bytes"][direction]
            assert sum(r["collective_bytes"]["forward"] + r["collective_bytes"]["backward"]
                       for r in records) == cli["collectives"]["bytes_per_step"]
            # the same collectives in the same order; on real ranks of one host through shared
            # memory, on the CLI's fake group through the process group (render_collectives.py)
            real_seq = [(d, c["numel"], c["dtype"], c["transport"]) for r in records
                        for d in ("forward", "backward") for c in r["sequence"].get(d, [])]
            assert real_seq == [(e["direction"], e["numel"], e["dtype"], "shm") for e in cli["sequence"]]
            assert {e["transport"] for e in cli["sequence"]} <= {"process_group"}


def test_eager_backend_finds_and_counts_the_same(golden_runs, tmp_path):
    """``--backend bnpass_eager`` (no Inductor): the same sites, decisions and collectives."""
    fast = run_json(tmp_path, GOLDEN_RUNS["tiny"] + FAST)
    tiny = golden_runs["tiny"]
    assert [(s["name"], s["action"], s["reason"]) for s in fast["sites"]] == \
        [(s["name"], s["action"], s["reason"]) for s in tiny["sites"]]
    assert fast["collectives"] == tiny["collectives"] and fast["graph_breaks"] == tiny["graph_breaks"]
