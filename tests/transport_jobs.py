"""Rank-side jobs of tests/test_transport.py: the shared-memory transport under failure and load."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

import bnpass
from tests.models import BN2d, Spec
from tests.rank_jobs import compile_and_train
from tests.subgroup_jobs import train_in_groups

EAGER = "bnpass_eager"


def segments() -> list[str]:
    """Segment names this rank's process created (bnpass-<pid>-...) that are still in /dev/shm."""
    return sorted(p.name for p in Path("/dev/shm").glob(f"bnpass-{os.getpid()}-*"))


def _transports(result: dict) -> list[str]:
    """The transport of each collective of the result's compiled graphs (the records' sequences)."""
    return [c["transport"] for rec in result["records"] for d in ("forward", "backward")
            for c in rec["sequence"].get(d, [])]


def _step(compiled, x):
    compiled(x.requires_grad_()).square().sum().backward()


def _failure(fn) -> dict:
    start = time.monotonic()
    try:
        fn()
        return {"error": None, "type": None, "elapsed": time.monotonic() - start}
    except Exception as e:  # noqa: BLE001 - the test reads it
        return {"error": str(e), "type": type(e).__name__, "elapsed": time.monotonic() - start}


def train_with_hosts(rank: int, world_size: int, hosts: list[str], cases: dict) -> dict:
    """Each rank claims to run on ``hosts[rank]``; ``train_in_groups`` over ``cases``; this process's
    pid and its segments left in /dev/shm at the end (none: unlinked once every rank mapped it)."""
    os.environ["BNPASS_TRANSPORT_HOST"] = hosts[rank]
    out = train_in_groups(rank, world_size, cases)
    for result in out.values():
        result["transports"] = _transports(result)
        result["split"] = sum(n for rec in result["records"] for n in rec["split_conv_backwards"].values())
    out["pid"], out["segments"] = os.getpid(), segments()
    return out


def dead_peer(rank: int, world_size: int, how: str, stall_s: float = 0.0) -> dict:
    """Both ranks take a step through shared memory; then rank 1 dies: ``exit`` between steps
    (os._exit), ``kill`` in the middle of its next step (SIGKILL from a timer), ``stall``: it stays
    alive and never comes (sleeps ``stall_s``, past the group's timeout). Rank 0 keeps stepping: what it raised
    and after how long."""
    torch._dynamo.reset()
    bnpass.clear_records()
    model = BN2d(4)
    compiled = torch.compile(model, backend=EAGER)
    x = torch.randn(3, 4, 4, 4)
    _step(compiled, x)
    transports = _transports({"records": [r.to_json() for r in bnpass.compile_records()]})
    if rank == 1:
        if how == "exit":
            os._exit(3)
        if how == "stall":
            time.sleep(stall_s)
            os._exit(0)
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGKILL)).start()
        while True:
            _step(compiled, x)
    steps = [0]

    def run():
        while True:
            _step(compiled, x)
            steps[0] += 1

    out = _failure(run)
    return {**out, "steps": steps[0], "transports": transports, "pid": os.getpid(),
            "segments": segments(), "exit_now": True}


def specs_on_world(rank: int, world_size: int, specs: list) -> dict:
    """``compile_and_train`` for each spec over the default group; pids and leftover segments."""
    out = {spec.name: compile_and_train(spec, rank) for spec in specs}
    for spec in specs:
        out[spec.name]["transports"] = _transports(out[spec.name])
    out["pid"], out["segments"] = os.getpid(), segments()
    return out


def direct_calls(rank: int, world_size: int) -> dict:
    """``torch.ops.bnpass.shm_all_reduce`` called directly on the default group: sums of known
    values (float32, float64, a non-contiguous payload, an empty one, one of several rounds:
    larger than a buffer); the same payloads through ``shm_issue`` / ``shm_wait``, each waited
    before the next issue ("paired"), and all issued before any wait, waited in reverse ("nested":
    each issue completes the open round first); a wait on a token no issue returned; then a call
    whose size differs between the ranks (the error)."""
    from bnpass.transport import SHM_ALL_REDUCE, SHM_ISSUE, SHM_WAIT
    from bnpass.transport.channel import CAPACITY, channel_for

    group = dist.group.WORLD.group_name
    assert channel_for(group, 60.0) is not None
    g = torch.Generator().manual_seed(rank)
    payloads = [torch.randn(7, generator=g), torch.randn(1025, dtype=torch.float64, generator=g),
                torch.randn(6, 4, generator=g).t(), torch.empty(0),
                torch.randn(CAPACITY // 8 * 2 + 11, dtype=torch.float64, generator=g)]
    out = {"inputs": payloads, "sums": [SHM_ALL_REDUCE(t, "sum", group) for t in payloads]}
    out["paired"] = [SHM_WAIT(SHM_ISSUE(t, "sum", group), group) for t in payloads]
    tokens = [SHM_ISSUE(t, "sum", group) for t in payloads]
    out["nested"] = [SHM_WAIT(token, group) for token in tokens[::-1]][::-1]
    out["bogus_token"] = _failure(lambda: SHM_WAIT(torch.empty(3), group))
    out["mismatch"] = _failure(lambda: SHM_ALL_REDUCE(torch.ones(3 + rank), "sum", group))
    out["pid"], out["segments"] = os.getpid(), segments()
    out["exit_now"] = True  # the channel is unusable after the error; skip the teardown
    return out


__all__ = ["direct_calls", "segments", "train_with_hosts", "dead_peer", "specs_on_world", "Spec"]
