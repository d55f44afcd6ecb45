"""CIFAR ResNets as the knowledge-distillation literature uses them, registered into timm's model registry.

Architecture (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, §4.2; arXiv:1512.03385): a
3x3 stem conv at full resolution, three stages of n = (depth - 2) / 6 basic blocks at strides 1, 2, 2, global
average pooling and one linear layer. ``resnet8 ... resnet110`` use widths 16-16-32-64 (stem, stage 1..3);
``resnet8x4`` and ``resnet32x4`` are the 4x wider 32-64-128-256 variants introduced with CRD (Tian et al.,
"Contrastive Representation Distillation", ICLR 2020, arXiv:1910.10699) and used as the standard teacher/student
pair by the KD benchmarks since (RepDistiller, mdistiller). A shortcut that changes shape is a 1x1 conv + BN
(option B) as in the CRD code, not the zero padding of the original paper: that is why resnet56 counts 0.86M
parameters in the KD tables rather than the 0.85M of He et al.

Parameter names follow the CRD layout (``conv1``, ``bn1``, ``layerN.M.{conv1,bn1,conv2,bn2,downsample.{0,1}}``,
``fc``), so the teacher checkpoints published with CRD/mdistiller load into these models unchanged.

The head and timm's model API come from ``CifarNet`` (``_base``); this file supplies the trunk and its taps.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from kdpipe.models._base import CifarNet, blocks_per_stage, cifar_pretrained_cfg

__all__ = ["BasicBlock", "CifarResNet"]

_WIDTHS = (16, 16, 32, 64)  # stem, stage 1, stage 2, stage 3
_WIDTHS_X4 = (32, 64, 128, 256)  # CRD's "x4" variants
_STAGE_STRIDES = (1, 2, 2)


class BasicBlock(nn.Module):
    """Post-activation basic block: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_chs),
            )
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # The sum is a fresh tensor, so the in-place ReLU never touches x, which a forward hook may hold.
        return self.act2(out + shortcut)


def _make_stage(in_chs: int, out_chs: int, num_blocks: int, stride: int) -> nn.Sequential:
    blocks = [BasicBlock(in_chs if i == 0 else out_chs, out_chs, stride if i == 0 else 1) for i in range(num_blocks)]
    return nn.Sequential(*blocks)


class CifarResNet(CifarNet):
    """Basic-block ResNet for 32x32 inputs (any size works: pooling is adaptive).

    Feature taps (``feature_info``) are the three stage outputs ``layer1..layer3`` at reductions 1, 2, 4; the last
    one is what ``forward_features`` returns and the head pools.
    """

    def __init__(
        self,
        depth: int,
        widths: tuple[int, int, int, int] = _WIDTHS,
        num_classes: int = 100,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        # depth counts the stem conv, two convs per block and the classifier (6n + 2); checked before anything is built.
        num_blocks = blocks_per_stage(depth, 2, "CIFAR ResNet", "8, 14, 20")
        super().__init__(num_classes, in_chans, drop_rate)

        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = nn.ReLU(inplace=True)
        self.layer1 = _make_stage(widths[0], widths[1], num_blocks, _STAGE_STRIDES[0])
        self.layer2 = _make_stage(widths[1], widths[2], num_blocks, _STAGE_STRIDES[1])
        self.layer3 = _make_stage(widths[2], widths[3], num_blocks, _STAGE_STRIDES[2])

        self.feature_info = []
        reduction = 1
        for i, stride in enumerate(_STAGE_STRIDES):
            reduction *= stride
            self.feature_info.append({"num_chs": widths[i + 1], "reduction": reduction, "module": f"layer{i + 1}"})

        self._init_head(widths[3], global_pool)
        # Convs and BN as in the base class; the Linear layer keeps torch's default, as in the CRD reference.
        self._init_weights()

    def _stem(self) -> list[nn.Module]:
        return [self.conv1, self.bn1, self.act1]

    def _tap_stages(self) -> list[list[nn.Module]]:
        return [[self.layer1], [self.layer2], [self.layer3]]


def _create(variant: str, pretrained: bool, depth: int, widths: tuple[int, int, int, int], **kwargs: Any) -> nn.Module:
    return build_model_with_cfg(
        CifarResNet,
        variant,
        pretrained,
        depth=depth,
        widths=widths,
        # timm's default out_indices assume five taps; these nets have three.
        feature_cfg={"out_indices": (0, 1, 2)},
        **kwargs,
    )


default_cfgs = generate_default_cfgs(
    {
        name: cifar_pretrained_cfg()
        for name in (
            "resnet8",
            "resnet14",
            "resnet20",
            "resnet32",
            "resnet44",
            "resnet56",
            "resnet110",
            "resnet8x4",
            "resnet32x4",
        )
    }
)


@register_model
def resnet8(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """CIFAR ResNet-8: 1 block per stage, widths 16-16-32-64."""
    return _create("resnet8", pretrained, 8, _WIDTHS, **kwargs)


@register_model
def resnet14(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """CIFAR ResNet-14: 2 blocks per stage, widths 16-16-32-64."""
    return _create("resnet14", pretrained, 14, _WIDTHS, **kwargs)


@register_model
def resnet20(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """CIFAR ResNet-20: 3 blocks per stage, widths 16-16-32-64."""
    return _create("resnet20", pretrained, 20, _WIDTHS, **kwargs)


@register_model
def resnet32(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """CIFAR ResNet-32: 5 blocks per stage, widths 16-16-32-64."""
    return _create("resnet32", pretrained, 32, _WIDTHS, **kwargs)


@register_model
def resnet44(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """CIFAR ResNet-44: 7 blocks per stage, widths 16-16-32-64."""
    return _create("resnet44", pretrained, 44, _WIDTHS, **kwargs)


@register_model
def resnet56(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """CIFAR ResNet-56: 9 blocks per stage, widths 16-16-32-64."""
    return _create("resnet56", pretrained, 56, _WIDTHS, **kwargs)


@register_model
def resnet110(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """CIFAR ResNet-110: 18 blocks per stage, widths 16-16-32-64."""
    return _create("resnet110", pretrained, 110, _WIDTHS, **kwargs)


@register_model
def resnet8x4(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """CRD's ResNet-8x4: 1 block per stage, widths 32-64-128-256 (the usual student of resnet32x4)."""
    return _create("resnet8x4", pretrained, 8, _WIDTHS_X4, **kwargs)


@register_model
def resnet32x4(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """CRD's ResNet-32x4: 5 blocks per stage, widths 32-64-128-256 (the usual CIFAR-100 teacher)."""
    return _create("resnet32x4", pretrained, 32, _WIDTHS_X4, **kwargs)
