"""Train/val/test splits held fully in memory as uint8 tensors, and ``create_splits``, the entry point of the package.

Every source (digits, cifar, imagefolder, synthetic) yields a train and a test split at the requested image size;
this module carves the seeded, stratified validation split out of train and measures the normalisation
statistics on what is left, so the numbers a model is trained with are the numbers of the data it sees.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdpipe.config import DataConfig
from kdpipe.data.sources import load_source
from kdpipe.data.stream import FileSplit, build_file_splits
from kdpipe.data.tensor_split import TensorSplit, derive_seed
from kdpipe.errors import DataError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Splits:
    """The splits of one dataset plus what a model needs to know about them."""

    train: TensorSplit | FileSplit
    """In memory (``data.loader: memory``), or file references decoded per batch (``stream``); both have
    ``labels``, ``len``, ``select``, ``load(indices)``, ``in_chans`` and ``image_size``."""
    val: TensorSplit | FileSplit | None
    test: TensorSplit | FileSplit
    classes: list[str]
    """Class names; the index is the label."""
    mean: tuple[float, ...]
    """Per-channel mean the images are normalised with, in [0, 1] units (the train split's unless
    ``normalization`` says otherwise)."""
    std: tuple[float, ...]
    """Per-channel standard deviation, as ``mean``."""
    in_chans: int
    image_size: int
    name: str = ""
    """Where the data came from, e.g. ``imagefolder:/data/cifar10-jpg.tar.gz``; for logs and model cards."""
    normalization: str = "dataset"
    """Where ``mean``/``std`` come from: "dataset" (measured on train), or the pretrained model or config."""
    crop_pct: float = 1.0
    """The test images' centre crop (timm's crop_pct): below 1, resized on the short side to
    ``floor(image_size / crop_pct)`` before the centre ``image_size`` square is kept; 1: the short side fitted."""
    interpolation: str = "bilinear"
    """The filter images were resized with."""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary (sizes, classes, statistics) for logs, run records and model cards."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "classes": list(self.classes),
            "in_chans": self.in_chans,
            "image_size": self.image_size,
            "train": len(self.train),
            "val": None if self.val is None else len(self.val),
            "test": len(self.test),
            "mean": [round(m, 6) for m in self.mean],
            "std": [round(s, 6) for s in self.std],
            "normalization": self.normalization,
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
        }


def resolve_root(cfg: DataConfig, base_dir: Path, *, must_exist: bool = False) -> Path | None:
    """Return ``cfg.root`` as an absolute path (``~`` expanded, relative to ``base_dir``), or None when unset.

    ``base_dir`` is the folder of the stages.yaml. With ``must_exist`` a missing path raises DataError, so config
    validation can fail before any stage runs.
    """
    if cfg.root is None:
        return None
    root = cfg.root.expanduser()
    if not root.is_absolute():
        root = Path(base_dir).expanduser() / root
    root = Path(root).absolute()
    if must_exist and not root.exists():
        raise DataError(
            f"data.root {str(cfg.root)!r} does not exist (resolved to {root})",
            hint="relative paths are resolved against the stages.yaml folder; fix data.root or create the dataset",
        )
    return root


# torchvision's folder of pickled batches under a CIFAR data.root
_CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def data_identity(cfg: DataConfig, base_dir: Path) -> str | None:
    """What the files behind ``cfg`` are, for stage fingerprints: a dataset changed in place reruns the stages.

    An archive is its path, size and modification time; a folder the relative path, size and modification time of
    every file it holds (one ``stat`` each: seconds for an ImageNet-size tree, and no file is read). Bundled and
    generated kinds (digits, synthetic) have no files: None. A missing root is reported as such; the stage that
    reads it fails with the real error.
    """
    root = resolve_root(cfg, base_dir)
    if root is None:
        return None
    if not root.exists():
        return f"missing:{root}"
    if cfg.kind == "imagefolder":
        from kdpipe.data.archive import open_image_source

        source = open_image_source(root)
        try:
            return source.identity()
        finally:
            source.close()
    from kdpipe.data import cache

    if root.is_file():
        return cache.file_identity(root)
    batches = _CIFAR_FOLDERS.get(cfg.kind)
    if batches is not None and root.name != batches and (root / batches).is_dir():
        root = root / batches  # only the batch files, not everything else kept beside them
    stats = [(p.relative_to(root).as_posix(), p.stat()) for p in root.rglob("*") if p.is_file()]
    return cache.listing_identity(root, [(rel, st.st_size, st.st_mtime_ns) for rel, st in stats])


def stratified_holdout(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split sample indices into ``(keep, holdout)`` with ``round(fraction * N)`` held out, stratified by label.

    Each class gives ``floor(fraction * n_c)`` samples and the remainder goes to the classes with the largest
    fractional parts (ties: lower label), so the total is exact and shares match to within one sample. Every class
    keeps at least one sample; at least one sample is held out when ``fraction > 0``. Which samples are held out
    depends only on ``seed``; both index tensors are sorted, so source order is preserved inside each split.
    """
    n = len(labels)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    present, counts = torch.unique(labels, return_counts=True)
    if fraction == 0.0 or n == 0:
        return torch.arange(n), torch.empty(0, dtype=torch.int64)
    capacity = counts - 1  # a class never loses its last sample
    want = min(max(1, round(fraction * n)), int(capacity.sum()))
    exact = counts.double() * fraction
    take = torch.minimum(exact.floor().long(), capacity)
    order = sorted(range(len(present)), key=lambda i: (-(exact[i] - exact[i].floor()).item(), i))
    while int(take.sum()) < want:  # at most a few rounds: each round adds up to one sample per class
        for i in order:
            if int(take.sum()) >= want:
                break
            if take[i] < capacity[i]:
                take[i] += 1
    generator = torch.Generator().manual_seed(seed)
    holdout = []
    for cls, k in zip(present.tolist(), take.tolist(), strict=True):
        members = torch.nonzero(labels == cls).flatten()
        # One randperm per class, in label order, so the draw for a class does not depend on other classes' sizes.
        perm = torch.randperm(len(members), generator=generator)
        holdout.append(members[perm[:k]])
    held = torch.sort(torch.cat(holdout)).values
    mask = torch.ones(n, dtype=torch.bool)
    mask[held] = False
    return torch.nonzero(mask).flatten(), held


def channel_stats(images: torch.Tensor | Iterable[torch.Tensor]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 ``images`` in [0, 1] units (one tensor, or batches of one
    split: the same numbers either way).

    Counted from a 256-bin histogram per channel: exact, and no float copy of a 150 MB tensor.
    """
    hists: torch.Tensor | None = None
    for batch in [images] if isinstance(images, torch.Tensor) else images:
        if len(batch) == 0:
            continue
        counts = torch.stack(
            [torch.bincount(batch[:, c].reshape(-1).cpu(), minlength=256) for c in range(batch.shape[1])]
        )
        hists = counts if hists is None else hists + counts
    if hists is None:
        raise DataError("cannot measure mean/std: the train split is empty", hint="lower data.val_fraction")
    values = torch.arange(256, dtype=torch.float64)
    means, stds = [], []
    for hist_c in hists:
        hist = hist_c.double()
        total = hist.sum()
        mean = (hist * values).sum() / total
        var = (hist * (values - mean) ** 2).sum() / total
        means.append(float(mean) / 255.0)
        stds.append(float(var.sqrt()) / 255.0)
    return tuple(means), tuple(stds)


def _uint8_batches(split: TensorSplit | FileSplit, workers: int) -> Iterable[torch.Tensor]:
    """The split's images: the tensor itself, or a streamed split decoded in batches by ``workers`` processes."""
    if isinstance(split, TensorSplit):
        return [split.images]
    from torch.utils.data import DataLoader

    return (images for images, _ in DataLoader(split, batch_size=256, num_workers=workers))


def _streamed_stats(
    cfg: DataConfig, train: FileSplit, root: Path, cache_dir: Path | None, *, seed: int, identity: str | None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std of a streamed train split, through the dataset cache: measuring them decodes every train image,
    which on an ImageNet-size folder takes longer than the run's other set-up. The key is the data files' identity
    and everything that picks the train samples (size, subset, val_fraction, seed)."""
    from kdpipe.data import cache

    def build() -> dict[str, object]:
        mean, std = channel_stats(_uint8_batches(train, cfg.workers))
        return {"mean": torch.tensor(mean, dtype=torch.float64), "std": torch.tensor(std, dtype=torch.float64)}

    assert identity is not None
    payload = cache.load_or_build(
        cache.resolve_cache_dir(cache_dir),
        kind="imagefolder-stats",
        source=root,
        variant=f"size={cfg.image_size or 'native'}|subset={cfg.subset}|val={cfg.val_fraction}|seed={seed}"
        + (f"|interp={cfg.interpolation}" if cfg.interpolation not in (None, "bilinear") else ""),
        identity=identity,
        build=build,
    )
    mean_t, std_t = payload["mean"], payload["std"]
    assert isinstance(mean_t, torch.Tensor) and isinstance(std_t, torch.Tensor)
    return tuple(float(v) for v in mean_t), tuple(float(v) for v in std_t)


@dataclass(frozen=True)
class Normalization:
    """Fixed per-channel statistics to normalise with instead of the train split's, and where they come from."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str


def create_splits(
    cfg: DataConfig,
    *,
    seed: int,
    base_dir: Path,
    data_files: str | None = None,
    normalization: Normalization | None = None,
) -> Splits:
    """Load the dataset ``cfg`` describes and return its train / val / test splits with normalisation statistics.

    ``seed`` is the run seed: it picks the validation samples (``cfg.val_fraction`` of train, stratified); the test
    split never depends on it. ``base_dir`` is the stages.yaml folder, against which a relative ``data.root`` and
    ``data.cache_dir`` are resolved. Decoded images are cached (see ``kdpipe.data.cache``). ``data_files`` is
    ``data_identity(cfg, base_dir)`` where the caller has it already (a folder's identity is one stat per file).
    ``normalization``: statistics to use instead of the train split's (``data.normalize`` resolved by the
    pipeline); they must have one value per image channel.
    """
    root = resolve_root(cfg, base_dir)
    cache_dir = None
    if cfg.cache_dir is not None:
        cache_dir = cfg.cache_dir.expanduser()
        cache_dir = cache_dir if cache_dir.is_absolute() else Path(base_dir) / cache_dir
    train: TensorSplit | FileSplit
    test: TensorSplit | FileSplit
    if cfg.loader == "stream":
        assert root is not None  # the config requires it for imagefolder
        train, test, classes = build_file_splits(root, cfg.image_size, cfg.crop_pct, cfg.interpolation)
        name = f"imagefolder:{root} (streamed)"
    else:
        source = load_source(cfg, root, cache_dir=cache_dir)
        train = TensorSplit(source.train_images, source.train_labels)
        test = TensorSplit(source.test_images, source.test_labels)
        classes, name = list(source.classes), source.name
    if cfg.subset is not None:
        _, part = stratified_holdout(train.labels, cfg.subset, derive_seed(seed, "subset"))
        train = train.select(part)
        _, part = stratified_holdout(test.labels, cfg.subset, derive_seed(0, "subset-test"))
        test = test.select(part)
    val = None
    if cfg.val_fraction > 0:
        keep, held = stratified_holdout(train.labels, cfg.val_fraction, derive_seed(seed, "val"))
        train, val = train.select(keep), train.select(held)
    if normalization is not None:
        if len(normalization.mean) != train.in_chans:
            raise DataError(
                f"data.normalize: {normalization.source} gives {len(normalization.mean)} channel(s) of mean/std, "
                f"but the images have {train.in_chans}",
                hint="set data.normalize: dataset, or {mean: [...], std: [...]} with one value per channel",
            )
        mean, std = normalization.mean, normalization.std
    elif not isinstance(train, TensorSplit):  # streamed
        assert root is not None
        identity = data_files or data_identity(cfg, base_dir)
        mean, std = _streamed_stats(cfg, train, root, cache_dir, seed=seed, identity=identity)
    else:
        mean, std = channel_stats(_uint8_batches(train, cfg.workers))
    splits = Splits(
        train=train,
        val=val,
        test=test,
        classes=classes,
        mean=mean,
        std=std,
        in_chans=train.in_chans,
        image_size=train.image_size,
        name=name,
        normalization=normalization.source if normalization is not None else "dataset",
        crop_pct=cfg.crop_pct or 1.0,
        interpolation=cfg.interpolation or "bilinear",
    )
    logger.info(
        "data %s: %d classes, train %d, val %s, test %d, %dx%dx%d",
        splits.name,
        splits.num_classes,
        len(train),
        "-" if val is None else len(val),
        len(test),
        splits.in_chans,
        splits.image_size,
        splits.image_size,
    )
    return splits
