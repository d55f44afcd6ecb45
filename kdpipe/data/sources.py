"""Dataset kinds: what each ``data.kind`` loads, and the uint8 resize they share.

Each kind lives in its own module with one ``load_*`` function returning a ``SourceData`` (train and test at the
target size). The modules are imported on first use, so ``import kdpipe.data`` does not pull in scikit-learn or
torchvision's dataset code, and kinds whose decoding is slow go through the tensor cache.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kdpipe.config import DataConfig
from kdpipe.data import cache
from kdpipe.errors import ConfigError
from kdpipe.registry import suggest

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class SourceData:
    """What a kind yields: uint8 ``(N, C, S, S)`` images and int64 labels for train and test, and class names."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    name: str
    """Human-readable origin for logs, e.g. ``cifar10:/data/cifar``."""

    def to_payload(self) -> dict[str, object]:
        """The tensors and class names as a dict that ``torch.load(weights_only=True)`` can read back."""
        return {
            "train_images": self.train_images,
            "train_labels": self.train_labels,
            "test_images": self.test_images,
            "test_labels": self.test_labels,
            "classes": list(self.classes),
        }

    @classmethod
    def from_payload(cls, payload: dict[str, object], name: str) -> SourceData:
        """Inverse of ``to_payload``; raises KeyError/TypeError on a malformed payload (the cache then rebuilds)."""
        tensors = {k: payload[k] for k in ("train_images", "train_labels", "test_images", "test_labels")}
        for key, value in tensors.items():
            want = torch.uint8 if key.endswith("images") else torch.int64
            if not isinstance(value, torch.Tensor) or value.dtype != want:
                raise TypeError(f"{key} is not a {want} tensor")
        classes = payload["classes"]
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise TypeError("classes is not a list of str")
        return cls(**tensors, classes=classes, name=name)  # type: ignore[arg-type]


# Side length used when data.image_size is unset; None means "the images' own size".
DEFAULT_IMAGE_SIZE: dict[str, int | None] = {
    "digits": 16,
    "synthetic": 16,
    "cifar10": None,
    "cifar100": None,
    "imagefolder": None,
}


def resize_uint8(images: torch.Tensor, size: int, *, chunk: int = 4096) -> torch.Tensor:
    """Resize uint8 ``(N, C, H, W)`` images to ``(N, C, size, size)`` with antialiased bilinear interpolation.

    Works in float32 chunks of ``chunk`` images so a 50k-image split does not need a 600 MB float copy; the result
    is rounded back to uint8 so every kind is cached and augmented in the same format.
    """
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], chunk):
        part = images[start : start + chunk].float()
        resized = F.interpolate(part, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + chunk] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


# kind -> "module:function"; each function takes (cfg, root, image_size, cache_dir) and returns SourceData.
# Kinds whose decode is slow (imagefolder) use the cache themselves, keyed by what only they can cheaply list.
_LOADERS: dict[str, str] = {
    "digits": "kdpipe.data.digits:load_digits_source",
    "cifar10": "kdpipe.data.cifar:load_cifar_source",
    "cifar100": "kdpipe.data.cifar:load_cifar_source",
    "imagefolder": "kdpipe.data.imagefolder:load_imagefolder_source",
    "synthetic": "kdpipe.data.synthetic:load_synthetic_source",
}

SourceLoader = Callable[[DataConfig, Path | None, int | None, Path], SourceData]


def list_kinds() -> list[str]:
    """The dataset kinds this package can load."""
    return sorted(_LOADERS)


def get_source_loader(kind: str) -> SourceLoader:
    """The ``load_*`` function of ``kind`` (imported on first use)."""
    if kind not in _LOADERS:
        raise ConfigError(f"unknown data.kind {kind!r}{suggest(kind, list_kinds())}; choose one of: {list_kinds()}")
    module_name, func_name = _LOADERS[kind].split(":")
    loader: SourceLoader = getattr(importlib.import_module(module_name), func_name)
    return loader


def load_source(cfg: DataConfig, root: Path | None, *, cache_dir: Path | None = None) -> SourceData:
    """Load train and test of ``cfg.kind`` from the resolved ``root`` at ``cfg.image_size`` (or the kind's default).

    ``cache_dir`` is the resolved ``data.cache_dir``; None falls back to ``$KDPIPE_CACHE`` / ``~/.cache/kdpipe``.
    """
    image_size = cfg.image_size if cfg.image_size is not None else DEFAULT_IMAGE_SIZE[cfg.kind]
    return get_source_loader(cfg.kind)(cfg, root, image_size, cache.resolve_cache_dir(cache_dir))
