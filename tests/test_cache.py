"""Inductor's caches never serve a stock graph, or a bnpass graph with other options, to a bnpass
compile: stock `inductor` first, then bnpass in new processes on the same cache directory."""

from __future__ import annotations

import pytest

from tests.checks import assert_matches_reference
from tests.harness import run_ranks
from tests.models import Spec

SPEC = Spec("cache_bn2d", "bn2d", (2, 3), (4, 3, 3), steps=1)


def _run(cache_dir, backend, options=None):
    return run_ranks("tests.rank_jobs:cache_probe", 2, SPEC, backend, options or {},
                     env={"TORCHINDUCTOR_CACHE_DIR": str(cache_dir)})


def _hits(result):
    return result["cache"]["inductor"].get("fxgraph_cache_hit", 0)


def _misses(result):
    return result["cache"]["inductor"].get("fxgraph_cache_miss", 0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("inductor-cache")
    return {
        "stock": _run(cache_dir, "inductor"),
        "bnpass": _run(cache_dir, "bnpass"),
        "bnpass_again": _run(cache_dir, "bnpass"),
        "bnpass_other_options": _run(cache_dir, "bnpass", {"force_sync": True}),
    }


def test_stock_compile_fills_the_cache(runs):
    assert all(_misses(r) >= 2 and _hits(r) == 0 for r in runs["stock"])  # forward + backward


def test_bnpass_after_stock_misses_and_is_synced(runs):
    assert all(_hits(r) == 0 and _misses(r) >= 2 for r in runs["bnpass"])
    assert_matches_reference(runs["bnpass"], SPEC, 2e-5)
    with pytest.raises(AssertionError):  # the stock graph's local statistics are not the global ones
        assert_matches_reference(runs["stock"], SPEC, 2e-5)


def test_same_bnpass_compile_is_served_from_the_cache(runs):
    """The positive control: this test can see a hit when there is one."""
    assert all(_hits(r) >= 2 for r in runs["bnpass_again"])
    assert_matches_reference(runs["bnpass_again"], SPEC, 2e-5)


def test_bnpass_with_other_options_misses(runs):
    assert all(_hits(r) == 0 and _misses(r) >= 2 for r in runs["bnpass_other_options"])
    assert_matches_reference(runs["bnpass_other_options"], SPEC, 2e-5)
