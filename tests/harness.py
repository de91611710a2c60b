"""Run a function on N gloo ranks (processes) with a deadline; report which rank died and why.

Each rank: one torch thread, gloo over a file:// store in a temp dir, a process-group timeout, the
shared Inductor cache. Its return value is saved with torch.save and handed back to the caller.

Ranks are fresh processes forked from a server process that imported torch, Dynamo, Inductor,
bnpass and the test jobs once (multiprocessing's "forkserver" with a preload): importing those
costs about 10 s of CPU per process, paid once per test session instead of once per rank per job.
Nothing runs in the server but the imports, so each rank starts as clean as a spawned one. The
server keeps the environment it started with; a job's ``env`` is applied in the rank.
"""

from __future__ import annotations

import datetime
import importlib
import os
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

__all__ = ["run_ranks", "RankFailure", "fork_context"]

DEFAULT_DEADLINE_S = float(os.environ.get("BNPASS_TEST_DEADLINE_S", 900))
# Imported once by the fork server (a module missing here is skipped by multiprocessing).
PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "torch._inductor.compile_fx", "networkx",
           "bnpass", "bnpass.backends.inductor", "bnpass.backends.eager", "bnpass.inspect.run",
           "torchvision", "timm", "tests.harness", "tests.rank_jobs", "tests.reliability_jobs",
           "tests.subgroup_jobs", "tests.agreement_jobs", "tests.cli_models", "tests.zoo.models",
           "tests.zoo.sweep"]


def fork_context():
    """The "forkserver" context, its server preloading ``PRELOAD`` (set before it first starts)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


class RankFailure(AssertionError):
    """Some rank failed; ``results[r]`` is what rank r reported (None where it failed)."""

    def __init__(self, message: str, results: list):
        super().__init__(message)
        self.results = results


def _entry(rank, world_size, store_path, result_dir, target, args, pg_timeout_s, env, backend):
    os.environ.update(env)
    torch.set_num_threads(1)
    result_path = Path(result_dir) / f"rank{rank}.pt"
    try:
        import torch.distributed as dist

        if world_size > 0:
            dist.init_process_group(backend, init_method=f"file://{store_path}", rank=rank,
                                    world_size=world_size,
                                    timeout=datetime.timedelta(seconds=pg_timeout_s))
        module_name, fn_name = target.split(":")
        fn = getattr(importlib.import_module(module_name), fn_name)
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, result_path)
        if isinstance(result, dict) and result.get("exit_now"):
            os._exit(0)  # a peer died: tearing the group down could block
        if dist.is_initialized():
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        torch.save({"ok": False, "error": traceback.format_exc()}, result_path)
        os._exit(1)


def run_ranks(target: str, world_size: int, *args, deadline_s: float = DEFAULT_DEADLINE_S,
              pg_timeout_s: float = 120.0, env: dict | None = None, backend: str = "gloo") -> list:
    """Run ``module:function(rank, world_size, *args)`` on ``world_size`` ranks; their results.

    ``world_size=0`` runs one process with no process group. A result dict with ``exit_now`` true
    makes its rank exit right after reporting (no process-group teardown). Raises RankFailure naming the ranks that
    raised (with their tracebacks), died without a word, or missed the deadline.
    """
    ctx = fork_context()
    nprocs = max(world_size, 1)
    with tempfile.TemporaryDirectory(prefix="bnpass-ranks-") as tmp:
        store = os.path.join(tmp, "store")
        # TORCH_WARM_POOL=0: stock backend="inductor" would start a pool of Triton compile workers
        # (fresh interpreters importing torch) in every rank; C++ kernels do not use it.
        env = {"PYTHONUNBUFFERED": "1", "TORCH_WARM_POOL": "0", **(env or {})}
        procs = [ctx.Process(target=_entry, args=(r, world_size, store, tmp, target, args,
                                                   pg_timeout_s, env, backend), daemon=True)
                 for r in range(nprocs)]
        for p in procs:
            p.start()
        stop = time.monotonic() + deadline_s
        for p in procs:
            p.join(timeout=max(0.0, stop - time.monotonic()))
        late = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results, problems = [None] * nprocs, []
        for r, p in enumerate(procs):
            path = Path(tmp) / f"rank{r}.pt"
            report = torch.load(path, weights_only=False) if path.exists() else None
            if r in late:
                problems.append(f"rank {r} did not finish within {deadline_s:.0f} s (hang?)")
            elif report is None:
                problems.append(f"rank {r} died with exit code {p.exitcode} and no report")
            elif not report["ok"]:
                problems.append(f"rank {r} raised:\n{report['error']}")
            else:
                results[r] = report["result"]
        if problems:
            raise RankFailure(f"{target} on {world_size} rank(s):\n" + "\n".join(problems), results)
        return results
