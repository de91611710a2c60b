"""``bnpass inspect``: one training step of the model under ``backend="bnpass"`` in this process.

A world of ``world_size`` ranks is simulated with torch's fake process group: the backend sees a
group of that size and emits its collectives, which the fake group completes without moving data.
What comes out is read from ``bnpass.compile_records()`` (the record the backend keeps) into plain
data (``Inspection``): the CLI renders that and never re-derives a decision.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import sys
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_leaves

from ..nodes import simulated_hosts
from .target import load_target

__all__ = ["InspectArgs", "ForwardError", "CompileError", "inspect_model", "Progress"]


class ForwardError(RuntimeError):
    """The model's own forward fails on the given input (exit status 1)."""


class CompileError(RuntimeError):
    """The model runs eagerly but the compiled step failed (exit status 1)."""


@dataclasses.dataclass(frozen=True)
class InspectArgs:
    target: str
    input_shape: tuple
    eval: bool = False
    world_size: int = 2
    dtype: str = "float32"
    channels_last: bool = False
    kernels: bool = False
    backend: str = "bnpass"  # or "bnpass_eager": the same pass without Inductor
    group_size: Optional[object] = None  # the option group_size: k, or "node"
    ranks_per_node: Optional[int] = None  # hosts of that many consecutive ranks (group_size "node")


class Progress:
    """Stage and elapsed time on stderr; a heartbeat line every ``every`` s while a stage runs long."""

    def __init__(self, stream=None, every: float = 15.0):
        self.stream = stream if stream is not None else sys.stderr
        self.every = every
        self.start = time.monotonic()
        self.stage_name = ""
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._last = self.start

    def _say(self, text: str) -> None:
        with self._lock:
            self._last = time.monotonic()
            print(f"[bnpass inspect {self._last - self.start:7.1f}s] {text}", file=self.stream, flush=True)

    def stage(self, name: str) -> None:
        self.stage_name = name
        self._say(name)
        if self._thread is None and self.every > 0:
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(1.0):
            if time.monotonic() - self._last >= self.every:
                self._say(f"... still {self.stage_name}")

    def done(self, text: str = "done") -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._say(text)


@contextlib.contextmanager
def fake_world(world_size: int):
    """torch.distributed initialised on a fake group of ``world_size`` ranks (this process is rank 0)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("bnpass inspect: torch.distributed is already initialised in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _device(model: torch.nn.Module) -> torch.device:
    """Where the factory put the model (a CUDA model gets Triton kernels); CPU without tensors."""
    tensor = next(iter(model.parameters()), next(iter(model.buffers()), None))
    return tensor.device if tensor is not None else torch.device("cpu")


def _input(args: InspectArgs, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.input_shape, generator=gen).to(device=device, dtype=getattr(torch, args.dtype))
    if args.channels_last:
        x = x.contiguous(memory_format=_memory_format(len(args.input_shape)))
    return x


def _memory_format(ndim: int):
    return torch.channels_last if ndim == 4 else torch.channels_last_3d


def _loss(out) -> Optional[torch.Tensor]:
    """Sum of every floating-point output that needs a gradient (a training step's stand-in loss)."""
    parts = [t.float().sum() for t in tree_leaves(out)
             if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
    return torch.stack(parts).sum() if parts else None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _eager_failure(model, x) -> Optional[BaseException]:
    """The exception the model's own forward raises on ``x`` (eval mode, a copy), or None."""
    try:
        probe = copy.deepcopy(model).eval()
        with torch.no_grad():
            probe(x)
    except Exception as e:  # noqa: BLE001 - that is the answer
        return e
    return None


def _graph_breaks() -> int:
    return int(sum(torch._dynamo.utils.counters["graph_break"].values()))


def inspect_model(args: InspectArgs, progress: Progress) -> dict:
    """Compile and run one step of ``args.target``; the plain-data inspection (see cli.py's schema)."""
    import bnpass

    progress.stage(f"loading {args.target}")
    model = load_target(args.target)
    if args.eval:
        model.eval()
    model = model.to(getattr(torch, args.dtype))
    if args.channels_last:
        model = model.to(memory_format=_memory_format(len(args.input_shape)))
    x = _input(args, _device(model))
    mode = "train" if model.training else "eval"

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    bnpass.clear_records()
    options = {"inductor_config": {"trace.provenance_tracking_level": 1}} if args.kernels else {}
    if args.group_size is not None:
        options["group_size"] = args.group_size
    compiled = torch.compile(model, backend=args.backend, options=options)
    backward = False
    with fake_world(args.world_size), simulated_hosts(args.ranks_per_node):
        lowering = "Inductor" if args.backend == "bnpass" else "eager ATen"
        progress.stage(f"compiling and running the forward (Dynamo -> bnpass -> {lowering})")
        try:
            with torch.no_grad() if args.eval else contextlib.nullcontext():
                out = compiled(x)
        except Exception as e:  # noqa: BLE001 - sorted into the model's fault or the compile's
            eager = _eager_failure(model, x)
            if eager is not None:
                raise ForwardError(
                    f"bnpass: the forward of {args.target} fails on input shape {list(args.input_shape)} "
                    f"({args.dtype}): {type(eager).__name__}: {_first_line(eager)}") from eager
            raise CompileError(f"bnpass: compiling {args.target} failed (its eager forward runs): "
                               f"{type(e).__name__}: {_first_line(e)}") from e
        loss = None if args.eval else _loss(out)
        if loss is not None:
            progress.stage("compiling and running the backward")
            try:
                loss.backward()
            except Exception as e:  # noqa: BLE001
                raise CompileError(f"bnpass: the backward of {args.target} failed: "
                                   f"{type(e).__name__}: {_first_line(e)}") from e
            backward = True
    return _inspection(args, mode, backward, bnpass.compile_records(), _graph_breaks(),
                       time.monotonic() - progress.start)


def _inspection(args: InspectArgs, mode: str, backward: bool, records, graph_breaks: int,
                elapsed: float) -> dict:
    sites, graphs = [], []
    for record in records:
        offset = len(sites)
        for site in record.sites:
            entry = site.to_json()
            entry["graph_site"] = entry.pop("index")
            entry["site_world_size"] = entry.pop("world_size")
            snap = record.snapshots.get(site.index, {})
            sites.append({
                "index": offset + site.index, "graph": record.graph_index, **entry,
                "nodes": list(record.site_nodes.get(site.index, [])),
                "before": list(snap.get("before", [])), "after": list(snap.get("after", [])),
            })
        graphs.append({
            "index": record.graph_index, "site_offset": offset, "sites": len(record.sites),
            "collectives": dict(record.collectives), "collective_bytes": dict(record.collective_bytes),
            "collectives_unpacked": dict(record.collectives_unpacked),
            "sequence": {d: [dict(c) for c in record.sequence.get(d, [])] for d in ("forward", "backward")},
            "schedule": {d: dataclasses.asdict(record.schedules[d]) for d in ("forward", "backward")
                         if d in record.schedules},
            "graphs": {d: record.graphs.get(d) for d in ("forward", "backward")},
            "kernels": {d: record.kernels.get(d) for d in ("forward", "backward")},
        })
    fw = sum(g["collectives"]["forward"] for g in graphs)
    bw = sum(g["collectives"]["backward"] for g in graphs)
    fw_bytes = sum(g["collective_bytes"]["forward"] for g in graphs)
    bw_bytes = sum(g["collective_bytes"]["backward"] for g in graphs)
    return {
        "target": args.target, "mode": mode, "world_size": args.world_size,
        "input_shape": list(args.input_shape), "dtype": args.dtype,
        "channels_last": args.channels_last, "backward": backward,
        "sites": sites, "graphs": graphs,
        "collectives": {"forward": fw, "backward": bw, "bytes_per_step": fw_bytes + bw_bytes,
                        "bytes": {"forward": fw_bytes, "backward": bw_bytes},
                        "unpacked": {d: sum(g["collectives_unpacked"][d] for g in graphs)
                                     for d in ("forward", "backward")}},
        "graph_breaks": graph_breaks, "elapsed_s": elapsed,
        "torch": torch.__version__,
    }
