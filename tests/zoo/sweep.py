"""The model-zoo sweep: per model, what bnpass does to its training graph (the graph-level columns)
and whether one synced training step matches float64 on the global batch (the parity column).

Graph level: ``bnpass inspect``'s own run (bnpass/inspect/run.py) on a simulated 2-rank world, with
the ``bnpass_eager`` backend: the same capture, sites, rewrite and AOTAutograd graphs as ``bnpass``
(collectives are counted in those graphs), without Inductor's codegen, so all models fit in the
default test run. Models go to ``WORKERS`` processes (forked from tests/harness.py's preloaded
server); each model has a deadline.

Parity: tests/zoo/parity.py, on real gloo ranks under Inductor.

A model that cannot be built, run or traced is a row with the reason in ``error``, not a crash.
"""

from __future__ import annotations

import concurrent.futures as futures
import io
import os
import sys
import time

GRAPH_COLUMNS = ["model", "source", "input", "bn_modules", "frozen_bn", "sites", "synced", "local",
                 "skipped", "fw_collectives_unpacked", "bw_collectives_unpacked", "fw_collectives", "bw_collectives", "graph_breaks", "stock_graph_breaks",
                 "error"]
WORKERS = 2
MODEL_DEADLINE_S = float(os.environ.get("BNPASS_ZOO_MODEL_DEADLINE_S", 300))
BATCH = 2  # per rank, in the graph-level run


def error_line(e: BaseException) -> str:
    """One line for a CSV cell: the exception's type and the first line of its message."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def _count_modules(model) -> tuple[int, int]:
    from torch.nn.modules.batchnorm import _BatchNorm

    bn = sum(isinstance(m, _BatchNorm) for m in model.modules())
    frozen = sum(type(m).__name__ == "FrozenBatchNorm2d" for m in model.modules())
    return bn, frozen


def _stock_graph_breaks(zoo_model) -> int:
    """Graph breaks of the same training step under Dynamo with the stock ``eager`` backend."""
    import torch

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = zoo_model.factory()
    x = torch.randn((BATCH,) + zoo_model.sample_shape, generator=torch.Generator().manual_seed(0))
    torch.compile(model, backend="eager")(x).float().sum().backward()
    return int(sum(torch._dynamo.utils.counters["graph_break"].values()))


def graph_row(zoo_model) -> dict:
    """The graph-level columns of one model (a ``ZooModel``), in this process."""
    import torch

    from bnpass.inspect.run import InspectArgs, Progress, inspect_model

    torch.set_num_threads(1)
    row = {c: "" for c in GRAPH_COLUMNS}
    row.update(model=zoo_model.name, source=zoo_model.source, input="x".join(map(str, zoo_model.sample_shape)))
    try:
        torch.manual_seed(0)
        row["bn_modules"], row["frozen_bn"] = _count_modules(zoo_model.factory())
        args = InspectArgs(target=zoo_model.target, input_shape=(BATCH,) + zoo_model.sample_shape,
                           world_size=2, backend="bnpass_eager")
        data = inspect_model(args, Progress(stream=io.StringIO(), every=0))
    except Exception as e:  # noqa: BLE001 - the row says why
        row["error"] = error_line(e)
        return row
    actions = [s["action"] for s in data["sites"]]
    row.update(sites=len(actions), synced=actions.count("sync"), local=actions.count("local"),
               skipped=actions.count("skip"),
               fw_collectives_unpacked=data["collectives"]["unpacked"]["forward"],
               bw_collectives_unpacked=data["collectives"]["unpacked"]["backward"],
               fw_collectives=data["collectives"]["forward"],
               bw_collectives=data["collectives"]["backward"], graph_breaks=data["graph_breaks"])
    # Breaks are the model's own when stock Dynamo has as many: measured only where there are some.
    row["stock_graph_breaks"] = _stock_graph_breaks(zoo_model) if data["graph_breaks"] else "-"
    return row


def _graph_row_by_name(name: str) -> dict:
    from tests.zoo.models import BY_NAME

    return graph_row(BY_NAME[name])


def graph_rows(names: list[str], workers: int = WORKERS, deadline_s: float = MODEL_DEADLINE_S,
               progress: bool = False) -> list[dict]:
    """Graph-level rows of ``names`` (in that order), computed in ``workers`` processes. A model past
    its share of the deadline fails the sweep, naming the model (a hang is a bug)."""
    from tests.harness import fork_context  # workers forked from the preloaded server

    pool = futures.ProcessPoolExecutor(max_workers=workers, mp_context=fork_context())
    try:
        jobs = {name: pool.submit(_graph_row_by_name, name) for name in names}
        # Each worker runs its models one after another: the last one finishes within its share.
        begin = time.monotonic()
        stop = begin + deadline_s * max(1, -(-len(names) // workers))
        rows = []
        for name, job in jobs.items():
            try:
                rows.append(job.result(timeout=max(1.0, stop - time.monotonic())))
                if progress:
                    print(f"zoo sweep: {name} done at {time.monotonic() - begin:.0f} s", file=sys.stderr)
            except futures.TimeoutError:
                raise TimeoutError(f"zoo sweep: {name} did not finish in time (hang?); "
                                   f"BNPASS_ZOO_MODEL_DEADLINE_S={deadline_s:.0f}") from None
            except futures.process.BrokenProcessPool as e:
                raise RuntimeError(f"zoo sweep: the worker running {name} died ({e})") from None
        return rows
    finally:
        for proc in list(getattr(pool, "_processes", {}).values()):
            if proc.is_alive():
                proc.kill()
        pool.shutdown(wait=False, cancel_futures=True)
