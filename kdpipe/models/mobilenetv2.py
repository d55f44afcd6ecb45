"""CIFAR MobileNetV2 at width 0.5 (CRD's ``mobile_half``), registered into timm as ``mobilenetv2_x0_5_cifar``.

Architecture (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018,
arXiv:1801.04381), as adapted for 32x32 inputs by CRD (Tian et al., ICLR 2020, arXiv:1910.10699) and used as a
student by the KD benchmarks since:

- stem: 3x3 conv, stride 2, to 32w channels, BN, ReLU;
- seven groups of inverted residual blocks (t = expansion, c = channels before width scaling, n = blocks,
  s = stride of the first block): (1, 16, 1, 1), (T, 24, 2, 1), (T, 32, 3, 2), (T, 64, 4, 2), (T, 96, 3, 1),
  (T, 160, 3, 2), (T, 320, 1, 1) with T = 6. The 32x32 adaptation is the second group's stride, 1 instead of
  ImageNet's 2, so the total stride is 16 and a CIFAR image ends on a 2x2 map;
- a 1x1 conv to 1280 channels (kept at 1280 for width <= 1), BN, ReLU, global average pooling, one linear layer.

Two details differ from torchvision's MobileNetV2 and matter for parameter counts and checkpoint compatibility:
every block, including the t = 1 one, starts with a 1x1 "expansion" conv, and activations are ReLU, not ReLU6.
Width 0.5 gives channels 16 (stem), 8, 12, 16, 32, 48, 80, 160 and 1280 at the head: 0.81M parameters with a
100-class head, the figure the KD papers quote for "0.5MobileNetV2".

Parameter names follow the CRD layout (``conv1.{0,1}``, ``blocks.G.B.conv.{0..7}``, ``conv2.{0,1}``,
``classifier.0``) so checkpoints trained with the CRD/mdistiller code load unchanged. The head and timm's model
API come from ``CifarNet`` (``_base``); this file supplies the trunk and its taps.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from kdpipe.models._base import CifarNet, cifar_pretrained_cfg

__all__ = ["InvertedResidual", "MobileNetV2Cifar"]

# (expansion, channels at width 1, blocks, first stride); None marks "use the model's expand_ratio".
_BLOCK_SETTINGS: tuple[tuple[int | None, int, int, int], ...] = (
    (1, 16, 1, 1),
    (None, 24, 2, 1),  # ImageNet MobileNetV2 has stride 2 here; CIFAR keeps the 16x16 map
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
)
# Block groups whose output is a feature tap: the last group at each resolution (reductions 2, 4, 8, 16).
_TAP_GROUPS = (1, 2, 4, 6)
_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280


def _conv_bn_relu(in_chs: int, out_chs: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_chs),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> 1x1 linear projection, with an identity shortcut when shapes allow."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_chs * expand_ratio
        self.use_res_connect = stride == 1 and in_chs == out_chs
        self.conv = nn.Sequential(
            nn.Conv2d(in_chs, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_chs, 1, bias=False),
            nn.BatchNorm2d(out_chs),  # no activation: the "linear bottleneck"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2Cifar(CifarNet):
    """MobileNetV2 for 32x32 inputs (any size works: pooling is adaptive).

    Feature taps (``feature_info``) are the outputs of block groups 1, 2, 4 and 6 at reductions 2, 4, 8, 16, the
    stage outputs CRD's feature-based methods read. As in timm's MobileNetV2, the last tap is the final block, not
    the 1280-channel head conv that ``forward_features`` also applies.
    """

    # A one-layer Sequential named ``classifier`` keeps the reference name ``classifier.0.weight``.
    classifier_attr = "classifier"

    def __init__(
        self,
        width_mult: float = 0.5,
        expand_ratio: int = 6,
        num_classes: int = 100,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__(num_classes, in_chans, drop_rate)

        in_chs = int(_STEM_CHANNELS * width_mult)
        self.conv1 = _conv_bn_relu(in_chans, in_chs, 3, stride=2)
        groups: list[nn.Sequential] = []
        self.feature_info = []
        reduction = 2  # the stem's stride
        for g, (t, c, n, s) in enumerate(_BLOCK_SETTINGS):
            out_chs = int(c * width_mult)
            blocks = []
            for i in range(n):
                blocks.append(InvertedResidual(in_chs, out_chs, s if i == 0 else 1, expand_ratio if t is None else t))
                in_chs = out_chs
            groups.append(nn.Sequential(*blocks))
            reduction *= s
            if g in _TAP_GROUPS:
                self.feature_info.append({"num_chs": out_chs, "reduction": reduction, "module": f"blocks.{g}"})
        # Sequential rather than ModuleList so timm's feature wrapper can run it (and the names stay ``blocks.G``).
        self.blocks = nn.Sequential(*groups)

        # Wider-than-1 nets grow the head to a multiple of 8; narrower ones keep 1280 (MobileNetV2 paper, §4).
        head_chs = math.ceil(_HEAD_CHANNELS * width_mult / 8) * 8 if width_mult > 1.0 else _HEAD_CHANNELS
        self.conv2 = _conv_bn_relu(in_chs, head_chs, 1)
        self._init_head(head_chs, global_pool)
        self._init_weights()

    def _wrap_classifier(self, fc: nn.Module) -> nn.Module:
        return nn.Sequential(fc)

    def _init_linear(self, linear: nn.Linear) -> None:
        # N(0, 0.01) weight and zero bias, as in the reference training code.
        nn.init.normal_(linear.weight, 0.0, 0.01)
        nn.init.zeros_(linear.bias)

    def _stem(self) -> list[nn.Module]:
        return [self.conv1]

    def _tap_stages(self) -> list[list[nn.Module]]:
        # Each tap stage runs the groups after the previous tap up to and including its own tap group.
        groups = list(self.blocks)
        starts = (0, *(g + 1 for g in _TAP_GROUPS[:-1]))
        return [groups[start : end + 1] for start, end in zip(starts, _TAP_GROUPS, strict=True)]

    def _neck(self) -> list[nn.Module]:
        # Any groups after the last tap (none with these settings), then the head conv.
        return [*list(self.blocks)[_TAP_GROUPS[-1] + 1 :], self.conv2]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the head conv's map, before pooling: (B, 1280, H/16, W/16)."""
        # Same modules as the base class's stage-by-stage walk, but ``blocks`` runs as one module, as it always
        # has, so a forward hook on ``blocks`` itself still fires.
        return self.conv2(self.blocks(self.conv1(x)))


default_cfgs = generate_default_cfgs(
    {
        "mobilenetv2_x0_5_cifar": cifar_pretrained_cfg(
            pool_size=(2, 2),  # total stride 16
            first_conv="conv1.0",
            classifier="classifier.0",
        )
    }
)


@register_model
def mobilenetv2_x0_5_cifar(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """CIFAR MobileNetV2, width 0.5, expansion 6 (CRD's ``mobile_half``)."""
    return build_model_with_cfg(
        MobileNetV2Cifar,
        "mobilenetv2_x0_5_cifar",
        pretrained,
        width_mult=0.5,
        expand_ratio=6,
        # Taps sit one Sequential deep (``blocks.G``): timm's wrapper must flatten ``blocks`` to reach them.
        feature_cfg={"out_indices": (0, 1, 2, 3), "flatten_sequential": True},
        **kwargs,
    )
