"""``cifar10`` / ``cifar100``: the pickled CIFAR batches in torchvision's layout under ``data.root``.

torchvision's own classes read and verify the files (MD5 of every batch); this module turns their ``.data``
arrays into uint8 tensors directly rather than going through per-sample PIL images. The JPEG copies of CIFAR in
``../shared/data`` are in the imagefolder layout and load with ``kind: imagefolder`` instead.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kdpipe.config import DataConfig
from kdpipe.data.sources import SourceData, resize_uint8
from kdpipe.errors import DataError


def _dataset_class(kind: str) -> type:
    from torchvision.datasets import CIFAR10, CIFAR100  # imported here: pulls in torchvision's dataset stack

    return CIFAR10 if kind == "cifar10" else CIFAR100


def _load_split(
    dataset_cls: type, root: Path, *, train: bool, download: bool
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    dataset = dataset_cls(str(root), train=train, download=download)
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    labels = torch.as_tensor(dataset.targets, dtype=torch.int64)
    return images, labels, list(dataset.classes)


def load_cifar_source(cfg: DataConfig, root: Path | None, image_size: int | None, cache_dir: Path) -> SourceData:
    """Load CIFAR-10 or CIFAR-100 (``cfg.kind``) from ``root``; resize when ``image_size`` is not 32.

    ``root`` may be the folder holding ``cifar-10-batches-py`` (torchvision's convention) or that folder itself.
    Missing or corrupt files raise DataError unless ``cfg.download`` is set.
    """
    if root is None:
        raise DataError(f"data.root is required for kind {cfg.kind!r}", hint="set data.root to the CIFAR folder")
    dataset_cls = _dataset_class(cfg.kind)
    base_folder: str = dataset_cls.base_folder  # type: ignore[attr-defined]
    if root.name == base_folder:
        root = root.parent
    if root.is_file():
        raise DataError(
            f"data.root {root} is a file, but kind {cfg.kind!r} reads torchvision's folder layout "
            f"(<root>/{base_folder}/...)",
            hint="for a .tar/.tar.gz of train/<class>/*.jpg, use kind: imagefolder",
        )
    try:
        train_images, train_labels, classes = _load_split(dataset_cls, root, train=True, download=cfg.download)
        test_images, test_labels, _ = _load_split(dataset_cls, root, train=False, download=False)
    except RuntimeError as exc:  # torchvision's "Dataset not found or corrupted"
        raise DataError(
            f"{cfg.kind} not found or corrupt under data.root {root} (expected {root / base_folder}): {exc}",
            hint="set data.download: true to fetch it (needs internet), or use kind: imagefolder for a folder or "
            "archive of train/<class>/* images",
        ) from exc
    except OSError as exc:  # a failed download (no network) or an unreadable file
        raise DataError(
            f"could not read or download {cfg.kind} into data.root {root}: {exc}",
            hint="on an offline machine, copy the dataset into data.root and set download: false",
        ) from exc
    size = image_size or 32
    return SourceData(
        train_images=resize_uint8(train_images, size),
        train_labels=train_labels,
        test_images=resize_uint8(test_images, size),
        test_labels=test_labels,
        classes=classes,
        name=f"{cfg.kind}:{root}",
    )
