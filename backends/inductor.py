"""Lower: hand the rewritten Dynamo graph to Inductor (``compile_fx``), keyed apart from stock graphs.

What is added to a stock Inductor compile:
* bnpass's schedule of the collectives (bnpass/schedule.py: packing, overlap) on the graphs
  AOTAutograd hands to Inductor, with the convolution-backward split only where it pays
  (``split_conv_backwards``);
* a per-device Inductor configuration chosen by measurement (``device_inductor_config``), under
  the user's ``inductor_config``;
* a ``post_grad_custom_post_pass`` that does nothing but carry a uuid (bnpass's source and the
  options that change code), so that neither AOTAutograd's nor Inductor's FX graph cache can serve
  a stock graph, or one from another bnpass version or options, to this compile (shared/FACTS.md);
* AOTAutograd's own cache off for these compiles (Inductor's FX graph cache still serves), so that
* an ``inner_compile`` wrapper always runs, and counts the collectives in the forward and backward graphs that
  AOTAutograd hands to Inductor, into the compile's ``GraphRecord``, and keeps a digest of those
  graphs and Inductor's generated code for ``bnpass inspect`` (bnpass/inspect/capture.py).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import re
from pathlib import Path

import torch
from torch._inductor.compile_fx import compile_fx, compile_fx_inner
from torch._inductor.custom_graph_pass import CustomGraphPass

from bnpass.agree import AgreeFirst
from bnpass.inspect.capture import digest, kernel_info
from bnpass.options import BNPassError
from bnpass.schedule import collective_sequence, save_site_collectives, schedule_collectives
from bnpass.transport import SHM_ALL_REDUCE, SHM_ISSUE, apply_transport, mark_transports

__all__ = ["lower", "count_all_reduces", "schedule_and_record", "agreeing"]

_ALL_REDUCES = {torch.ops._c10d_functional.all_reduce.default, torch.ops._c10d_functional.all_reduce_.default,
                SHM_ALL_REDUCE, SHM_ISSUE}
# Ops that copy a tensor's value to the host (a device sync; breaks CUDA graphs). Not
# ``_assert_async``: asynchronous on CUDA (a device-side check), immediate on the CPU (no device).
HOST_SYNCS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
              torch.ops.aten.nonzero.default}


def hashed_sources() -> list[Path]:
    """The sources that shape the compiled code: every module of the pass (bnpass/ and its
    subpackages, except the inspector's bnpass/inspect/, which only reads what the pass did) and the
    lowerings (this folder). Found by walking the folders, so a new module is never left out."""
    package = Path(importlib.util.find_spec("bnpass").submodule_search_locations[0])
    passes = {p for p in package.rglob("*.py") if p.relative_to(package).parts[0] != "inspect"}
    return sorted(passes | set(Path(__file__).parent.glob("*.py")))  # installed: backends/ is inside


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """Hash of ``hashed_sources()``: a new bnpass never reuses an older one's compiled graphs."""
    digest = hashlib.sha256()
    for path in hashed_sources():
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


class CacheKeyPass(CustomGraphPass):
    """A no-op post-grad pass whose uuid puts bnpass into Inductor's cache keys."""

    def __init__(self, fingerprint: str):
        self._uuid = hashlib.sha256(f"bnpass:{source_hash()}:{fingerprint}".encode()).hexdigest()

    def __call__(self, graph: torch.fx.Graph) -> None:
        return None

    def uuid(self) -> str:
        return self._uuid


class SaveCollectivesPass(CustomGraphPass):
    """Inductor's joint-graph pre-pass: ``schedule.save_site_collectives``, then the user's own
    ``joint_custom_pre_pass`` (one pass, or a list of them), if any."""

    def __init__(self, user_pass=None):
        self._user = [] if user_pass is None else list(user_pass) if isinstance(user_pass, (list, tuple)) \
            else [user_pass]

    def __call__(self, graph: torch.fx.Graph) -> None:
        save_site_collectives(graph)
        for user_pass in self._user:
            user_pass(graph)

    def uuid(self):
        users = [p.uuid() if hasattr(p, "uuid") else None for p in self._user]
        if None in users:
            return None  # a pass without a uuid: Inductor bypasses its cache, as it would anyway
        return hashlib.sha256(f"bnpass-save:{source_hash()}:{users}".encode()).hexdigest()


def count_all_reduces(gm: torch.fx.GraphModule) -> tuple[int, int]:
    """(number of all_reduce nodes, bytes they reduce) in an AOTAutograd graph."""
    count = nbytes = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _ALL_REDUCES:
            count += 1
            val = node.args[0].meta.get("val")
            if isinstance(val, torch.Tensor):
                nbytes += int(val.numel()) * val.element_size()
    return count, nbytes


def schedule_and_record(record, gm: torch.fx.GraphModule, direction: str, options) -> None:
    """Schedule the collectives of one AOTAutograd graph (``direction`` "forward" or "backward"),
    in place (bnpass/schedule.py), then count its collectives and host syncs into the compile's
    record, with the sequence the ranks agree on, and keep its digest for ``bnpass inspect``."""
    levels = {site.index: site.levels for site in record.sites}
    report = schedule_collectives(gm, direction, levels, pack=options.pack_collectives,
                                  overlap=options.overlap,
                                  split=split_conv_backwards(graph_device(gm)))
    record.collectives_unpacked[direction] += report.collectives_before
    record.schedules[direction] = report
    record.sequence[direction] = collective_sequence(gm)
    mark_transports(record.sequence[direction], apply_transport(gm, options))  # bnpass/transport
    count, nbytes = count_all_reduces(gm)
    record.collectives[direction] += count
    record.collective_bytes[direction] += nbytes
    record.host_syncs[direction] += sum(
        node.op == "call_function" and node.target in HOST_SYNCS for node in gm.graph.nodes)
    record.graphs[direction] = digest(gm, record.site_nodes, direction)


def agreeing(compiled, record, direction: str, options):
    """``compiled``, which first agrees with the other ranks on the collectives it issues."""
    return AgreeFirst(compiled, record.sequence.get(direction, []), record, direction, options)


# Either transport's call (bnpass/transport: the shared-memory issue that replaced an all_reduce).
_ISSUED = re.compile(r"torch\.ops\.(?:_c10d_functional\.all_reduce_|bnpass\.shm_issue|bnpass\.shm_all_reduce)\.default"
                     r"\((\w+), '(\w+)', '([^']*)'\)")


def _numel_of(source: str, buf: str, end: int):
    """The element count of ``buf`` where the generated wrapper last assigned it before ``end``:
    a fresh 1-d buffer, a 1-d view of another, or another buffer reused; None if not plain."""
    assigned = list(re.finditer(rf"^\s*{buf} = (.*)$", source[:end], re.M))
    if not assigned:
        return None
    rhs, at = assigned[-1].group(1), assigned[-1].start()
    fresh = re.match(r"(?:empty_strided_\w+|reinterpret_tensor)\((?:\w+, )?\((\d+), \)", rhs)
    if fresh:
        return int(fresh.group(1))
    reused = re.match(r"(\w+); del \w+\s+# reuse", rhs)
    return _numel_of(source, reused.group(1), at) if reused else None


def check_generated(source, sequence: list[dict], direction: str) -> None:
    """The all_reduces Inductor's generated wrapper calls, in its order, are the graph's sequence
    (the same count, ops, groups and, where the wrapper's buffers say, sizes): no pass of
    Inductor's merged, dropped or reordered one. Skipped for a wrapper that is not Python
    (``cpp_wrapper``)."""
    if not source or "def call(" not in source:
        return
    issued = [(m.group(2), m.group(3), _numel_of(source, m.group(1), m.start()))
              for m in _ISSUED.finditer(source)]
    planned = [(c["op"], c["group"], c["numel"]) for c in sequence if "all_reduce" in c["target"]]
    same = len(issued) == len(planned) and all(
        i[:2] == p[:2] and None in (i[2], p[2]) or i == p for i, p in zip(issued, planned))
    if not same:
        raise BNPassError(f"bnpass: Inductor's code for the {direction} graph issues the all_reduces "
                          f"(op, group, elements) {issued}, not the scheduled {planned}: ranks could "
                          f"issue different collectives. Report it with the model")


def tensors_device(values) -> str:
    """"cuda" when one of ``values`` is a tensor on a CUDA device, else "cpu": the device whose
    choices (``device_inductor_config``, ``split_conv_backwards``) a graph takes."""
    return "cuda" if any(isinstance(v, torch.Tensor) and v.device.type == "cuda" for v in values) else "cpu"


def graph_device(gm: torch.fx.GraphModule) -> str:
    """``tensors_device`` of the tensors the graph takes (its placeholders' example values)."""
    return tensors_device(node.meta.get("val") for node in gm.graph.find_nodes(op="placeholder"))


def split_conv_backwards(device: str) -> bool:
    """Whether the schedule splits convolution backwards in two (so that a weight gradient runs
    while a BatchNorm's collective is in flight), per device, as measured (README "Lowering per
    device", benchmarks/RESULTS.md): never on CUDA (each extra convolution call costs ~100 us of
    host time, H200 profile); always on the CPU, where either transport is asynchronous (the
    process group's, and the same-host one's issue / wait pair) and the weight gradient in the
    window absorbs the ranks' skew at the wait (two oneDNN backward calls instead of one cost
    nothing measurable: benchmarks/RESULTS.md "The split's own cost")."""
    return device != "cuda"


def device_inductor_config(device: str) -> dict:
    """bnpass's Inductor configuration for graphs on ``device``, before the user's
    ``inductor_config`` (which wins). CPU: no layout optimization (Inductor's channels_last for
    convolutions made resnet18's training step 1.6x slower on this machine's CPU: shared/FACTS.md,
    benchmarks/RESULTS.md "Lowering per device")."""
    return {"layout_optimization": False} if device == "cpu" else {}


def _counting_inner_compile(record, options, gm, example_inputs, **kwargs):
    direction = "backward" if kwargs.get("is_backward") else "forward"
    schedule_and_record(record, gm, direction, options)
    with _provenance_scope():
        compiled = compile_fx_inner(gm, example_inputs, **kwargs)
    record.kernels[direction] = kernel_info(compiled)
    check_generated(record.kernels[direction]["source"], record.sequence[direction], direction)
    return agreeing(compiled, record, direction, options)


@contextlib.contextmanager
def _provenance_scope():
    """Let Inductor's provenance tracking (kernel -> FX nodes, off unless ``bnpass inspect --kernels``
    turns it on) work for a backward compiled lazily, outside ``compile_fx``'s own provenance scope."""
    debug = torch._inductor.debug
    scope = getattr(debug, "reset_provenance_globals", None)
    if (torch._inductor.config.trace.provenance_tracking_level == 0 or scope is None
            or getattr(debug, "_pre_grad_graph_id", None)):
        yield
        return
    with scope():
        yield


def lower(gm, example_inputs, options, record):
    """Compile the rewritten graph with Inductor; returns Inductor's compiled callable."""
    patches = device_inductor_config(tensors_device(example_inputs))
    if options.mode is not None:
        patches.update(torch._inductor.list_mode_options(options.mode))
    # Inductor's peak-memory reordering would undo bnpass's schedule, and may move collectives that
    # one rank's shapes leave independent (an empty batch) where another rank's keep them in order.
    patches["reorder_for_peak_memory"] = False
    patches.update(options.inductor_config)
    patches["post_grad_custom_post_pass"] = CacheKeyPass(options.fingerprint())
    patches["joint_custom_pre_pass"] = SaveCollectivesPass(patches.get("joint_custom_pre_pass"))
    # AOTAutograd's cache would hand back compiled graphs without calling inner_compile, and the
    # record's counts would stay 0; Inductor's FX graph cache (behind inner_compile) still serves.
    with torch._functorch.config.patch(enable_autograd_cache=False):
        return compile_fx(
            gm,
            example_inputs,
            inner_compile=functools.partial(_counting_inner_compile, record, options),
            config_patches=patches,
        )
