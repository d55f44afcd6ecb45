"""What kdpipe's CIFAR nets share: the CIFAR-100 pretrained config, the 6n + k depth rule, one head base class.

``CifarNet`` holds the pooling + linear head and timm's model API (``get_classifier``, ``reset_classifier``,
``forward_features``, ``forward_head``, ``forward_intermediates``) once for every kdpipe CIFAR net (``CifarResNet``,
``CifarBottleneckResNet``, ``WideResNet``, ``VGGCifar``, ``MobileNetV2Cifar``, ``ShuffleNetV1Cifar``,
``ShuffleNetV2Cifar``). A subclass builds its trunk and says how it splits at its feature taps:

- ``_stem()``: the modules run before the first tap stage;
- ``_tap_stages()``: the modules run between consecutive taps, one list per ``feature_info`` entry, each list
  ending on the module that ``feature_info[i]["module"]`` names;
- ``_neck()``: the modules after the last tap that ``forward_features`` still applies (none for the ResNets).

The base class registers no module of its own and the classifier keeps the attribute name the subclass gives it
(``classifier_attr``), so parameter names stay those of the CRD checkpoints and published weights load unchanged.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from timm.layers import create_classifier
from timm.models._features import feature_take_indices
from torch import nn

__all__ = ["CIFAR100_MEAN", "CIFAR100_STD", "CifarNet", "blocks_per_stage", "cifar_pretrained_cfg"]

# Per-channel statistics of the CIFAR-100 training set (RGB, [0, 1] scale), as used by the CRD/mdistiller loaders.
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


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


def blocks_per_stage(depth: int, fixed_layers: int, family: str, examples: str) -> int:
    """Return n for a three-stage net of ``depth = 6n + fixed_layers`` layers (two convs per block, n >= 1).

    Raises ``ValueError`` naming ``family`` and the valid depths (``examples``) for any other depth.
    """
    if depth < 6 + fixed_layers or (depth - fixed_layers) % 6 != 0:
        raise ValueError(f"{family} depth must be 6n + {fixed_layers} with n >= 1 ({examples}, ...), got {depth}")
    return (depth - fixed_layers) // 6


def _run(modules: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for module in modules:
        x = module(x)
    return x


class CifarNet(nn.Module):
    """Base of the CIFAR classifiers: a trunk cut at its feature taps, global pooling, dropout and one linear layer.

    A subclass calls ``super().__init__(num_classes, in_chans, drop_rate)``, builds its trunk and
    ``feature_info``, then ``_init_head`` and ``_init_weights``, in that order: modules register in assignment
    order, which fixes the order of the state_dict and of the random draws that initialise it.
    """

    classifier_attr: ClassVar[str] = "fc"
    """Attribute that holds the classifier; its name is part of the checkpoint keys (``fc.weight``)."""

    feature_info: list[dict[str, Any]]
    """One ``{"num_chs", "reduction", "module"}`` entry per tap, in forward order (timm's format)."""

    def __init__(self, num_classes: int, in_chans: int, drop_rate: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate

    # --- what a subclass supplies ---------------------------------------------------------------------------------

    def _stem(self) -> list[nn.Module]:
        """Modules run before the first tap stage."""
        raise NotImplementedError

    def _tap_stages(self) -> list[list[nn.Module]]:
        """Modules run between consecutive taps: entry ``i`` ends on the module ``feature_info[i]`` names."""
        raise NotImplementedError

    def _neck(self) -> list[nn.Module]:
        """Modules after the last tap that ``forward_features`` still applies before pooling."""
        return []

    def _wrap_classifier(self, fc: nn.Module) -> nn.Module:
        """Return what ``classifier_attr`` holds for the head ``fc``; a subclass may nest it to match a layout."""
        return fc

    def _init_linear(self, linear: nn.Linear) -> None:
        """Initialise a Linear layer; the default keeps torch's own initialisation."""

    # --- construction ---------------------------------------------------------------------------------------------

    def _init_head(self, num_features: int, global_pool: str) -> None:
        """Create the pooling and classifier on ``num_features`` channels; call once the trunk is built."""
        self.num_features = self.head_hidden_size = num_features
        self._set_head(global_pool)

    def _set_head(self, global_pool: str) -> None:
        self.global_pool, fc = create_classifier(self.num_features, self.num_classes, pool_type=global_pool)
        setattr(self, self.classifier_attr, self._wrap_classifier(fc))

    def _init_weights(self) -> None:
        # He-normal (fan_out) convs and unit BN, as the CRD reference initialises its ResNets, WRNs, VGGs and
        # MobileNetV2; only the Linear layer's init differs between them (``_init_linear``). The ShuffleNets skip this
        # call: the reference keeps PyTorch's default init for them.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                self._init_linear(m)

    # --- timm's model API -----------------------------------------------------------------------------------------

    def get_classifier(self) -> nn.Module:
        """Return the classifier module (``nn.Identity``, possibly nested, once reset to 0 classes)."""
        classifier: nn.Module = getattr(self, self.classifier_attr)
        return classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a freshly initialised one for ``num_classes`` (0 removes it)."""
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self._set_head(global_pool)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the trunk and also return the taps selected by ``indices`` (timm semantics).

        ``indices``: None takes every ``feature_info`` entry, an int the last n, a list those positions. ``norm`` is
        accepted for timm compatibility and ignored: no tap has a separate norm to apply. Without ``stop_early``
        the returned map is what ``forward_features`` returns; with it, the last selected tap.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        stages = self._tap_stages()
        if stop_early:
            stages = stages[: max_index + 1]
        intermediates: list[torch.Tensor] = []
        x = _run(self._stem(), x)
        for i, stage in enumerate(stages):
            x = _run(stage, x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        if not stop_early:
            x = _run(self._neck(), x)
        return x, intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the trunk's final map, before pooling: (B, num_features, H', W')."""
        x = _run(self._stem(), x)
        for stage in self._tap_stages():
            x = _run(stage, x)
        return _run(self._neck(), x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool the feature map and classify it; ``pre_logits=True`` stops after pooling (and dropout)."""
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
