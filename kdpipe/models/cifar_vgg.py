"""CIFAR VGGs with BatchNorm as the knowledge-distillation literature uses them, registered into timm's registry.

Architecture (Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition", ICLR
2015, arXiv:1409.1556), as cut down for 32x32 inputs by CRD (Tian et al., "Contrastive Representation
Distillation", ICLR 2020, arXiv:1910.10699) and used since by the KD benchmarks (RepDistiller, mdistiller), whose
``vgg13`` -> ``vgg8`` pair is one of the standard CIFAR-100 rows:

- five conv blocks; each conv is 3x3, padding 1, *with* a bias, followed by BN, and by ReLU except the block's
  last conv: the block ends on its BN, and a separate ReLU (the feature tap) follows the block;
- widths per block (CRD's configurations): ``vgg8`` "S" = 64 | 128 | 256 | 512 | 512, ``vgg11`` "A" =
  64 | 128 | 256x2 | 512x2 | 512x2, ``vgg13`` "B" = 64x2 | 128x2 | 256x2 | 512x2 | 512x2, ``vgg16`` "D" =
  64x2 | 128x2 | 256x3 | 512x3 | 512x3, ``vgg19`` "E" = 64x2 | 128x2 | 256x4 | 512x4 | 512x4;
- a 2x2 max-pool after blocks 0, 1 and 2 only. The CRD code pools between blocks 3 and 4 only for 64x64 inputs;
  on CIFAR's 32x32 both run at 4x4, so the total stride is 8. The ImageNet VGG's three FC layers are gone: global
  average pooling (CRD's ``AdaptiveAvgPool2d(1)``) feeds one ``Linear(512, num_classes)``.

This gives 3.97M (3,965,028) parameters for ``vgg8`` and 9.46M for ``vgg13`` with a 100-class head, the 3.96M
and 9.46M the KD tables quote. The names carry a ``_cifar`` suffix because timm already registers ``vgg11`` ...
``vgg19`` (its ImageNet VGGs, with and without ``_bn``); registering ours under those names would silently replace
timm's. ``vgg8_cifar`` takes the suffix too, so the family reads the same.

Parameter names follow the CRD layout (``blockB.I.{weight,bias}`` for conv I and its BN inside block B,
``classifier``), so checkpoints trained with the CRD/mdistiller code load unchanged. The head and timm's model API
come from ``CifarNet`` (``_base``); this file supplies the trunk and its taps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from kdpipe.models._base import CifarNet, cifar_pretrained_cfg

__all__ = ["VGGCifar", "make_vgg_block"]

# Conv widths per block; the letters are CRD's (and the VGG paper's, minus its FC layers) configuration names.
_CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8_cifar": ((64,), (128,), (256,), (512,), (512,)),  # "S"
    "vgg11_cifar": ((64,), (128,), (256, 256), (512, 512), (512, 512)),  # "A"
    "vgg13_cifar": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),  # "B"
    "vgg16_cifar": ((64, 64), (128, 128), (256,) * 3, (512,) * 3, (512,) * 3),  # "D"
    "vgg19_cifar": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),  # "E"
}
_NUM_BLOCKS = 5
_NUM_POOLS = 3  # max-pools after blocks 0..2; none between blocks 3 and 4 at CIFAR resolution


def make_vgg_block(in_chs: int, widths: Sequence[int]) -> nn.Sequential:
    """Conv-BN-ReLU per width, minus the last ReLU: ``[conv, bn, relu, conv, bn, ..., conv, bn]``.

    The indices inside the Sequential (conv at 0, 3, 6, ...; BN at 1, 4, 7, ...) are the reference parameter names.
    """
    layers: list[nn.Module] = []
    for i, width in enumerate(widths):
        if i > 0:
            layers.append(nn.ReLU(inplace=True))
        layers += [nn.Conv2d(in_chs, width, 3, padding=1), nn.BatchNorm2d(width)]
        in_chs = width
    return nn.Sequential(*layers)


class VGGCifar(CifarNet):
    """VGG with BatchNorm for 32x32 inputs (any size works: pooling is adaptive).

    Feature taps (``feature_info``) are ``act0 .. act4``, the ReLU after each block, at reductions 1, 2, 4, 8, 8:
    CRD's ``f0 .. f4``. The block itself (``block0 .. block4``) outputs the pre-activation map (CRD's ``f*_pre``,
    what OFD-style methods read), and the tap ReLUs are not in-place, so a hook on a block keeps that map intact.
    """

    # A bare Linear named ``classifier``: the reference name ``classifier.weight``.
    classifier_attr = "classifier"

    def __init__(
        self,
        widths: Sequence[Sequence[int]],
        num_classes: int = 100,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        if len(widths) != _NUM_BLOCKS or not all(widths):
            raise ValueError(f"a CIFAR VGG has {_NUM_BLOCKS} non-empty blocks of conv widths, got {widths!r}")
        super().__init__(num_classes, in_chans, drop_rate)

        # Registered in forward order (block, tap ReLU, pool): timm's feature wrapper runs the children in this order.
        self.feature_info = []
        self._stage_names: list[list[str]] = []
        in_chs, reduction, stage = in_chans, 1, []
        for b, block_widths in enumerate(widths):
            setattr(self, f"block{b}", make_vgg_block(in_chs, block_widths))
            setattr(self, f"act{b}", nn.ReLU())
            stage += [f"block{b}", f"act{b}"]
            in_chs = block_widths[-1]
            self.feature_info.append({"num_chs": in_chs, "reduction": reduction, "module": f"act{b}"})
            self._stage_names.append(stage)
            stage = []
            if b < _NUM_POOLS:
                setattr(self, f"pool{b}", nn.MaxPool2d(2, 2))
                stage = [f"pool{b}"]  # the pool opens the next tap stage
                reduction *= 2

        self._init_head(in_chs, global_pool)
        self._init_weights()

    def _init_weights(self) -> None:
        # He-normal (fan_out) convs and unit BN as in the base class, plus zero conv biases, as in the reference.
        super()._init_weights()
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def _init_linear(self, linear: nn.Linear) -> None:
        # N(0, 0.01) weight and zero bias, as in the reference training code.
        nn.init.normal_(linear.weight, 0.0, 0.01)
        nn.init.zeros_(linear.bias)

    def _stem(self) -> list[nn.Module]:
        return []  # the first block is the first tap stage

    def _tap_stages(self) -> list[list[nn.Module]]:
        return [[self.get_submodule(name) for name in stage] for stage in self._stage_names]


def _create(variant: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    return build_model_with_cfg(
        VGGCifar,
        variant,
        pretrained,
        widths=_CONFIGS[variant],
        feature_cfg={"out_indices": (0, 1, 2, 3, 4)},
        **kwargs,
    )


default_cfgs = generate_default_cfgs(
    {
        name: cifar_pretrained_cfg(
            pool_size=(4, 4),  # total stride 8
            first_conv="block0.0",
            classifier="classifier",
        )
        for name in _CONFIGS
    }
)


@register_model
def vgg8_cifar(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """CIFAR VGG-8 with BN (CRD's ``vgg8``, configuration "S"): one conv per block (the usual student of vgg13)."""
    return _create("vgg8_cifar", pretrained, **kwargs)


@register_model
def vgg11_cifar(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """CIFAR VGG-11 with BN (CRD's ``vgg11``, configuration "A"): convs per block 1-1-2-2-2."""
    return _create("vgg11_cifar", pretrained, **kwargs)


@register_model
def vgg13_cifar(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """CIFAR VGG-13 with BN (CRD's ``vgg13``, configuration "B"): two convs per block (the usual VGG teacher)."""
    return _create("vgg13_cifar", pretrained, **kwargs)


@register_model
def vgg16_cifar(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """CIFAR VGG-16 with BN (CRD's ``vgg16``, configuration "D"): convs per block 2-2-3-3-3."""
    return _create("vgg16_cifar", pretrained, **kwargs)


@register_model
def vgg19_cifar(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """CIFAR VGG-19 with BN (CRD's ``vgg19``, configuration "E"): convs per block 2-2-4-4-4."""
    return _create("vgg19_cifar", pretrained, **kwargs)
