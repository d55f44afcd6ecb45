"""Wide ResNets for CIFAR as the knowledge-distillation literature uses them, registered into timm's model registry.

Architecture (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016, arXiv:1605.07146): WRN-d-k is a
pre-activation ResNet with a 3x3 stem conv to 16 channels, three stages of n = (d - 4) / 6 blocks at widths
16k, 32k, 64k and strides 1, 2, 2, then a final BN-ReLU, global average pooling and one linear layer. Each block
is BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3; a block that changes width or stride projects the shortcut with a
1x1 conv applied to the *pre-activated* input, as in the reference code. Dropout inside blocks is 0 in the KD
protocol (CRD, arXiv:1910.10699), which trains ``wrn_40_2`` as a teacher and ``wrn_16_2`` / ``wrn_40_1`` as students;
``wrn_16_8`` (11.0M parameters) is the wide teacher of online KD, e.g. SwitOKD's (Qi et al., ECCV 2022) WRN-16-8 /
WRN-16-1 pair.

Parameter names follow the CRD layout (``conv1``, ``blockN.layer.M.{bn1,conv1,bn2,conv2,convShortcut}``, ``bn1``,
``fc``) so the teacher checkpoints published with CRD/mdistiller load into these models unchanged. The head and
timm's model API come from ``CifarNet`` (``_base``); this file supplies the trunk and its taps.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from kdpipe.models._base import CifarNet, blocks_per_stage, cifar_pretrained_cfg

__all__ = ["WideBasicBlock", "WideResNet"]

_STAGE_STRIDES = (1, 2, 2)


class WideBasicBlock(nn.Module):
    """Pre-activation block: ``conv(relu(bn(conv(relu(bn(x)))))) + shortcut``."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.drop_rate = drop_rate
        # camelCase on purpose: it is the parameter name in the published checkpoints.
        self.convShortcut: nn.Module | None = None
        if stride != 1 or in_chs != out_chs:
            self.convShortcut = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        # A projection reads the pre-activated input; an identity shortcut carries the raw input.
        shortcut = x if self.convShortcut is None else self.convShortcut(pre)
        out = self.relu2(self.bn2(self.conv1(pre)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.conv2(out) + shortcut


def _make_stage(in_chs: int, out_chs: int, num_blocks: int, stride: int, drop_rate: float) -> nn.Sequential:
    blocks = [
        WideBasicBlock(in_chs if i == 0 else out_chs, out_chs, stride if i == 0 else 1, drop_rate)
        for i in range(num_blocks)
    ]
    # The extra ``layer`` level reproduces the reference parameter names (``block1.layer.0.conv1.weight``).
    return nn.Sequential(OrderedDict(layer=nn.Sequential(*blocks)))


class WideResNet(CifarNet):
    """WRN-depth-widen for 32x32 inputs (any size works: pooling is adaptive).

    Feature taps (``feature_info``) are ``block1``, ``block2`` (raw pre-activation stage outputs, reductions 1 and 2)
    and ``act1``: the final BN-ReLU after ``block3`` (reduction 4). The last tap is the normalised map the head
    pools, which is what feature-based KD methods read from a WRN, not the raw ``block3`` sum.
    """

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int = 100,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        block_drop_rate: float = 0.0,
    ) -> None:
        # The paper's depth convention, 6n + 4; checked before anything is built.
        num_blocks = blocks_per_stage(depth, 4, "WRN", "10, 16, 22, 28, 40")
        super().__init__(num_classes, in_chans, drop_rate)
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)

        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.block1 = _make_stage(widths[0], widths[1], num_blocks, _STAGE_STRIDES[0], block_drop_rate)
        self.block2 = _make_stage(widths[1], widths[2], num_blocks, _STAGE_STRIDES[1], block_drop_rate)
        self.block3 = _make_stage(widths[2], widths[3], num_blocks, _STAGE_STRIDES[2], block_drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.act1 = nn.ReLU(inplace=True)

        self.feature_info = [
            {"num_chs": widths[1], "reduction": 1, "module": "block1"},
            {"num_chs": widths[2], "reduction": 2, "module": "block2"},
            {"num_chs": widths[3], "reduction": 4, "module": "act1"},
        ]
        self._init_head(widths[3], global_pool)
        self._init_weights()

    def _init_linear(self, linear: nn.Linear) -> None:
        # A zero classifier bias, as in the reference training code; the weight keeps torch's default.
        nn.init.zeros_(linear.bias)

    def _stem(self) -> list[nn.Module]:
        return [self.conv1]

    def _tap_stages(self) -> list[list[nn.Module]]:
        # The last stage ends with the final norm and activation: its tap is the normalised map.
        return [[self.block1], [self.block2], [self.block3, self.bn1, self.act1]]


def _create(variant: str, pretrained: bool, depth: int, widen_factor: int, **kwargs: Any) -> nn.Module:
    return build_model_with_cfg(
        WideResNet,
        variant,
        pretrained,
        depth=depth,
        widen_factor=widen_factor,
        feature_cfg={"out_indices": (0, 1, 2)},  # three taps, not timm's default five
        **kwargs,
    )


default_cfgs = generate_default_cfgs(
    {
        name: cifar_pretrained_cfg(paper_ids="arXiv:1605.07146")
        for name in ("wrn_16_1", "wrn_16_2", "wrn_16_8", "wrn_40_1", "wrn_40_2")
    }
)


@register_model
def wrn_16_1(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """WRN-16-1: 2 blocks per stage, widths 16-32-64."""
    return _create("wrn_16_1", pretrained, 16, 1, **kwargs)


@register_model
def wrn_16_2(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """WRN-16-2: 2 blocks per stage, widths 32-64-128."""
    return _create("wrn_16_2", pretrained, 16, 2, **kwargs)


@register_model
def wrn_16_8(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """WRN-16-8: 2 blocks per stage, widths 128-256-512 (a wide teacher, e.g. SwitOKD's WRN-16-8 / WRN-16-1)."""
    return _create("wrn_16_8", pretrained, 16, 8, **kwargs)


@register_model
def wrn_40_1(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """WRN-40-1: 6 blocks per stage, widths 16-32-64."""
    return _create("wrn_40_1", pretrained, 40, 1, **kwargs)


@register_model
def wrn_40_2(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """WRN-40-2: 6 blocks per stage, widths 32-64-128 (the usual CIFAR-100 WRN teacher)."""
    return _create("wrn_40_2", pretrained, 40, 2, **kwargs)
