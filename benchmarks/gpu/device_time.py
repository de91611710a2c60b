"""Device time, not call time: the sum of kernel durations from ``torch.profiler`` (CUDA activity)
and the replay time of a CUDA graph; the host time of the collective ops from the same profile.

On the CPU (``--dry-run``) the same code reads CPU figures instead, labelled as such: the "kernels"
are the calls the Inductor-generated wrapper makes (its C++ kernels, which
``cpp.enable_kernel_profile`` names in the profile, extern kernels, collectives), and times are CPU
wall time. They exercise the logic; they are not device figures.
"""

from __future__ import annotations

import re
import statistics
import time
from typing import Callable, Iterable, Optional

import torch

# Inductor's names in a profile: C++ kernels are recorded as "graph_<id>_<kernel name>".
_CPU_KERNEL_PREFIX = re.compile(r"^graph_\d+_")
_WRAPPER = "## Call CompiledFxGraph"  # the record_function around a compiled graph's wrapper call
# The host side of a collective, as the profiler names the dispatcher ops (inclusive times).
ISSUE_OPS = ("_c10d_functional::all_reduce_", "_c10d_functional::all_reduce", "bnpass::shm_issue")
WAIT_OPS = ("_c10d_functional::wait_tensor", "bnpass::shm_wait")
BLOCKING_OPS = ("bnpass::shm_all_reduce",)  # issue and wait in one call (same-host transport)
COLLECTIVE_OPS = ISSUE_OPS + WAIT_OPS + BLOCKING_OPS
# Kineto's device activities that are work (not the GPU track's copies of record_function ranges).
_DEVICE_WORK = ("kernel", "gpu_memcpy", "gpu_memset")


def kernel_name(profiled: str) -> str:
    """The kernel's name in the generated code for its name in a profile."""
    return _CPU_KERNEL_PREFIX.sub("", profiled)


def add_up(events: Iterable[tuple[str, float]], reps: int = 1) -> dict[str, list]:
    """{name: [calls, µs]} per rep from (name, µs) pairs."""
    out: dict[str, list] = {}
    for name, us in events:
        entry = out.setdefault(name, [0.0, 0.0])
        entry[0] += 1.0 / reps
        entry[1] += us / reps
    return out


def minus(a: dict[str, list], b: dict[str, list]) -> dict[str, list]:
    """``a`` without what ``b`` ran (an L2 flush profiled alone), name by name; names left with no
    call or no time are dropped."""
    out = {}
    for name, (calls, us) in a.items():
        c, t = b.get(name, (0.0, 0.0))
        if calls - c > 1e-9 and us - t > 0:
            out[name] = [calls - c, us - t]
    return out


def total_ms(kernels: dict[str, list]) -> float:
    return sum(us for _, us in kernels.values()) / 1e3


def _device_work(e) -> bool:
    """A kernel, memcpy or memset on the device; not a user annotation mirrored on the GPU track."""
    if getattr(e, "is_user_annotation", False):
        return False
    kind = getattr(e, "activity_type", None)  # absent (or empty) on older torch
    return not kind or str(kind).lower() in _DEVICE_WORK


def direction_of(event) -> str:
    """"backward" when the op ran inside a compiled backward (an ancestor named like autograd's
    ``CompiledFunctionBackward``), else "forward"."""
    parent = event.cpu_parent
    while parent is not None:
        if "Backward" in parent.name:
            return "backward"
        parent = parent.cpu_parent
    return "forward"


def _events(prof, cuda: bool) -> tuple[list, list]:
    """(kernels, host ops) of a finished profile, each as (name, µs) pairs; a host op's name is
    prefixed with its direction ("forward:..." or "backward:...")."""
    kernels, host = [], []
    for e in prof.events():
        us = e.time_range.elapsed_us()
        on_device = getattr(e, "device_type", None) is not None and e.device_type != torch.autograd.DeviceType.CPU
        if cuda and on_device:
            if _device_work(e):
                kernels.append((e.name, us))
        elif not on_device:
            if e.name in COLLECTIVE_OPS:
                host.append((f"{direction_of(e)}:{e.name}", us))
            parent = e.cpu_parent
            if not cuda and parent is not None and parent.name.startswith(_WRAPPER):
                kernels.append((kernel_name(e.name), us))
    return kernels, host


def profiled(fn: Callable[[], object], reps: int, cuda: bool) -> tuple[dict, dict]:
    """({kernel: [calls, µs]}, {collective op: [calls, µs]}) per rep of ``fn``, from one profile."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for _ in range(reps):
            fn()
        if cuda:
            torch.cuda.synchronize()
    kernels, host = _events(prof, cuda)
    return add_up(kernels, reps), add_up(host, reps)


class DeviceClock:
    """Device time on CUDA: ``kernels(fn)`` is the per-rep sum of kernel durations, each rep after
    an L2 flush whose own kernels are subtracted; ``graph_ms(fn)`` the median replay time of ``fn``
    captured in a CUDA graph (None if it cannot be captured)."""

    cuda = True
    label = "device time: sum of kernel durations (torch.profiler, CUDA activity), L2 flushed before each rep"

    def __init__(self, flush_bytes: int = 256 << 20):
        self._flush_buf = torch.empty(flush_bytes, dtype=torch.int8, device="cuda")
        self._flush_kernels: dict[int, dict] = {}  # reps -> the flush's own kernels, profiled once

    def flush(self) -> None:
        self._flush_buf.zero_()

    def kernels(self, fn, reps: int = 10) -> dict[str, list]:
        for _ in range(3):
            fn()
        with_flush, _ = profiled(lambda: (self.flush(), fn()), reps, True)
        if reps not in self._flush_kernels:
            self._flush_kernels[reps] = profiled(self.flush, reps, True)[0]
        return minus(with_flush, self._flush_kernels[reps])

    def kernel_ms(self, fn, reps: int = 10) -> float:
        return total_ms(self.kernels(fn, reps))

    def graph_ms(self, fn, reps: int = 10) -> Optional[float]:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
        except Exception:  # noqa: BLE001 - not capturable: the column says n/a
            torch.cuda.synchronize()
            return None
        return self.wall_ms(graph.replay, reps)

    def wall_ms(self, fn, reps: int = 10) -> float:
        """Median ms of ``fn`` between CUDA events (host launch included), L2 flushed before each."""
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        pairs = []
        for _ in range(reps):
            self.flush()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in pairs)


class CpuClock:
    """The dry run's clock: CPU wall time where DeviceClock reads device time; no CUDA graphs."""

    cuda = False
    label = "CPU wall time (dry run on the CPU: NOT device figures)"

    def kernels(self, fn, reps: int = 3) -> dict[str, list]:
        fn()
        return profiled(fn, reps, False)[0]

    def kernel_ms(self, fn, reps: int = 3) -> float:
        return self.wall_ms(fn, reps)

    def graph_ms(self, fn, reps: int = 3) -> Optional[float]:
        return None

    def wall_ms(self, fn, reps: int = 3) -> float:
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)


def copy_bandwidth(clock, device, nbytes: int) -> float:
    """GB/s of a device-to-device copy (read + write), in the clock's time."""
    from .common import gbps

    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return gbps(2 * nbytes, clock.kernel_ms(lambda: dst.copy_(src)))


def host_per_collective(host: dict[str, list], direction: str) -> dict[str, float]:
    """For one direction: µs per call of issuing, waiting and both (the blocking same-host op
    counts as both), and µs per step, from ``profiled``'s host ops per step."""
    def calls_us(names):
        keys = [f"{direction}:{n}" for n in names]
        return sum(host.get(k, (0, 0))[0] for k in keys), sum(host.get(k, (0, 0))[1] for k in keys)

    issue_calls, issue_us = calls_us(ISSUE_OPS)
    wait_calls, wait_us = calls_us(WAIT_OPS)
    block_calls, block_us = calls_us(BLOCKING_OPS)
    collectives = issue_calls + block_calls
    return {
        "collectives_per_step": collectives,
        "issue_us": issue_us / issue_calls if issue_calls else float("nan"),
        "wait_us": wait_us / wait_calls if wait_calls else float("nan"),
        "blocking_us": block_us / block_calls if block_calls else float("nan"),
        "per_collective_us": (issue_us + wait_us + block_us) / collectives if collectives else float("nan"),
        "per_step_us": issue_us + wait_us + block_us,
    }
