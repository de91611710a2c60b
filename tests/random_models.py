"""The property test's models: random stacks of Linear/Conv + BatchNorm, drawn from a seed.

``RandomNet(seed)`` is a sequence of blocks; a block is one to three parallel branches, summed when
their widths agree and concatenated when not, then a ReLU. A branch is one or two Linear (on (N, C))
or 3x3 Conv (on (N, C, S, S), S of 1, 2 or 4) layers, each followed by a BatchNorm1d / BatchNorm2d
(affine or not, momentum 0.1, 0.3 or None), a ReLU between them; a Conv branch may start with a
stride of 2 and be resized back to its input's resolution at its end (two resolutions that meet
again, as in HRNet and U-Nets). So branches of one block differ in depth, width and resolution.
``describe(seed)`` says what was drawn, and the collectives per step it must compile to: one per
BatchNorm unpacked; packed, one per level, and a block's branches share levels (its BatchNorms at
the same depth of their branches do not depend on each other), so a block takes as many as its
deepest branch has BatchNorms, in each direction.

The Linear and Conv layers have no bias, as in real networks before a BatchNorm: such a bias's
gradient is zero in exact arithmetic, float32 rounding noise in any implementation, which
tests/checks.py judges against the model's largest gradient (its floor), not its own size.
"""

from __future__ import annotations

import dataclasses
import random

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class Branch:
    channels: int
    affine: bool
    momentum: float | None
    depth: int  # Layer + BatchNorm pairs
    stride: int  # 2: the first Conv halves the resolution; the branch's output is resized back


@dataclasses.dataclass(frozen=True)
class Drawn:
    family: str  # "mlp" or "conv"
    in_channels: int
    spatial: int  # conv: the input's height and width
    blocks: tuple  # per block: a tuple of Branch

    @property
    def sample_shape(self) -> tuple:
        return (self.in_channels,) if self.family == "mlp" else (self.in_channels, self.spatial, self.spatial)

    @property
    def batchnorms(self) -> int:
        return sum(b.depth for block in self.blocks for b in block)

    @property
    def levels(self) -> int:
        """Collectives per direction when packed: each block's deepest branch."""
        return sum(max(b.depth for b in block) for block in self.blocks)


def describe(seed: int) -> Drawn:
    rng = random.Random(seed)
    family = rng.choice(["mlp", "conv"])
    spatial = rng.choice([1, 2, 4]) if family == "conv" else 1
    blocks = []
    channels = rng.randint(2, 6)
    for _ in range(rng.randint(1, 3)):
        out = rng.randint(2, 7)
        count = rng.choice([1, 1, 2, 3])
        same = rng.random() < 0.5  # parallel branches: the same channels (summed) or not (concatenated)
        blocks.append(tuple(
            Branch(out if same or i == 0 else rng.randint(2, 7), rng.random() < 0.7, rng.choice([0.1, 0.3, None]),
                   rng.choice([1, 1, 2]), 2 if family == "conv" and rng.random() < 0.3 else 1)
            for i in range(count)))
    return Drawn(family, channels, spatial, tuple(blocks))


class _Branch(nn.Module):
    def __init__(self, family: str, c_in: int, branch: Branch):
        super().__init__()
        layers = []
        for i in range(branch.depth):
            c = c_in if i == 0 else branch.channels
            if family == "mlp":
                layers += [nn.Linear(c, branch.channels, bias=False),
                           nn.BatchNorm1d(branch.channels, affine=branch.affine, momentum=branch.momentum)]
            else:
                stride = branch.stride if i == 0 else 1
                layers += [nn.Conv2d(c, branch.channels, 3, stride=stride, padding=1, bias=False),
                           nn.BatchNorm2d(branch.channels, affine=branch.affine, momentum=branch.momentum)]
        self.layers = nn.ModuleList(layers)
        self.resize = branch.stride != 1

    def forward(self, x):
        h = x
        for i in range(0, len(self.layers), 2):
            if i:
                h = F.relu(h)
            h = self.layers[i + 1](self.layers[i](h))
        return F.interpolate(h, size=x.shape[-2:], mode="nearest") if self.resize else h


class RandomNet(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        self.drawn = drawn = describe(seed)
        c_in = drawn.in_channels
        self.blocks = nn.ModuleList()
        for block in drawn.blocks:
            self.blocks.append(nn.ModuleList(_Branch(drawn.family, c_in, b) for b in block))
            widths = [b.channels for b in block]
            c_in = sum(widths) if len(set(widths)) > 1 else widths[0]

    def forward(self, x):
        for block in self.blocks:
            outs = [branch(x) for branch in block]
            if len({o.shape[1] for o in outs}) > 1:
                x = F.relu(torch.cat(outs, 1))
            else:
                x = F.relu(sum(outs[1:], outs[0]))
        return x
