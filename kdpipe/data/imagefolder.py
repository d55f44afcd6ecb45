"""``imagefolder``: a folder or tar archive in the ``train/<class>/*``, ``test/<class>/*`` layout, decoded with PIL.

Layout rules (torchvision ImageFolder conventions, plus what real archives need):
- ``train/`` and ``test/`` at the top, or inside a single top-level folder (``cifar10/train/...``);
  ``val/`` is the test split when there is no ``test/``.
- The label of a class is its position among the sorted ``train/`` class folders; test classes must be a subset.
- Images may sit deeper inside a class folder; files directly in ``train/`` are ignored.
- Images are converted to RGB; one that is not ``image_size`` square is resized on its short side (antialiased,
  ``data.interpolation``: bilinear by default) and centre-cropped, so the aspect ratio is kept. Test images with
  ``data.crop_pct`` < 1 get timm's evaluation transform instead: the short side resized to
  ``floor(image_size / crop_pct)``, then the centre ``image_size`` square (torchvision's Resize and CenterCrop).
  Without ``image_size`` every image must already be the same square size.

Samples are ordered by (label, path), independent of the order inside the archive, so a folder and its tar give
identical tensors. The decoded tensors go through ``kdpipe.data.cache``: the first load of CIFAR-10 takes seconds,
later ones a fraction of a second.
"""

from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode

from kdpipe.config import DataConfig
from kdpipe.data import cache
from kdpipe.data.archive import ImageEntry, ImageSource, Listing, open_image_source
from kdpipe.data.sources import SourceData
from kdpipe.errors import DataError

logger = logging.getLogger(__name__)

# What PIL raises for a truncated, corrupt or absurdly large image.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _find_layout(listing: Listing, where: Path) -> tuple[tuple[str, ...], str]:
    """Return ``(prefix, test folder name)``: the path components above ``train/`` and ``test`` or ``val``."""
    prefix: tuple[str, ...] = ()
    if ("train",) not in listing.dirs:
        wrappers = [d for d in listing.dirs if len(d) == 1]
        if len(wrappers) == 1 and (wrappers[0][0], "train") in listing.dirs:
            prefix = wrappers[0]
        else:
            found = ", ".join(listing.top_level[:20]) or "nothing"
            raise DataError(
                f"no train/ folder in data.root {where}; found at the top level: {found}",
                hint="lay the data out as train/<class>/<image> and test/<class>/<image>",
            )
    for name in ("test", "val"):
        if (*prefix, name) in listing.dirs:
            if name == "test" and (*prefix, "val") in listing.dirs:
                logger.info("%s has both test/ and val/: test/ is the test split, val/ is not used", where)
            return prefix, name
    raise DataError(
        f"no test/ or val/ folder beside train/ in data.root {where}",
        hint="add test/<class>/<image> (or val/<class>/<image>) for the held-out evaluation split",
    )


def _class_folders(listing: Listing, split: tuple[str, ...]) -> list[str]:
    return sorted(d[-1] for d in listing.dirs if len(d) == len(split) + 1 and d[: len(split)] == split)


def _group(listing: Listing, split: tuple[str, ...], classes: list[str], where: Path) -> list[tuple[int, ImageEntry]]:
    """``(label, entry)`` for every image under ``split/<class>/``, sorted by (label, path); every class non-empty."""
    index = {name: i for i, name in enumerate(classes)}
    depth = len(split)
    picked = sorted(
        ((index[e.parts[depth]], e) for e in listing.images if len(e.parts) > depth + 1 and e.parts[:depth] == split),
        key=lambda item: (item[0], item[1].parts),
    )
    counts = np.bincount([label for label, _ in picked], minlength=len(classes))
    empty = [classes[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        folder = "/".join(split)
        raise DataError(
            f"class folder(s) without images in {where}: {', '.join(f'{folder}/{c}' for c in empty[:10])}",
            hint="every class folder needs at least one image (.jpg, .png, ...); remove empty folders",
        )
    return picked


@dataclass(frozen=True)
class Fit:
    """How a decoded image becomes ``size`` x ``size``: ``crop_pct`` 1 fits the short side (centre crop of the rest),
    below 1 resizes the short side to ``floor(size / crop_pct)`` first and keeps the centre (timm's eval transform);
    ``interpolation`` is the resampling filter ("bilinear" or "bicubic")."""

    size: int
    crop_pct: float = 1.0
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in _FILTERS:
            raise ValueError(f"interpolation must be one of {', '.join(_FILTERS)}, got {self.interpolation!r}")

    @property
    def resize_size(self) -> int:
        """The short side before the centre crop (``size`` when ``crop_pct`` is 1)."""
        return math.floor(self.size / self.crop_pct) if self.crop_pct < 1.0 else self.size

    def describe(self) -> str:
        """A cache-key part: empty for the defaults, so caches of earlier versions stay valid."""
        parts = [f"crop={self.crop_pct:g}"] if self.crop_pct < 1.0 else []
        return "|".join([*parts, f"interp={self.interpolation}"] if self.interpolation != "bilinear" else parts)

    def apply(self, rgb: Image.Image) -> Image.Image:
        size = (self.size, self.size)
        if self.crop_pct >= 1.0:
            return rgb if rgb.size == size else ImageOps.fit(rgb, size, method=_FILTERS[self.interpolation])
        mode = getattr(InterpolationMode, self.interpolation.upper())
        return TF.center_crop(TF.resize(rgb, self.resize_size, interpolation=mode), list(size))


_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def decode_image(data: bytes, name: str, size: int | Fit | None) -> np.ndarray:
    """Decode ``data`` to an RGB uint8 ``(H, W, 3)`` array, fitted to ``size`` x ``size`` (an int: the default
    :class:`Fit`) when given."""
    fit = Fit(size) if isinstance(size, int) else size
    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB")
            if fit is not None:
                rgb = fit.apply(rgb)
            return np.asarray(rgb)
    except _DECODE_ERRORS as exc:
        raise DataError(f"cannot decode image {name}: {exc}", hint="delete or replace the file") from exc


def _decode_all(
    source: ImageSource,
    labelled: list[tuple[int, ImageEntry]],
    fit: Fit | None,
    where: Path,
    eval_fit: Fit | None = None,
    eval_from: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every entry into its slot of one preallocated uint8 array (read in the source's fastest order); entries
    from position ``eval_from`` on (the test split) with ``eval_fit`` when given."""
    slots = {id(entry): i for i, (_, entry) in enumerate(labelled)}
    out: np.ndarray | None = None
    first_name = ""
    for entry, data in source.read([entry for _, entry in labelled]):
        slot = slots[id(entry)]
        use = eval_fit if eval_fit is not None and eval_from is not None and slot >= eval_from else fit
        pixels = decode_image(data, entry.name, use)
        if out is None:
            height, width = pixels.shape[:2]
            if height != width:
                raise DataError(
                    f"{entry.name} is {width}x{height}, not square, and data.image_size is not set",
                    hint="set data.image_size to resize every image to a square of that side",
                )
            out = np.empty((len(labelled), height, width, 3), dtype=np.uint8)
            first_name = entry.name
        elif pixels.shape != out.shape[1:]:
            raise DataError(
                f"{entry.name} is {pixels.shape[1]}x{pixels.shape[0]} but {first_name} is "
                f"{out.shape[2]}x{out.shape[1]}, and data.image_size is not set",
                hint="set data.image_size so every image is resized to the same size",
            )
        out[slot] = pixels
    if out is None:
        raise DataError(f"no images found in {where}")
    images = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([label for label, _ in labelled], dtype=torch.int64)
    return images, labels


def list_imagefolder(
    source: ImageSource, where: Path
) -> tuple[list[str], list[tuple[int, ImageEntry]], list[tuple[int, ImageEntry]]]:
    """List and check ``source``: sorted train class names, and ``(label, entry)`` of every train and test image."""
    listing = source.scan()
    prefix, test_name = _find_layout(listing, where)
    train_dir, test_dir = (*prefix, "train"), (*prefix, test_name)
    classes = _class_folders(listing, train_dir)
    if not classes:
        raise DataError(
            f"no class folders in {'/'.join(train_dir)}/ of data.root {where}",
            hint="put each class's images in its own folder: train/<class>/<image>",
        )
    test_classes = _class_folders(listing, test_dir)
    if not test_classes:
        raise DataError(
            f"no class folders in {'/'.join(test_dir)}/ of data.root {where}",
            hint="put each class's test images in its own folder: test/<class>/<image>",
        )
    unknown = sorted(set(test_classes) - set(classes))
    if unknown:
        raise DataError(
            f"{'/'.join(test_dir)}/ in {where} has classes that train/ lacks: {', '.join(unknown[:10])}",
            hint="test classes must be a subset of train classes (labels follow the sorted train folders)",
        )
    train = _group(listing, train_dir, classes, where)
    # Labels come from the train folder list, so a test split with fewer classes keeps the same indices.
    index = {name: i for i, name in enumerate(classes)}
    test = [(index[test_classes[label]], entry) for label, entry in _group(listing, test_dir, test_classes, where)]
    return classes, train, test


def fits(cfg: DataConfig, image_size: int | None) -> tuple[Fit | None, Fit | None]:
    """The train and test :class:`Fit` of ``cfg`` at ``image_size`` (None, None: images kept at their size)."""
    if image_size is None:
        return None, None
    interpolation = cfg.interpolation or "bilinear"
    return Fit(image_size, 1.0, interpolation), Fit(image_size, cfg.crop_pct or 1.0, interpolation)


def build_imagefolder(
    source: ImageSource, where: Path, image_size: int | None, eval_fit: Fit | None = None
) -> SourceData:
    """List, check and decode ``source`` (no cache): train and test splits with sorted train class names. Train
    images are fitted to ``image_size`` (with ``eval_fit``'s filter), test images with ``eval_fit`` when given."""
    start = time.perf_counter()
    classes, train, test = list_imagefolder(source, where)
    logger.info("decoding %d train + %d test images from %s", len(train), len(test), where)
    fit = None if image_size is None else Fit(image_size, 1.0, eval_fit.interpolation if eval_fit else "bilinear")
    # One pass over both splits: a compressed archive is then decompressed only once more after listing.
    images, labels = _decode_all(source, train + test, fit, where, eval_fit, len(train))
    n_train = len(train)
    train_images, train_labels, test_images, test_labels = (
        images[:n_train],
        labels[:n_train],
        images[n_train:],
        labels[n_train:],
    )
    logger.info("decoded %s in %.1f s", where, time.perf_counter() - start)
    return SourceData(train_images, train_labels, test_images, test_labels, classes, name=f"imagefolder:{where}")


def load_imagefolder_source(cfg: DataConfig, root: Path | None, image_size: int | None, cache_dir: Path) -> SourceData:
    """Load ``root`` (folder or tar archive) through the tensor cache under ``cache_dir``."""
    if root is None:
        raise DataError("data.root is required for kind 'imagefolder'", hint="set data.root to a folder or archive")
    if image_size is None and (cfg.crop_pct is not None or cfg.interpolation is not None):
        raise DataError(
            "data.crop_pct and data.interpolation resize images, but data.image_size is not set",
            hint="set data.image_size, or remove data.crop_pct and data.interpolation",
        )
    _, eval_fit = fits(cfg, image_size)
    variant = "|".join(p for p in (f"size={image_size or 'native'}", eval_fit.describe() if eval_fit else "") if p)
    source = open_image_source(root)
    try:
        payload = cache.load_or_build(
            cache_dir,
            kind="imagefolder",
            source=root,
            variant=variant,
            identity=source.identity(),
            build=lambda: build_imagefolder(source, root, image_size, eval_fit).to_payload(),
        )
    finally:
        source.close()
    try:
        return SourceData.from_payload(payload, name=f"imagefolder:{root}")
    except (KeyError, TypeError) as exc:  # only reachable if a verified cache file holds an old layout
        raise DataError(f"dataset cache for {root} is malformed: {exc}", hint=f"delete {cache_dir}") from exc
