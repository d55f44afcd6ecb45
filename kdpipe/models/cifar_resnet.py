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

The CIFAR-100 pretrained config helpers live here too; ``wrn`` and ``mobilenetv2`` reuse them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import create_classifier
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

__all__ = ["CIFAR100_MEAN", "CIFAR100_STD", "BasicBlock", "CifarResNet", "cifar_pretrained_cfg"]

# Per-channel statistics of the CIFAR-100 training set (RGB, [0, 1] scale), as used by the CRD/mdistiller loaders.
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

_WIDTHS = (16, 16, 32, 64)  # stem, stage 1, stage 2, stage 3
_WIDTHS_X4 = (32, 64, 128, 256)  # CRD's "x4" variants
_STAGE_STRIDES = (1, 2, 2)


def cifar_pretrained_cfg(**overrides: Any) -> dict[str, Any]:
    """Return a timm pretrained config for a CIFAR-100 model with no published weight file.

    ``url`` stays empty: weights come from a local file (``pretrained_cfg_overlay=dict(file=...)``). ``first_conv``
    and ``classifier`` must name real modules, because timm uses them to adapt a checkpoint to another
    ``in_chans`` or ``num_classes`` when loading it.
    """
    cfg: dict[str, Any] = {
        "url": "",
        "num_classes": 100,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),  # final feature map of a 32x32 input
        "crop_pct": 1.0,  # CIFAR evaluation uses the full image, no centre crop
        "interpolation": "bilinear",
        "mean": CIFAR100_MEAN,
        "std": CIFAR100_STD,
        "first_conv": "conv1",
        "classifier": "fc",
        "paper_ids": "arXiv:1910.10699",
    }
    cfg.update(overrides)
    return cfg


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


class CifarResNet(nn.Module):
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
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1 (8, 14, 20, ...), got {depth}")
        num_blocks = (depth - 2) // 6
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate

        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = nn.ReLU(inplace=True)
        self.layer1 = _make_stage(widths[0], widths[1], num_blocks, _STAGE_STRIDES[0])
        self.layer2 = _make_stage(widths[1], widths[2], num_blocks, _STAGE_STRIDES[1])
        self.layer3 = _make_stage(widths[2], widths[3], num_blocks, _STAGE_STRIDES[2])

        self.feature_info: list[dict[str, Any]] = []
        reduction = 1
        for i, stride in enumerate(_STAGE_STRIDES):
            reduction *= stride
            self.feature_info.append({"num_chs": widths[i + 1], "reduction": reduction, "module": f"layer{i + 1}"})

        self.num_features = self.head_hidden_size = widths[3]
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self._init_weights()

    def _init_weights(self) -> None:
        # He-normal (fan_out) convs and unit BN, as the CRD reference trains them; Linear keeps torch's default.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        """Return the final linear layer (``nn.Identity`` once reset to 0 classes)."""
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a freshly initialised one for ``num_classes`` (0 removes it)."""
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the trunk and also return the stage outputs selected by ``indices`` (timm semantics).

        ``indices``: None takes every ``feature_info`` entry, an int the last n, a list those positions. ``norm`` is
        accepted for timm compatibility; these stages have no separate norm to apply.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        intermediates: list[torch.Tensor] = []
        x = self.act1(self.bn1(self.conv1(x)))
        stages = [self.layer1, self.layer2, self.layer3]
        if stop_early:
            stages = stages[: max_index + 1]
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the last stage's map, before pooling: (B, num_features, H/4, W/4)."""
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        return self.layer3(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the feature map and classify it; ``pre_logits=True`` stops after pooling (and dropout)."""
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


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
