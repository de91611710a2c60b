"""What every section of the GPU check shares: shapes, the bytes model, tables, the report, the budget."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

# ResNet-50's BatchNorm input shapes at batch 64, 224x224, largest first.
DEFAULT_SHAPES = {
    "bf16_cl": ["64x64x112x112", "64x256x56x56", "64x512x28x28", "64x1024x14x14", "64x2048x7x7"],
    "fp32_nchw": ["64x64x112x112", "64x2048x7x7"],
}
CONFIGS = {"bf16_cl": (torch.bfloat16, torch.channels_last),
           "fp32_nchw": (torch.float32, torch.contiguous_format)}
PROVIDERS = ("bnpass-triton", "bnpass-inductor", "inductor", "eager-cudnn", "eager-syncbn-kernels")
BNPASS_PROVIDERS = ("bnpass-triton", "bnpass-inductor")


def parse_shape(text: str) -> tuple[int, ...]:
    dims = tuple(int(d) for d in text.lower().split("x"))
    if len(dims) not in (4, 5) or min(dims) <= 0:
        raise argparse.ArgumentTypeError(f"shape {text!r}: want NxCxHxW or NxCxDxHxW, positive")
    return dims


def shape_text(shape) -> str:
    return "x".join(map(str, shape))


def bytes_model(shape, dtype: torch.dtype) -> tuple[int, int]:
    """(forward bytes, backward bytes): forward reads x twice and writes y; backward reads x and dy
    twice and writes dx. Per-channel vectors are ignored (C values against N*H*W*C)."""
    size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return 3 * size, 5 * size


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9 if ms and ms > 0 else float("nan")


def format_table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return "n/a" if math.isnan(v) else (f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}")
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class Report:
    """Markdown to stdout and, rewritten after every addition, to ``path`` (a run cut short by the
    device's time limit still leaves what it measured)."""

    def __init__(self, path: Path):
        self.path, self.parts = path, []

    def add(self, text: str = "") -> None:
        print(text, flush=True)
        self.parts.append(text)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n".join(self.parts) + "\n")


class Budget:
    """The run's wall-clock budget. ``allows(what, need_s)`` is False, and remembers ``what`` as
    skipped, when less than ``need_s`` seconds are left; ``share(fraction)`` is a deadline that
    leaves the rest of the budget to later sections."""

    def __init__(self, seconds: float, clock=time.monotonic):
        self.clock, self.start, self.seconds = clock, clock(), seconds
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.start + self.seconds - self.clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def allows(self, what: str, need_s: float = 0.0) -> bool:
        if self.left() >= need_s:
            return True
        self.skipped.append(what)
        return False

    def until(self, fraction: float) -> "Budget":
        """A budget ending ``fraction`` of the way through this one, sharing its skipped list."""
        sub = Budget(0.0, self.clock)
        sub.start, sub.seconds, sub.skipped = self.start, self.seconds * fraction, self.skipped
        return sub
