"""Cold compile: the first training step of stock Inductor and of bnpass, side by side, each in a
fresh process with a fresh Inductor cache directory, one process on torch's fake process group of
2 ranks (bnpass emits its collectives, which complete at once), 1 thread, 64x64 images, batch 8.

    python benchmarks/cold_compile.py [--models resnet18,densenet121] [--backends inductor,bnpass]
                                      [--repeats 1] [--out FILE] [--serial-builds]

``--backends`` takes any of inductor, bnpass, aot_eager, bnpass_eager (the last two build no C++:
``bnpass_eager`` / ``aot_eager`` isolates what bnpass adds before code generation). Per run: the
step's wall time and where it went, from torch's own compile timers
(``torch._dynamo.utils.compilation_time_metrics``) and stages timed here:
  dynamo     Dynamo's bytecode tracing and guards (the frame compile minus the backend)
  pass       bnpass: find the sites, rewrite them, snapshot them for the record
  trace      AOTAutograd: tracing the joint forward+backward graph (``aot_trace_joint_graph``)
  partition  AOTAutograd's min-cut partitioner (forward / backward graphs)
  schedule   bnpass: pack, split and reorder the collectives (bnpass/schedule.py)
  lowering   Inductor, forward and backward: post-grad passes, lowering, scheduling, codegen
             (its compile minus the wait for C++ builds)
  cpp_wait   time spent waiting for the C++ builds (they run in Inductor's worker processes)
  other      the rest of the step: AOTAutograd's other work, running the step itself
  ops        call_function nodes in the partitioned forward + backward graphs (what tracing,
             the partitioner and the lowering pay per node)
  kernels    C++ kernels built (shared objects in the fresh cache directory)
  builds_s   the summed wall time of the g++ runs started from this process (Inductor's compile
             threads overlap them, so the sum can exceed the wall time); with ``--serial-builds``
             (``TORCHINDUCTOR_COMPILE_THREADS=1``) one at a time, so the step is slower and
             cpp_wait is 0. build_min_s: the shortest run that built a shared object (a kernel's
             fixed cost: loading Inductor's precompiled header, linking)
The runs alternate the backends' order per repeat, so a change in the machine's load hits all; the
load average before each run is printed with it (figures on a loaded machine are provisional).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("inductor", "bnpass", "aot_eager", "bnpass_eager")
PAIRS = (("bnpass", "inductor", 1.15), ("bnpass_eager", "aot_eager", None))  # (ours, stock, target)
COLUMNS = ("step_s", "dynamo_s", "pass_s", "trace_s", "partition_s", "schedule_s", "lowering_s",
           "cpp_wait_s", "other_s", "ops", "kernels", "builds_s", "build_min_s")
COUNTS = ("ops", "kernels")


def _on_each_call(owner, name: str, record) -> None:
    """Replace ``owner.name`` (a module's function, or a class's method) by a wrapper that calls
    ``record(seconds, args)`` with each call's wall time and positional arguments."""
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            record(time.perf_counter() - start, args)

    setattr(owner, name, wrapper)


def _timed(module, name: str, totals: dict, key: str) -> None:
    """Add the wall time of every call of ``module.name`` to ``totals[key]``."""
    _on_each_call(module, name, lambda seconds, _: totals.__setitem__(key, totals.get(key, 0.0) + seconds))


def _partitions(totals: dict) -> None:
    """Time AOTAutograd's min-cut partitioner wherever a backend calls it, and count the nodes of
    the graphs it returns."""
    import torch._dynamo.backends.debugging as debugging
    import torch._inductor.compile_fx as compile_fx

    import bnpass.backends.eager as eager

    inner = debugging.min_cut_rematerialization_partition

    def partition(*args, **kwargs):
        start = time.perf_counter()
        graphs = inner(*args, **kwargs)
        totals["partition_s"] = totals.get("partition_s", 0.0) + time.perf_counter() - start
        totals["ops"] = totals.get("ops", 0) + sum(
            1 for g in graphs for n in g.graph.nodes if n.op == "call_function")
        return graphs

    for module in (debugging, compile_fx, eager):
        module.min_cut_rematerialization_partition = partition


def child(model_name: str, backend: str) -> dict:
    """One cold first training step in this (fresh) process; the breakdown as a dict."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    import torchvision
    from torch._dynamo.utils import compilation_time_metrics
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import bnpass
    import bnpass.backend as stages
    import bnpass.backends.inductor as lowering

    bnpass.register()
    ours: dict = {}
    for name in ("find_sites", "rewrite_sites", "snapshot_sites", "after_rewrite"):
        _timed(stages, name, ours, "pass_s")
    _timed(lowering, "schedule_collectives", ours, "schedule_s")  # bnpass_eager's too (schedule_and_record)
    _partitions(ours)
    builds = _time_builds()
    torch.set_num_threads(1)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    torch.manual_seed(0)
    model = getattr(torchvision.models, model_name)(num_classes=10)
    x, labels = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))
    compiled = torch.compile(model, backend=backend)
    start = time.perf_counter()
    F.cross_entropy(compiled(x), labels).backward()
    step = time.perf_counter() - start
    dist.destroy_process_group()

    def metric(name: str) -> float:
        return float(sum(compilation_time_metrics.get(name, [])))

    cpp_wait = metric("async_compile.wait")
    result = {
        "step_s": step,
        "dynamo_s": metric("_compile.compile_inner") - metric("OutputGraph.call_user_compiler"),
        "pass_s": ours.get("pass_s", 0.0),
        "trace_s": metric("aot_trace_joint_graph"),
        "partition_s": ours.get("partition_s", 0.0),
        "schedule_s": ours.get("schedule_s", 0.0),
        "lowering_s": metric("fx_codegen_and_compile") - cpp_wait,
        "cpp_wait_s": cpp_wait,
        "ops": ours.get("ops", 0),
        "kernels": sum(1 for _ in Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]).rglob("*.so")),
    }
    result["other_s"] = step - sum(v for k, v in result.items() if k.endswith("_s") and k != "step_s")
    result["builds_s"] = sum(t for t, _ in builds)
    result["build_min_s"] = min((t for t, shared in builds if shared), default=0.0)
    return result


def _time_builds() -> list:
    """(wall time, built a shared object) of each g++ run started from this process."""
    import torch._inductor.cpp_builder as cpp_builder

    times: list = []
    _on_each_call(cpp_builder.CppBuilder, "build", lambda seconds, args: times.append(
        (seconds, args[0].get_target_file_path().endswith(".so"))))
    return times


def run_child(model: str, backend: str, serial_builds: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="bnpass-cold-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache,
               **({"TORCHINDUCTOR_COMPILE_THREADS": "1"} if serial_builds else {}),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        load = os.getloadavg()[0]
        proc = subprocess.run([sys.executable, __file__, "--child", model, backend], env=env,
                              capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{model} {backend} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load"] = load
    return result


def table(results: list[dict]) -> str:
    head = ["model", "backend", "load"] + list(COLUMNS)
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results:
        cells = [r["model"], r["backend"], f"{r['load']:.1f}"]
        cells += [str(r[c]) if c in COUNTS else f"{r[c]:.2f}" if c == "build_min_s" else f"{r[c]:.1f}"
                  for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios(results: list[dict]) -> str:
    out = []
    for model in dict.fromkeys(r["model"] for r in results):
        step = {}
        for r in results:
            if r["model"] == model:
                step.setdefault(r["backend"], []).append(r["step_s"])
        med = {b: sorted(s)[len(s) // 2] for b, s in step.items()}
        for ours, stock, target in PAIRS:
            if ours in med and stock in med:
                goal = f"; target <= {target}" if target else ""
                out.append(f"{model}: {ours} / {stock} = {med[ours] / med[stock]:.2f} "
                           f"(median first step {med[ours]:.1f} s / {med[stock]:.1f} s{goal})")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,densenet121")
    parser.add_argument("--backends", default="inductor,bnpass",
                        help="comma-separated, of " + ", ".join(BACKENDS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", help="append the table to this markdown file")
    parser.add_argument("--serial-builds", action="store_true",
                        help="every C++ build in the compiling process, timed (builds_s, build_min_s)")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "BACKEND"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    backends = tuple(args.backends.split(","))
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backends {sorted(unknown)}; choose from {', '.join(BACKENDS)}")
    results = []
    for model in args.models.split(","):
        for repeat in range(args.repeats):
            order = backends if repeat % 2 == 0 else backends[::-1]
            for backend in order:
                result = {"model": model, "backend": backend, **run_child(model, backend, args.serial_builds)}
                results.append(result)
                print(f"{model} {backend}: " + ", ".join(
                    f"{c} {result[c]}" if c in COUNTS else f"{c} {result[c]:.1f}" for c in COLUMNS)
                    + f" (load {result['load']:.1f})", flush=True)
    text = (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, `python benchmarks/cold_compile.py "
            f"--models {args.models} --backends {args.backends} --repeats {args.repeats}"
            f"{' --serial-builds' if args.serial_builds else ''}`\n\n{table(results)}\n\n{ratios(results)}\n")
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
