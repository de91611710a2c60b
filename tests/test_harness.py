"""tests/harness.py: ranks forked from the preloaded server are fresh processes, each job's ``env``
applies in its ranks only, and nothing of a compile is left in the server for the next job."""

from __future__ import annotations

import os
import sys

from tests.harness import PRELOAD, run_ranks


def probe(rank: int, world_size: int, key: str) -> dict:
    import torch
    import torch.distributed as dist

    import bnpass

    seen = {"pid": os.getpid(), "parent": os.getppid(), "env": os.environ.get(key),
            "world": dist.get_world_size(), "rank": dist.get_rank(), "threads": torch.get_num_threads(),
            "records": len(bnpass.compile_records()),
            "preloaded": sorted(m for m in PRELOAD if m in sys.modules)}
    compiled = torch.compile(torch.nn.BatchNorm1d(3), backend="bnpass_eager")
    compiled(torch.randn(4, 3)).sum().backward()  # leaves a record in this rank only
    seen["records_after"] = len(bnpass.compile_records())
    return seen


def test_ranks_are_fresh_processes_with_their_jobs_env():
    key = "BNPASS_HARNESS_PROBE"
    first = run_ranks("tests.test_harness:probe", 2, key, env={key: "first"})
    second = run_ranks("tests.test_harness:probe", 2, key)
    assert [r["rank"] for r in first] == [0, 1] and all(r["world"] == 2 for r in first + second)
    assert len({r["pid"] for r in first + second} | {os.getpid()}) == 5  # four processes, none this one
    assert len({r["parent"] for r in first + second}) == 1  # all forked by the one server
    assert [r["env"] for r in first] == ["first", "first"] and [r["env"] for r in second] == [None, None]
    assert all(r["threads"] == 1 for r in first + second)
    # the second job's ranks start without the first job's compile
    assert all(r["records"] == 0 and r["records_after"] == 1 for r in first + second)
    assert first[0]["preloaded"] == sorted(PRELOAD)  # every preload imports (none silently skipped)
