"""CIFAR ShuffleNet V1 and V2 as the knowledge-distillation literature uses them, registered into timm's registry.

CRD (Tian et al., "Contrastive Representation Distillation", ICLR 2020, arXiv:1910.10699) added both as the
lightweight students of its cross-architecture pairs (resnet32x4 -> ShuffleV1 / ShuffleV2, wrn_40_2 -> ShuffleV1),
rows every KD benchmark since reports (RepDistiller, mdistiller). The CIFAR adaptation, shared by both nets: the
stem is a 1x1 conv to 24 channels + BN + ReLU at full resolution (no stride-2 3x3 conv, no max-pool), so the three
stages run at strides 2, 4, 8 and a 32x32 image ends on a 4x4 map; global average pooling, one linear layer.

``shufflenet_v1`` (Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural Network for Mobile
Devices", CVPR 2018, arXiv:1707.01083), CRD's ``ShuffleV1``: g = 3 groups, stage widths 240, 480, 960 with 4, 8, 4
bottlenecks. A bottleneck is grouped 1x1 conv to a quarter of its output width + BN + ReLU, channel shuffle, 3x3
depthwise conv + BN + ReLU (the reference keeps this ReLU, unlike the paper), grouped 1x1 conv + BN; the first
block of a stage has stride 2 and concatenates a 3x3 average-pooled shortcut (so its conv path produces only
``width - in_width`` channels), the others add an identity shortcut; a ReLU follows either. The first bottleneck
after the stem uses a dense first 1x1 conv (24 input channels are too few to split). 0.95M parameters (100 classes).

``shufflenet_v2`` (Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design", ECCV
2018, arXiv:1807.11164), CRD's ``ShuffleV2`` at net size 1: stage widths 116, 232, 464, each a stride-2 down block
followed by 3, 7, 3 basic blocks, then a 1x1 conv to 1024 + BN + ReLU. A basic block splits the channels in half,
passes one half through and the other through 1x1 conv + BN + ReLU, 3x3 depthwise conv + BN, 1x1 conv + BN + ReLU,
concatenates (pass-through first) and shuffles with 2 groups; a down block runs two stride-2 branches (depthwise +
BN, 1x1 + BN + ReLU | 1x1 + BN + ReLU, depthwise + BN, 1x1 + BN + ReLU) on the whole input, concatenates and
shuffles. 1.36M parameters (100 classes).

Parameter names follow the CRD layout (``conv1``, ``bn1``, ``layerS.B.{convI,bnI}``, ``conv2``/``bn2`` for V2's
head conv, ``linear``) so checkpoints trained with the CRD/mdistiller code load unchanged. The reference has no
weight initialisation of its own, so neither do these nets: PyTorch's default init, as CRD trained them. The head
and timm's model API come from ``CifarNet`` (``_base``); this file supplies the trunks and their taps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from kdpipe.models._base import CifarNet, cifar_pretrained_cfg

__all__ = ["ShuffleNetV1Cifar", "ShuffleNetV2Cifar", "channel_shuffle"]

_STEM_CHANNELS = 24


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``groups`` equal groups: (N, g*k, H, W) viewed as (N, g, k) -> (N, k, g) -> flat."""
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)


def _bn_relu(chs: int) -> tuple[nn.BatchNorm2d, nn.ReLU]:
    return nn.BatchNorm2d(chs), nn.ReLU(inplace=True)


class ShuffleV1Block(nn.Module):
    """ShuffleNet V1 bottleneck; stride 2 concatenates an average-pooled shortcut, stride 1 adds the identity."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, groups: int, first_groups: int) -> None:
        super().__init__()
        # A stride-2 block's conv path only fills the channels its concatenated shortcut does not.
        branch_chs = out_chs - in_chs if stride == 2 else out_chs
        mid_chs = branch_chs // 4
        self.first_groups = first_groups
        self.conv1 = nn.Conv2d(in_chs, mid_chs, 1, groups=first_groups, bias=False)
        self.bn1, self.act1 = _bn_relu(mid_chs)
        self.conv2 = nn.Conv2d(mid_chs, mid_chs, 3, stride=stride, padding=1, groups=mid_chs, bias=False)
        self.bn2, self.act2 = _bn_relu(mid_chs)
        self.conv3 = nn.Conv2d(mid_chs, branch_chs, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(branch_chs)
        self.shortcut: nn.Module | None = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else None
        self.act3 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        if self.first_groups > 1:
            out = channel_shuffle(out, self.first_groups)
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        # Both the concatenation and the sum are fresh tensors: the in-place ReLU never touches x.
        out = torch.cat([out, self.shortcut(x)], 1) if self.shortcut is not None else out + x
        return self.act3(out)


class ShuffleV2Block(nn.Module):
    """ShuffleNet V2 basic block: half the channels pass through, half go through the 1x1-dw-1x1 branch."""

    def __init__(self, chs: int) -> None:
        super().__init__()
        self.split_chs = chs // 2
        branch_chs = chs - self.split_chs
        self.conv1 = nn.Conv2d(branch_chs, branch_chs, 1, bias=False)
        self.bn1, self.act1 = _bn_relu(branch_chs)
        self.conv2 = nn.Conv2d(branch_chs, branch_chs, 3, padding=1, groups=branch_chs, bias=False)
        self.bn2 = nn.BatchNorm2d(branch_chs)
        self.conv3 = nn.Conv2d(branch_chs, branch_chs, 1, bias=False)
        self.bn3, self.act3 = _bn_relu(branch_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, branch = x[:, : self.split_chs], x[:, self.split_chs :]
        branch = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(branch)))))
        branch = self.act3(self.bn3(self.conv3(branch)))
        return channel_shuffle(torch.cat([kept, branch], 1), 2)


class ShuffleV2DownBlock(nn.Module):
    """ShuffleNet V2 stride-2 block: two branches on the whole input, each producing half the output channels."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        mid_chs = out_chs // 2
        # Left branch: depthwise stride-2 conv, then 1x1.
        self.conv1 = nn.Conv2d(in_chs, in_chs, 3, stride=2, padding=1, groups=in_chs, bias=False)
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.conv2 = nn.Conv2d(in_chs, mid_chs, 1, bias=False)
        self.bn2, self.act2 = _bn_relu(mid_chs)
        # Right branch: 1x1, depthwise stride-2 conv, 1x1.
        self.conv3 = nn.Conv2d(in_chs, mid_chs, 1, bias=False)
        self.bn3, self.act3 = _bn_relu(mid_chs)
        self.conv4 = nn.Conv2d(mid_chs, mid_chs, 3, stride=2, padding=1, groups=mid_chs, bias=False)
        self.bn4 = nn.BatchNorm2d(mid_chs)
        self.conv5 = nn.Conv2d(mid_chs, mid_chs, 1, bias=False)
        self.bn5, self.act5 = _bn_relu(mid_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = self.act2(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(self.act3(self.bn3(self.conv3(x)))))
        right = self.act5(self.bn5(self.conv5(right)))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class _ShuffleNetCifar(CifarNet):
    """What both ShuffleNets share: the 1x1 stem, three ``layerN`` stages tapped at their outputs, ``linear``."""

    classifier_attr = "linear"
    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential

    def _build_stem(self, in_chans: int) -> None:
        self.conv1 = nn.Conv2d(in_chans, _STEM_CHANNELS, 1, bias=False)
        self.bn1, self.act1 = _bn_relu(_STEM_CHANNELS)

    def _set_feature_info(self, widths: Sequence[int]) -> None:
        # Each stage starts with a stride-2 block: reductions 2, 4, 8.
        self.feature_info = [
            {"num_chs": w, "reduction": 2 ** (i + 1), "module": f"layer{i + 1}"} for i, w in enumerate(widths)
        ]

    def _stem(self) -> list[nn.Module]:
        return [self.conv1, self.bn1, self.act1]

    def _tap_stages(self) -> list[list[nn.Module]]:
        return [[self.layer1], [self.layer2], [self.layer3]]


class ShuffleNetV1Cifar(_ShuffleNetCifar):
    """ShuffleNet V1 for 32x32 inputs (any size works: pooling is adaptive).

    Feature taps (``feature_info``) are the stage outputs ``layer1 .. layer3`` (post-ReLU, CRD's ``f1 .. f3``) at
    reductions 2, 4, 8; the last is what ``forward_features`` returns and the head pools.
    """

    def __init__(
        self,
        widths: Sequence[int] = (240, 480, 960),
        depths: Sequence[int] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 100,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__(num_classes, in_chans, drop_rate)
        self._build_stem(in_chans)
        in_chs = _STEM_CHANNELS
        for s, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            blocks = []
            for i in range(depth):
                # Only the very first block (right after the 24-channel stem) keeps a dense first 1x1 conv.
                first_groups = 1 if s == 0 and i == 0 else groups
                blocks.append(ShuffleV1Block(in_chs, width, 2 if i == 0 else 1, groups, first_groups))
                in_chs = width
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self._set_feature_info(widths)
        self._init_head(in_chs, global_pool)  # no _init_weights: the reference keeps PyTorch's default init


class ShuffleNetV2Cifar(_ShuffleNetCifar):
    """ShuffleNet V2 for 32x32 inputs (any size works: pooling is adaptive).

    Feature taps (``feature_info``) are the stage outputs ``layer1 .. layer3`` (CRD's ``f1 .. f3``) at reductions 2,
    4, 8. As in timm's own nets, the 1x1 head conv (``conv2``/``bn2``, 1024 channels) comes after the last tap:
    ``forward_features`` applies it, ``forward_intermediates`` returns it as the final map.
    """

    def __init__(
        self,
        widths: Sequence[int] = (116, 232, 464),
        depths: Sequence[int] = (3, 7, 3),
        head_chs: int = 1024,
        num_classes: int = 100,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__(num_classes, in_chans, drop_rate)
        self._build_stem(in_chans)
        in_chs = _STEM_CHANNELS
        for s, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            blocks: list[nn.Module] = [ShuffleV2DownBlock(in_chs, width)]
            blocks += [ShuffleV2Block(width) for _ in range(depth)]
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
            in_chs = width
        self.conv2 = nn.Conv2d(in_chs, head_chs, 1, bias=False)
        self.bn2, self.act2 = _bn_relu(head_chs)
        self._set_feature_info(widths)
        self._init_head(head_chs, global_pool)  # no _init_weights: the reference keeps PyTorch's default init

    def _neck(self) -> list[nn.Module]:
        return [self.conv2, self.bn2, self.act2]


def _cfg(**overrides: Any) -> dict[str, Any]:
    return cifar_pretrained_cfg(pool_size=(4, 4), classifier="linear", **overrides)  # total stride 8


default_cfgs = generate_default_cfgs(
    {
        "shufflenet_v1": _cfg(paper_ids="arXiv:1707.01083"),
        "shufflenet_v2": _cfg(paper_ids="arXiv:1807.11164"),
    }
)


@register_model
def shufflenet_v1(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """CIFAR ShuffleNet V1, g = 3, widths 240-480-960, 4-8-4 blocks (CRD's ``ShuffleV1``)."""
    return build_model_with_cfg(
        ShuffleNetV1Cifar, "shufflenet_v1", pretrained, feature_cfg={"out_indices": (0, 1, 2)}, **kwargs
    )


@register_model
def shufflenet_v2(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """CIFAR ShuffleNet V2 1x, widths 116-232-464 + 1024 head conv, 3-7-3 blocks (CRD's ``ShuffleV2``)."""
    return build_model_with_cfg(
        ShuffleNetV2Cifar, "shufflenet_v2", pretrained, feature_cfg={"out_indices": (0, 1, 2)}, **kwargs
    )
