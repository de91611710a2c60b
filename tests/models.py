"""Small models for the tests: each exercises BatchNorm forms a real model uses.

Every factory is deterministic (seeded) so that ranks and the float64 reference build the same
weights. ``SPECS`` names what a test runs: model, per-rank batch sizes, input shape, dtype, layout.
"""

from __future__ import annotations

import dataclasses
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


class ConvNet(nn.Module):
    """Conv-BN-ReLU, a residual Conv-BN + add, momentum=None, no running stats, affine=False."""

    def __init__(self, channels: int = 6):
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels, momentum=None)
        self.bn3 = nn.BatchNorm2d(channels, track_running_stats=False)
        self.bn4 = nn.BatchNorm2d(channels, affine=False, momentum=0.3)

    def forward(self, x):
        a = F.relu(self.bn1(self.conv1(x)))
        b = F.relu(self.bn2(self.conv2(a)) + a)
        return self.bn4(self.bn3(b))


class ResidualBlock(nn.Module):
    def __init__(self, channels: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)) + x)


class CheckpointedNet(nn.Module):
    """Conv-BN-ReLU under activation checkpointing, then a BN outside it.

    ``use_checkpoint`` is switched off for the eager float64 reference: eager checkpointing reruns
    the forward in the backward and so updates BN's running statistics twice (PyTorch behaviour);
    the compiled graph must update them once, as an uncheckpointed model does.
    """

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4, momentum=None)
        self.use_checkpoint = True

    def block(self, x):
        return F.relu(self.bn1(self.conv(x)))

    def forward(self, x):
        if self.use_checkpoint:
            x = torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)
        else:
            x = self.block(x)
        return self.bn2(x)


class FunctionalBN(nn.Module):
    """BN the way timm's BatchNormAct2d and hand-written modules do it: F.batch_norm and
    torch.batch_norm called directly, on parameters and buffers the module owns."""

    def __init__(self, channels: int = 5):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)
        self.bias = nn.Parameter(torch.randn(channels) * 0.1)
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x):
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, 0.1, 1e-5)
        y = F.silu(y)
        return torch.batch_norm(y, None, None, None, None, True, 0.0, 1e-3, False)


class MLP1d(nn.Module):
    """BatchNorm1d on (N, C) after a Linear, and on (N, C, L)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(7, 6)
        self.bn = nn.BatchNorm1d(6)
        self.bn_seq = nn.BatchNorm1d(3)

    def forward(self, x):  # x: (N, 3, 7)
        h = self.bn(self.fc(x).mean(1))  # (N, 6)
        return h.unsqueeze(1) * self.bn_seq(x).sum(2, keepdim=True)


class Net3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm3d(2)
        self.conv = nn.Conv3d(2, 4, 1)

    def forward(self, x):  # BN first: CPU conv3d outputs are contiguous whatever its input
        return F.relu(self.conv(self.bn(x)))


class LinearBN(nn.Module):
    """A rank may hold zero samples: BN on a Linear output (a Conv on N=0 trips Inductor)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.fc(x))


class BN2d(nn.Module):
    def __init__(self, channels: int = 4):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        with torch.no_grad():
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.bn(x)


class NotSynced(nn.Module):
    """Norms that are not training-mode BN: nothing here may become a collective."""

    def __init__(self):
        super().__init__()
        from torchvision.ops import FrozenBatchNorm2d

        self.frozen = FrozenBatchNorm2d(4)
        self.ln = nn.LayerNorm([4, 5, 5])
        self.gn = nn.GroupNorm(2, 4)
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.eval_bn = nn.BatchNorm2d(4).eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.eval_bn.eval()  # stays in eval: a BN on running statistics inside a training model
        return self

    def forward(self, x):
        return self.eval_bn(self.inorm(self.gn(self.ln(self.frozen(x)))))


class FoldNet(nn.Module):
    """Eval-mode BN after: a Conv with bias, a grouped Conv without bias (BN affine=False), a Conv
    whose output is also used elsewhere (not foldable), a Linear (BatchNorm1d)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False, groups=2)
        self.bn2 = nn.BatchNorm2d(4, affine=False)
        self.conv3 = nn.Conv2d(4, 4, 1)
        self.bn3 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)
        self.bn4 = nn.BatchNorm1d(5)
        with torch.no_grad():  # running statistics and affine parameters away from 0 / 1
            for bn in (self.bn1, self.bn2, self.bn3, self.bn4):
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2.0)
                if bn.affine:
                    bn.weight.uniform_(0.5, 1.5)
                    bn.bias.uniform_(-1, 1)

    def forward(self, x):
        a = F.relu(self.bn1(self.conv1(x)))
        b = self.bn2(self.conv2(a))
        c = self.conv3(b)
        d = self.bn3(c) + c
        return self.bn4(self.fc(d.mean((2, 3))))


class Branches(nn.Module):
    """BatchNorms on parallel branches, whose statistics do not depend on each other: RepVGG's three
    (3x3 Conv-BN, 1x1 Conv-BN, identity BN, summed), then a ResNet basic block with a downsample
    (Conv-BN on the shortcut). Levels of the forward's collectives: the three RepVGG BNs; the block's
    first BN with the shortcut's; the block's second BN. Of the backward's: the block's second BN
    with the shortcut's; the block's first; the three RepVGG BNs.

    8 input channels: torch 2.14.1's CPU backward of a strided 1x1 conv in channels_last (Inductor's
    layout) corrupts memory when the input has 2, 3 or 4 channels (eager too, with no bnpass)."""

    def __init__(self, channels: int = 8, out: int = 4):
        super().__init__()
        c = channels
        self.rep3 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.rep1 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.rep_id = nn.BatchNorm2d(c, momentum=None)
        self.conv1 = nn.Conv2d(c, out, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.conv2 = nn.Conv2d(out, out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.shortcut = nn.Sequential(nn.Conv2d(c, out, 1, stride=2, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        x = F.relu(self.rep3(x) + self.rep1(x) + self.rep_id(x))
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + self.shortcut(x))


class MLPHead(nn.Module):
    """Linear -> BatchNorm1d -> ReLU -> Linear -> BatchNorm1d: a detection / SSL head, where a rank
    may hold no sample or one (one value per channel)."""

    def __init__(self, c1: int = 6, c2: int = 6):
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(5, c1), nn.BatchNorm1d(c1)
        self.fc2, self.bn2 = nn.Linear(c1, c2), nn.BatchNorm1d(c2)

    def forward(self, x):
        return self.bn2(self.fc2(F.relu(self.bn1(self.fc1(x)))))


class TwoBranchBN(nn.Module):
    """Two BatchNorms on the same input, summed: their collectives pack into one."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.a, self.b = nn.BatchNorm2d(channels), nn.BatchNorm2d(channels, momentum=0.3)

    def forward(self, x):
        return self.a(x) + self.b(x)


class FrozenOnly(nn.Module):
    """A detection backbone's BatchNorms: all FrozenBatchNorm2d, nothing to reduce."""

    def __init__(self):
        super().__init__()
        from torchvision.ops import FrozenBatchNorm2d

        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), FrozenBatchNorm2d(4)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class NoBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return F.relu(self.conv(x))


FACTORIES = {
    "mlp_head": MLPHead,
    "mlp_head_6_7": lambda: MLPHead(6, 7),
    "two_branch": TwoBranchBN,
    "frozen_only": FrozenOnly,
    "no_bn": NoBN,
    "branches": Branches,
    "convnet": ConvNet,
    "checkpointed": CheckpointedNet,
    "functional": FunctionalBN,
    "mlp1d": MLP1d,
    "net3d": Net3d,
    "linear_bn": LinearBN,
    "bn2d": BN2d,
    "not_synced": NotSynced,
    "fold": FoldNet,
}


def factory(name: str):
    """The model factory a spec names: a test model above, or ``zoo:NAME`` (tests/zoo/models.py)."""
    if name.startswith("random:"):  # tests/random_models.py: the property test's models
        from tests.random_models import RandomNet

        return lambda: RandomNet(int(name[len("random:"):]))
    if name.startswith("zoo:"):
        from tests.zoo.models import BY_NAME

        return BY_NAME[name[len("zoo:"):]].factory
    return FACTORIES[name]


@dataclasses.dataclass(frozen=True)
class Spec:
    """One training run: what model, which per-rank batches, how many SGD steps."""

    name: str
    model: str
    sizes: tuple  # per-rank batch sizes
    sample_shape: tuple  # one sample's shape
    steps: int = 2
    dtype: str = "float32"
    memory_format: str = "contiguous"
    sync_batchnorm: bool = False  # nn.SyncBatchNorm.convert_sync_batchnorm first
    offset: float = 0.0  # add to the data: |mean|/std = offset
    train: bool = True
    options: tuple = ()  # backend options as (key, value) pairs
    compile_kwargs: tuple = ()  # torch.compile arguments as (key, value) pairs: fullgraph, dynamic
    step_sizes: tuple = ()  # per-step per-rank batch sizes; `sizes` for steps not listed
    accumulate: int = 1  # forward/backward passes per optimizer step (gradient accumulation)
    ddp: str = ""  # "outer": torch.compile(DDP(model)); "inner": DDP(torch.compile(model))
    backend: str = "bnpass"  # or "bnpass_eager": the same pass without Inductor's codegen

    def build(self, dtype=None) -> nn.Module:
        torch.manual_seed(zlib.crc32(self.model.encode()))
        model = factory(self.model)()
        if self.sync_batchnorm:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.train(self.train)
        if dtype is not None:
            model = model.to(dtype)
        return model

    def sizes_at(self, step: int) -> tuple:
        return self.step_sizes[step] if step < len(self.step_sizes) else self.sizes

    def batch(self, step: int) -> torch.Tensor:
        """The global input batch of one step, in the spec's dtype (then widened for a reference)."""
        g = torch.Generator().manual_seed(1000 + step)
        n = sum(self.sizes_at(step))
        x = torch.randn((n,) + self.sample_shape, generator=g) * 2.0 + 0.5 + self.offset
        return x.to(getattr(torch, self.dtype))

    def loss_weights(self, step: int, out_shape) -> torch.Tensor:
        """Fixed random weights w of the loss sum(y * w) over the global batch's output."""
        g = torch.Generator().manual_seed(2000 + step)
        return torch.randn((sum(self.sizes_at(step)),) + tuple(out_shape[1:]), generator=g)

    def local(self, tensor: torch.Tensor, rank: int, step: int) -> torch.Tensor:
        sizes = self.sizes_at(step)
        start = sum(sizes[:rank])
        return tensor[start : start + sizes[rank]]


def memory_format(name: str):
    return {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last,
            "channels_last_3d": torch.channels_last_3d}[name]
