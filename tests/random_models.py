"""The property test's models: small random stacks of Linear/Conv + BatchNorm, drawn from a seed.

``RandomNet(seed)`` is a sequence of blocks; a block is one or two parallel branches, each a
Linear (on (N, C)) or a 3x3 Conv (on (N, C, 4, 4)) followed by a BatchNorm1d / BatchNorm2d (affine
or not, momentum 0.1, 0.3 or None), the branches summed, then a ReLU. Channel counts are drawn per
block, so sites of one level have the same or different channel counts. ``describe(seed)`` says what
was drawn, and the collectives per step it must compile to: one per block and direction when
packed (a block's branches share a level), one per BatchNorm otherwise.

The Linear and Conv layers have no bias, as in real networks before a BatchNorm: such a bias's
gradient is zero in exact arithmetic, float32 rounding noise of about 1e-6 in any implementation
(eager's own varies from 5e-8 to 5e-6 over random batches of 4-6), and tests/checks.py judges a
zero quantity against eager's error on the same single batch, which a draw can make arbitrarily
small.
"""

from __future__ import annotations

import dataclasses
import random

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class Drawn:
    family: str  # "mlp" or "conv"
    in_channels: int
    blocks: tuple  # per block: tuple of (channels, affine, momentum) per branch

    @property
    def sample_shape(self) -> tuple:
        return (self.in_channels,) if self.family == "mlp" else (self.in_channels, 4, 4)

    @property
    def batchnorms(self) -> int:
        return sum(len(b) for b in self.blocks)


def describe(seed: int) -> Drawn:
    rng = random.Random(seed)
    family = rng.choice(["mlp", "conv"])
    blocks = []
    channels = rng.randint(2, 6)
    for _ in range(rng.randint(1, 3)):
        out = rng.randint(2, 7)
        branches = rng.choice([1, 1, 2])
        same = rng.random() < 0.5  # parallel branches: the same channels (summed) or not (concatenated)
        blocks.append(tuple((out if same or i == 0 else rng.randint(2, 7), rng.random() < 0.7,
                             rng.choice([0.1, 0.3, None])) for i in range(branches)))
    return Drawn(family, channels, tuple(blocks))


class _Branch(nn.Module):
    def __init__(self, family: str, c_in: int, c_out: int, affine: bool, momentum):
        super().__init__()
        if family == "mlp":
            self.layer = nn.Linear(c_in, c_out, bias=False)
            self.bn = nn.BatchNorm1d(c_out, affine=affine, momentum=momentum)
        else:
            self.layer = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(c_out, affine=affine, momentum=momentum)

    def forward(self, x):
        return self.bn(self.layer(x))


class RandomNet(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        self.drawn = drawn = describe(seed)
        c_in = drawn.in_channels
        self.blocks = nn.ModuleList()
        for block in drawn.blocks:
            self.blocks.append(nn.ModuleList(
                _Branch(drawn.family, c_in, c, affine, momentum) for c, affine, momentum in block))
            widths = [c for c, _, _ in block]
            c_in = sum(widths) if len(set(widths)) > 1 else widths[0]

    def forward(self, x):
        for block in self.blocks:
            outs = [branch(x) for branch in block]
            if len({o.shape[1] for o in outs}) > 1:
                x = F.relu(torch.cat(outs, 1))
            else:
                x = F.relu(sum(outs[1:], outs[0]))
        return x
