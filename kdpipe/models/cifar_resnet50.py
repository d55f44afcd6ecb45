"""CIFAR ResNet-50 as the knowledge-distillation literature uses it, registered into timm as ``resnet50_cifar``.

Architecture (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, arXiv:1512.03385): the
ImageNet bottleneck ResNet-50 (stages of 3, 4, 6, 3 bottlenecks at widths 64, 128, 256, 512, expansion 4, so
256 ... 2048 output channels), with the CIFAR stem CRD uses (Tian et al., "Contrastive Representation
Distillation", ICLR 2020, arXiv:1910.10699, the ``ResNet50`` of its ``resnetv2.py``): one 3x3 stride-1 conv to
64 channels + BN + ReLU and no max-pool, so the stages run at strides 1, 2, 2, 2 and a 32x32 image ends on a 4x4
map; global average pooling and one linear layer. A bottleneck is 1x1 + BN + ReLU, 3x3 (carrying the stride) + BN
+ ReLU, 1x1 to 4x the width + BN, plus a shortcut that is the identity or, where the shape changes, a 1x1 conv +
BN; a ReLU follows the sum. 23.7M parameters with a 100-class head. CRD uses it as the teacher of its
ResNet50 -> MobileNetV2 pair, a standard cross-architecture row of the KD benchmarks (RepDistiller, mdistiller).

Why ``resnet50_cifar`` and not ``resnet50``: timm already registers ``resnet50`` (the ImageNet net, with published
weights), and registering another model under that name would silently replace it for every user of the process.
The ``_cifar`` suffix follows ``mobilenetv2_x0_5_cifar`` and the VGGs (``vgg13_cifar``), whose names would clash
with timm's too; the CIFAR ResNets ``resnet8 ... resnet110`` need no suffix, as timm has no nets of those names.

Parameter names follow the CRD layout (``conv1``, ``bn1``, ``layerN.M.{conv1,bn1,conv2,bn2,conv3,bn3}``,
``layerN.M.shortcut.{0,1}``, ``linear``), so checkpoints trained with the CRD/mdistiller code load unchanged. The
head and timm's model API come from ``CifarNet`` (``_base``); this file supplies the trunk and its taps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from kdpipe.models._base import CifarNet, cifar_pretrained_cfg

__all__ = ["Bottleneck", "CifarBottleneckResNet"]

_STEM_CHANNELS = 64
_EXPANSION = 4


class Bottleneck(nn.Module):
    """Post-activation bottleneck: ``relu(bn(conv1x1(relu(bn(conv3x3(relu(bn(conv1x1(x)))))))) + shortcut(x))``."""

    def __init__(self, in_chs: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_chs = width * _EXPANSION
        self.conv1 = nn.Conv2d(in_chs, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        # ``shortcut``, not ``downsample``: the name in CRD's bottleneck checkpoints.
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_chs),
            )
        self.act3 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.shortcut is None else self.shortcut(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        # The sum is a fresh tensor, so the in-place ReLU never touches x, which a forward hook may hold.
        return self.act3(out + shortcut)


class CifarBottleneckResNet(CifarNet):
    """Bottleneck ResNet with a CIFAR stem, for 32x32 inputs (any size works: pooling is adaptive).

    Feature taps (``feature_info``) are the four stage outputs ``layer1 .. layer4`` (CRD's ``f1 .. f4``) at
    reductions 1, 2, 4, 8; the last is what ``forward_features`` returns and the head pools.
    """

    classifier_attr = "linear"

    def __init__(
        self,
        depths: Sequence[int] = (3, 4, 6, 3),
        widths: Sequence[int] = (64, 128, 256, 512),
        num_classes: int = 100,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__(num_classes, in_chans, drop_rate)
        self.conv1 = nn.Conv2d(in_chans, _STEM_CHANNELS, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(_STEM_CHANNELS)
        self.act1 = nn.ReLU(inplace=True)

        self.feature_info = []
        self._num_stages = len(depths)
        in_chs, reduction = _STEM_CHANNELS, 1
        for s, (depth, width) in enumerate(zip(depths, widths, strict=True)):
            stride = 1 if s == 0 else 2
            blocks = []
            for i in range(depth):
                blocks.append(Bottleneck(in_chs, width, stride if i == 0 else 1))
                in_chs = width * _EXPANSION
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
            reduction *= stride
            self.feature_info.append({"num_chs": in_chs, "reduction": reduction, "module": f"layer{s + 1}"})

        self._init_head(in_chs, global_pool)
        # He-normal (fan_out) convs and unit BN, as in the reference; the Linear layer keeps torch's default.
        self._init_weights()

    def _stem(self) -> list[nn.Module]:
        return [self.conv1, self.bn1, self.act1]

    def _tap_stages(self) -> list[list[nn.Module]]:
        return [[self.get_submodule(f"layer{s + 1}")] for s in range(self._num_stages)]


default_cfgs = generate_default_cfgs(
    {"resnet50_cifar": cifar_pretrained_cfg(pool_size=(4, 4), classifier="linear")}  # total stride 8
)


@register_model
def resnet50_cifar(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """CIFAR ResNet-50: bottlenecks 3-4-6-3, 3x3 stride-1 stem, no max-pool (CRD's ``ResNet50``)."""
    return build_model_with_cfg(
        CifarBottleneckResNet,
        "resnet50_cifar",
        pretrained,
        depths=(3, 4, 6, 3),
        widths=(64, 128, 256, 512),
        feature_cfg={"out_indices": (0, 1, 2, 3)},
        **kwargs,
    )
