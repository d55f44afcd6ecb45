"""Feature taps: forward hooks on a model's stage outputs, found from timm's ``feature_info``.

A feature-based KD method asks for stages by position ("all", "last", the last n, or explicit indices) instead of
module names, so the same method runs on any timm backbone and on the CIFAR nets kdpipe registers:

    specs = select_stages(stage_specs(teacher), "all")
    with Taps(teacher, specs) as taps:
        logits, maps = taps.forward(images)      # maps: one (B, C, H, W) tensor per spec, in forward order

What it covers:

- ``stage_specs``: ``model.feature_info`` (timm's ``FeatureInfo`` or a list of dicts) to :class:`TapSpec` (index,
  module name, channels, reduction). The stem-level tap of ImageNet CNNs (``act1`` of a ResNet, the stride-2 first
  level of the 5-level pyramid) is flagged ``stem`` so "stages" can leave it out.
- Token outputs of ViT blocks (``B, N, C``) become maps: prefix tokens (class, register) dropped, the patch grid
  taken from ``patch_embed`` or, if that does not fit, from a square token count. NHWC stage outputs (models whose
  ``output_fmt`` is NHWC) are permuted to NCHW.
- ``pair_stages``: which teacher tap goes with which student tap when the two have different stage counts: by equal
  reduction when every tap of the shorter list finds one, otherwise by relative depth.
- ``ConvAdapter`` and ``resize_to``: the 1x1 conv + BN channel adapter and the spatial alignment (bilinear up,
  adaptive average pooling down by >= 2) that methods own for mismatched pairs.

Hooks record only inside :meth:`Taps.forward`, so a tapped model evaluated or exported elsewhere keeps no tensors.
The recorded tensors are the modules' own outputs (no copies): a later in-place op on a tap output would alter
them, and none of timm's stage boundaries nor kdpipe's nets do that.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ConvAdapter",
    "StageSelector",
    "TapError",
    "TapSpec",
    "Taps",
    "pair_stages",
    "resize_to",
    "select_stages",
    "stage_specs",
    "to_map",
]

StageSelector = Literal["all", "stages", "last"] | int | Sequence[int]
"""Which taps: "all" (every feature_info entry), "stages" (all but a stem-level tap), "last", an int n (the last n
stages, stem excluded), or explicit indices into feature_info (negative counts from the end)."""


class TapError(ValueError):
    """A model has no usable feature_info, or a selection/pairing asks for taps that do not exist."""


@dataclass(frozen=True)
class TapSpec:
    index: int
    """Position in the model's feature_info."""
    module: str
    """Dotted name of the hooked module (``layer3``, ``blocks.4``, ``stages.2``)."""
    channels: int
    reduction: int
    """Stride of the tap's map relative to the input."""
    stem: bool = False
    """True for the stride-2 stem level of a 5-level ImageNet pyramid (ResNet ``act1``, EfficientNet ``blocks.0``)."""


def stage_specs(model: nn.Module) -> list[TapSpec]:
    """The model's taps from timm's ``feature_info``, in forward order."""
    info: Any = getattr(model, "feature_info", None)
    if info is None:
        raise TapError(
            f"{type(model).__name__} has no feature_info: feature taps need a timm model "
            "(or a kdpipe CIFAR net) that lists its stage outputs"
        )
    entries = list(info.info) if hasattr(info, "info") else list(info)
    if not entries:
        raise TapError(f"{type(model).__name__}.feature_info is empty")
    names = {name for name, _ in model.named_modules()}
    specs = []
    for i, entry in enumerate(entries):
        module = str(entry["module"])
        if module not in names:
            # Some timm families store the name with underscores where the module path has dots.
            dotted = module.replace("_", ".")
            if dotted not in names:
                raise TapError(
                    f"{type(model).__name__}.feature_info[{i}] names module {module!r}, which is not in the model"
                )
            module = dotted
        specs.append(TapSpec(i, module, int(entry["num_chs"]), int(entry["reduction"])))
    # A stride-2 first level in a pyramid of five or more is the stem, not a stage.
    if len(specs) >= 5 and specs[0].reduction == 2 and specs[1].reduction > 2:
        first = specs[0]
        specs[0] = TapSpec(first.index, first.module, first.channels, first.reduction, stem=True)
    return specs


def select_stages(specs: Sequence[TapSpec], which: StageSelector = "stages") -> list[TapSpec]:
    """Pick taps from ``specs`` (see :data:`StageSelector`)."""
    stages = [s for s in specs if not s.stem]
    if which == "all":
        return list(specs)
    if which == "stages":
        return stages
    if which == "last":
        return stages[-1:]
    if isinstance(which, bool):
        raise TapError(f"stage selector {which!r} is not a count; use 'all', 'stages', 'last', a count or indices")
    if isinstance(which, int):
        if not 1 <= which <= len(stages):
            raise TapError(f"asked for the last {which} stages of a model with {len(stages)}")
        return stages[-which:]
    if isinstance(which, str):
        raise TapError(f"unknown stage selector {which!r}; use 'all', 'stages', 'last', a count or indices")
    picked = []
    for index in which:
        if not -len(specs) <= index < len(specs):
            raise TapError(f"tap index {index} is out of range for a model with {len(specs)} taps")
        picked.append(specs[index])
    return sorted(set(picked), key=lambda s: s.index)


def pair_stages(teacher: Sequence[TapSpec], student: Sequence[TapSpec]) -> list[tuple[TapSpec, TapSpec]]:
    """(teacher, student) tap pairs: positional for equal counts; else by equal reduction if every tap of the shorter
    side finds a partner with its reduction; else by relative depth (the shorter side's i-th of k taps goes with the
    longer side's tap at depth (i + 1)/k)."""
    if not teacher or not student:
        raise TapError("stage pairing needs at least one teacher tap and one student tap")
    if len(teacher) == len(student):
        return list(zip(teacher, student, strict=True))
    short, long, short_is_teacher = (
        (teacher, student, True) if len(teacher) < len(student) else (student, teacher, False)
    )
    by_reduction = {s.reduction: s for s in long}  # the last tap of each reduction: the stage output
    if all(s.reduction in by_reduction for s in short):
        partners = [by_reduction[s.reduction] for s in short]
    else:
        k, n = len(short), len(long)
        partners = [long[max(0, round((i + 1) * n / k) - 1)] for i in range(k)]
    return [(s, p) if short_is_teacher else (p, s) for s, p in zip(short, partners, strict=True)]


def to_map(x: Tensor, model: nn.Module, input_hw: tuple[int, int] | None = None) -> Tensor:
    """A tap output as a (B, C, H, W) map: tokens reshaped to their patch grid, NHWC permuted."""
    if x.ndim == 4:
        if getattr(model, "output_fmt", "NCHW") == "NHWC":
            return x.permute(0, 3, 1, 2)
        return x
    if x.ndim != 3:
        raise TapError(f"cannot turn a tap output of shape {tuple(x.shape)} into a feature map")
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    tokens = x[:, prefix:]
    n = tokens.shape[1]
    grid: tuple[int, int] | None = None
    embed = getattr(model, "patch_embed", None)
    if embed is not None:
        if input_hw is not None and hasattr(embed, "dynamic_feat_size"):
            h, w = embed.dynamic_feat_size(input_hw)
            grid = (int(h), int(w))
        elif getattr(embed, "grid_size", None) is not None:
            h, w = embed.grid_size
            grid = (int(h), int(w))
    if grid is None or grid[0] * grid[1] != n:
        side = math.isqrt(n)
        if side * side != n:
            raise TapError(f"{n} tokens are not a square patch grid and the model gives no grid size")
        grid = (side, side)
    return tokens.transpose(1, 2).reshape(x.shape[0], x.shape[2], grid[0], grid[1])


class Taps:
    """Forward hooks on ``specs`` of ``model``; :meth:`forward` returns the output and the tapped maps.

    Use as a context manager or call :meth:`close` to remove the hooks. Hooks record only during :meth:`forward`.
    """

    def __init__(self, model: nn.Module, specs: Sequence[TapSpec]) -> None:
        if not specs:
            raise TapError("Taps needs at least one tap")
        self.model = model
        self.specs = list(specs)
        self._recording = False
        self._outputs: dict[int, Tensor] = {}
        self._handles = []
        for pos, spec in enumerate(self.specs):
            try:
                module = model.get_submodule(spec.module)
            except AttributeError:
                raise TapError(f"{type(model).__name__} has no module {spec.module!r} to tap") from None
            self._handles.append(module.register_forward_hook(self._hook(pos)))

    def _hook(self, pos: int) -> Any:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            if self._recording:
                self._outputs[pos] = output[0] if isinstance(output, (tuple, list)) else output

        return record

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Run the model on ``x``; return its output and one (B, C, H, W) map per tap, in spec order."""
        self._outputs.clear()
        self._recording = True
        try:
            out = self.model(x)
        finally:
            self._recording = False
        missing = [self.specs[i].module for i in range(len(self.specs)) if i not in self._outputs]
        if missing:
            raise TapError(f"the forward pass of {type(self.model).__name__} never ran the tapped module(s) {missing}")
        hw = (int(x.shape[-2]), int(x.shape[-1]))
        maps = [to_map(self._outputs[i], self.model, hw) for i in range(len(self.specs))]
        self._outputs.clear()
        return out, maps

    __call__ = forward

    def shapes(self, input_shape: Sequence[int], device: torch.device | str = "cpu") -> list[tuple[int, int, int]]:
        """(C, H, W) of every tap for one input of ``input_shape`` (C, H, W), from a no-grad eval forward."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                _, maps = self.forward(torch.zeros(1, *input_shape, device=device))
        finally:
            self.model.train(was_training)
        return [(int(m.shape[1]), int(m.shape[2]), int(m.shape[3])) for m in maps]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> Taps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resize_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """``x`` resized to ``size`` (H, W): adaptive average pooling when shrinking by 2 or more, else bilinear."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if (h, w) == tuple(size):
        return x
    if h >= 2 * size[0] and w >= 2 * size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ConvAdapter(nn.Sequential):
    """1x1 conv + BatchNorm from ``in_chs`` to ``out_chs`` channels (the FitNet/ReviewKD student-side adapter)."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__(nn.Conv2d(in_chs, out_chs, 1, bias=False), nn.BatchNorm2d(out_chs))
