"""The model zoo: torchvision and timm architectures (no pretrained weights), each with the input
one sample of it takes in the sweep (small resolutions: the sweep pins graphs, not accuracy), and
dropout / stochastic depth at p = 0 (see ``_no_dropout``).

Each model is a module-level factory, so that ``bnpass inspect tests.zoo.models:NAME`` and the
sweep's worker processes build it by name. ``ZOO`` lists them in the CSV's order.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class ZooModel:
    name: str
    source: str  # torchvision | timm
    factory: Callable[[], nn.Module]
    sample_shape: tuple  # one sample (C, H, W) or (C, T, H, W)
    note: str = ""

    @property
    def target(self) -> str:
        return f"{self.factory.__module__}:{self.factory.__name__}"


class OutputTensor(nn.Module):
    """A model whose forward returns a dict (segmentation): its ``out`` tensor."""

    def __init__(self, model: nn.Module, key: str = "out"):
        super().__init__()
        self.model = model
        self.key = key

    def forward(self, x):
        return self.model(x)[self.key]


class DetectionTrainingLoss(nn.Module):
    """A detector in training mode on a batch tensor: one synthetic box per image; the summed losses."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        images = list(x.unbind(0))
        targets = [{"boxes": torch.tensor([[2.0, 3.0, 20.0, 24.0]], device=x.device),
                    "labels": torch.tensor([1], device=x.device)} for _ in images]
        losses = self.model(images, targets)
        return torch.stack(list(losses.values())).sum().reshape(1)


def _tv(name: str, **kwargs) -> nn.Module:
    import torchvision.models as models

    return _no_dropout(models.get_model(name, weights=None, **kwargs))


def _timm(name: str) -> nn.Module:
    import timm

    return _no_dropout(timm.create_model(name, pretrained=False))


def _no_dropout(model: nn.Module) -> nn.Module:
    """Dropout and stochastic depth off (p = 0; the modules stay in the graph): the ranks' random
    masks cannot be drawn again by the reference on the global batch, so parity needs none.
    nn.Dropout*, torchvision's StochasticDepth (``p``), timm's DropPath (``drop_prob``) and the
    ``drop_rate`` timm models pass to F.dropout themselves."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) or type(module).__name__ == "StochasticDepth":
            module.p = 0.0
        if isinstance(getattr(module, "drop_prob", None), float):
            module.drop_prob = 0.0
        if isinstance(getattr(module, "drop_rate", None), float):
            module.drop_rate = 0.0
    return model


def resnet18(): return _tv("resnet18")
def resnet50(): return _tv("resnet50")
def resnext50_32x4d(): return _tv("resnext50_32x4d")
def wide_resnet50_2(): return _tv("wide_resnet50_2")
def mobilenet_v2(): return _tv("mobilenet_v2")
def mobilenet_v3_small(): return _tv("mobilenet_v3_small")
def efficientnet_b0(): return _tv("efficientnet_b0")
def densenet121(): return _tv("densenet121")
def shufflenet_v2_x0_5(): return _tv("shufflenet_v2_x0_5")
def googlenet(): return _tv("googlenet", aux_logits=False, init_weights=False)
def inception_v3(): return _tv("inception_v3", aux_logits=False, init_weights=False)
def vgg11_bn(): return _tv("vgg11_bn")
def convnext_tiny(): return _tv("convnext_tiny")
def vit_b_16(): return _tv("vit_b_16", image_size=32)
def r3d_18(): return _tv("r3d_18")


def deeplabv3_mobilenet_v3_large():
    return OutputTensor(_tv("deeplabv3_mobilenet_v3_large", weights_backbone=None, num_classes=4))


def fasterrcnn_mobilenet_v3_large_320_fpn():
    """As torchvision builds it with a pretrained backbone: FrozenBatchNorm2d in the backbone
    (``norm_layer = FrozenBatchNorm2d if is_trained``), here without downloading the weights."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = _tv("fasterrcnn_mobilenet_v3_large_320_fpn", weights_backbone=None, num_classes=3,
                min_size=64, max_size=64)
    _freeze_batchnorm(model.backbone, FrozenBatchNorm2d)
    return DetectionTrainingLoss(model)


def _freeze_batchnorm(module: nn.Module, frozen_cls) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = frozen_cls(child.num_features, eps=child.eps)
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            _freeze_batchnorm(child, frozen_cls)


def regnet_x_400mf(): return _tv("regnet_x_400mf")
def mnasnet0_5(): return _tv("mnasnet0_5")


class UNet(nn.Module):
    """A U-Net on a ResNet-18 encoder (segmentation_models_pytorch's ``Unet("resnet18")`` shape,
    written here): the encoder's five resolutions, a decoder that upsamples and concatenates each
    skip connection, Conv-BN-ReLU twice per stage, a per-pixel head of ``classes`` logits."""

    def __init__(self, classes: int = 3):
        super().__init__()
        import torchvision.models as models

        enc = models.resnet18(weights=None)
        self.stem = nn.Sequential(enc.conv1, enc.bn1, enc.relu)  # /2, 64
        self.pool = enc.maxpool
        self.layers = nn.ModuleList([enc.layer1, enc.layer2, enc.layer3, enc.layer4])  # /4 ... /32
        skips, ins = [256, 128, 64, 64, 0], [512, 256, 128, 64, 32]
        outs = [256, 128, 64, 32, 16]
        self.decoder = nn.ModuleList(
            nn.Sequential(_conv_bn_relu(i + s, o), _conv_bn_relu(o, o)) for i, s, o in zip(ins, skips, outs))
        self.head = nn.Conv2d(16, classes, 3, padding=1)

    def forward(self, x):
        skips = [self.stem(x)]
        h = self.pool(skips[0])
        for layer in self.layers:
            h = layer(h)
            skips.append(h)
        skips = skips[-2::-1] + [None]  # /16, /8, /4, /2, then the full resolution without a skip
        for block, skip in zip(self.decoder, skips):
            h = nn.functional.interpolate(h, scale_factor=2.0, mode="nearest")
            h = block(h if skip is None else torch.cat([h, skip], 1))
        return self.head(h)


def _conv_bn_relu(cin: int, cout: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def unet_resnet18(): return UNet()


def timm_efficientnet_b0(): return _timm("efficientnet_b0")
def timm_ghostnet_100(): return _timm("ghostnet_100")
def timm_rexnet_100(): return _timm("rexnet_100")
def timm_dla34(): return _timm("dla34")
def timm_mobilenetv3_small_050(): return _timm("mobilenetv3_small_050")
def timm_resnet10t(): return _timm("resnet10t")
def timm_ese_vovnet19b_dw(): return _timm("ese_vovnet19b_dw")
def timm_hrnet_w18_small(): return _timm("hrnet_w18_small")


_IMG = (3, 64, 64)  # the last stage of a /32 network at 2x2: see tests/zoo/parity.py
ZOO = [
    ZooModel("resnet18", "torchvision", resnet18, _IMG),
    ZooModel("resnet50", "torchvision", resnet50, _IMG),
    ZooModel("resnext50_32x4d", "torchvision", resnext50_32x4d, _IMG),
    ZooModel("wide_resnet50_2", "torchvision", wide_resnet50_2, _IMG),
    ZooModel("mobilenet_v2", "torchvision", mobilenet_v2, (3, 80, 80), "80x80: see tests/zoo/parity.py"),
    ZooModel("mobilenet_v3_small", "torchvision", mobilenet_v3_small, _IMG),
    ZooModel("efficientnet_b0", "torchvision", efficientnet_b0, _IMG),
    ZooModel("densenet121", "torchvision", densenet121, _IMG),
    ZooModel("shufflenet_v2_x0_5", "torchvision", shufflenet_v2_x0_5, _IMG),
    ZooModel("googlenet", "torchvision", googlenet, _IMG, "aux_logits=False"),
    ZooModel("inception_v3", "torchvision", inception_v3, (3, 107, 107), "aux_logits=False; Mixed_7 at 2x2"),
    ZooModel("vgg11_bn", "torchvision", vgg11_bn, _IMG),
    ZooModel("convnext_tiny", "torchvision", convnext_tiny, _IMG, "LayerNorm: no BatchNorm"),
    ZooModel("vit_b_16", "torchvision", vit_b_16, (3, 32, 32), "image_size=32; LayerNorm: no BatchNorm"),
    ZooModel("r3d_18", "torchvision", r3d_18, (3, 4, 32, 32), "BatchNorm3d"),
    ZooModel("deeplabv3_mobilenet_v3_large", "torchvision", deeplabv3_mobilenet_v3_large, _IMG,
             "num_classes=4; the 'out' tensor"),
    ZooModel("regnet_x_400mf", "torchvision", regnet_x_400mf, _IMG),
    ZooModel("mnasnet0_5", "torchvision", mnasnet0_5, _IMG),
    ZooModel("unet_resnet18", "test", unet_resnet18, _IMG, "U-Net on a ResNet-18 encoder; per-pixel logits"),
    ZooModel("fasterrcnn_mobilenet_v3_large_320_fpn", "torchvision", fasterrcnn_mobilenet_v3_large_320_fpn,
             (3, 64, 64), "training losses, one box per image; backbone FrozenBatchNorm2d"),
    ZooModel("timm/efficientnet_b0", "timm", timm_efficientnet_b0, _IMG, "BatchNormAct2d"),
    ZooModel("timm/ghostnet_100", "timm", timm_ghostnet_100, _IMG),
    ZooModel("timm/rexnet_100", "timm", timm_rexnet_100, _IMG, "BatchNormAct2d"),
    ZooModel("timm/dla34", "timm", timm_dla34, _IMG),
    ZooModel("timm/mobilenetv3_small_050", "timm", timm_mobilenetv3_small_050, _IMG, "BatchNormAct2d"),
    ZooModel("timm/resnet10t", "timm", timm_resnet10t, _IMG),
    ZooModel("timm/ese_vovnet19b_dw", "timm", timm_ese_vovnet19b_dw, _IMG, "BatchNormAct2d"),
    ZooModel("timm/hrnet_w18_small", "timm", timm_hrnet_w18_small, _IMG,
             "parallel resolutions fused by upsample + add"),
]
BY_NAME = {m.name: m for m in ZOO}
