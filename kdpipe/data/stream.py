"""Streaming data path for image folders too large to decode into memory: ``FileSplit`` and ``StreamLoader``.

- ``build_file_splits(root, image_size)`` lists a folder or an uncompressed ``.tar`` with the imagefolder helpers
  (same layout rules, classes, labels and (label, path) sample order as ``data.kind: imagefolder``) and keeps, per
  sample, only where its bytes are: a file path, or a tar member's data offset and size. Nothing is decoded but one
  image, to learn the native size when ``image_size`` is unset.
- Compressed archives (.tar.gz, .tgz, .tar.bz2, .tar.xz) are refused: a member is reached only by decompressing all
  that precedes it, so random order would decompress the archive again and again. Extract it, decompress it to a
  plain .tar, or keep ``data.loader: memory``, which decodes it once, front to back.
- A plain ``.tar`` is read with ``os.pread`` at each member's offset, through a descriptor every process opens for
  itself on its first read (after the DataLoader forked its workers). A ``FileSplit`` holds only strings and
  tensors, so it also pickles to spawn / forkserver workers (a ``TarInfo`` refers to its open TarFile).
- ``StreamLoader`` runs a ``torch.utils.data.DataLoader`` over the ``FileSplit`` (a map-style dataset decoding ONE
  image per item) in ``workers`` persistent processes, ``prefetch`` batches ahead per worker, into pinned memory when
  the device is CUDA. Its batch sampler yields BatchLoader's index batches; each collated uint8 batch is copied to
  the device (non_blocking), augmented there and normalised.

Determinism contract: for the same split, arguments and uint8 images, a ``StreamLoader`` yields exactly the batches
of a ``BatchLoader`` (bitwise on CPU; on a GPU, the device stream BatchLoader draws there):
- argument checks, batch count, drop_last rule, epoch order and rank come from a ``BatchLoader`` over zero-pixel
  images (the plan), so the two loaders cannot cut different batches;
- batch k of epoch e is augmented with a device generator seeded by ``derive_seed(seed, "augment", e, k)``, whatever
  step the iteration started at, then ``normalize``d;
- under data parallelism a rank decodes only its shard of the global batch, puts it at its rows of a zero batch of
  the global size, augments that and keeps its rows. This equals BatchLoader's augment-then-shard because each
  augmentation draws a fixed number of values per batch whatever the pixels (augment.py) and transforms a sample
  from its own pixels and draws alone. An augmentation that mixes samples (mixup, cutmix) would break this.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from kdpipe.data.archive import TAR_SUFFIXES, ImageEntry, TarSource, open_image_source
from kdpipe.data.augment import augment_batch
from kdpipe.data.imagefolder import Fit, decode_image, list_imagefolder
from kdpipe.data.loader import Batch, BatchLoader, normalize
from kdpipe.data.tensor_split import TensorSplit, derive_seed
from kdpipe.errors import DataError

COMPRESSED_SUFFIXES = tuple(s for s in TAR_SUFFIXES if s != ".tar")
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd
_DESCRIPTORS: dict[tuple[int, str], int] = {}
"""(process id, archive) -> read-only descriptor, opened on the process's first read of that archive."""


def _read(name: str, archive: Path | None = None, offset: int = 0, size: int = 0) -> bytes:
    """The bytes of file ``name``, or of the ``size`` bytes at ``offset`` in ``archive`` (member ``name``)."""
    try:
        if archive is None:
            return Path(name).read_bytes()
        key = (os.getpid(), str(archive))
        if key not in _DESCRIPTORS:
            _DESCRIPTORS[key] = os.open(archive, os.O_RDONLY)
        data = os.pread(_DESCRIPTORS[key], size, offset)
    except OSError as exc:
        raise DataError(f"cannot read image {name}: {exc}") from exc
    if len(data) != size:
        raise DataError(f"cannot read {name}: {archive} ends inside it", hint="the archive is truncated; rebuild it")
    return data


@dataclass(frozen=True, eq=False)
class FileSplit(Dataset[tuple[torch.Tensor, int]]):
    """One split kept on disk: where each image's bytes are, its label, and the size it decodes to. As a map-style
    dataset, item ``i`` is ``(read(i), label)``.

    ``names[i]`` is the file of sample ``i`` in a folder (``archive`` None), or ``archive:member`` for a member of a
    plain tar whose data sit at ``spans[i]`` = (offset, size). Images decode to RGB uint8 ``(3, S, S)`` with
    ``S = image_size``: fitted like ``data.kind: imagefolder`` when ``resize``, else they must already be that size.
    """

    names: tuple[str, ...]
    labels: torch.Tensor
    image_size: int
    resize: bool = True
    archive: Path | None = None
    spans: torch.Tensor | None = None
    crop_pct: float = 1.0
    """Below 1: timm's evaluation resize and centre crop (``imagefolder.Fit``), as the test split of memory data."""
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.labels.dtype != torch.int64 or self.labels.shape != (len(self.names),):
            raise ValueError(f"labels must be int64 ({len(self.names)},), got {self.labels.dtype} {self.labels.shape}")
        if (self.archive is None) != (self.spans is None):
            raise ValueError("archive and spans go together: both for a tar, neither for a folder")

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.read(i), int(self.labels[i])

    @property
    def in_chans(self) -> int:
        return 3  # decode_image converts every image to RGB

    def _positions(self, indices: torch.Tensor | Sequence[int]) -> list[int]:
        """Sample positions of ``indices`` (ints or a bool mask) by tensor indexing rules, as TensorSplit selects."""
        index = indices if isinstance(indices, torch.Tensor) else torch.as_tensor(list(indices), dtype=torch.int64)
        return torch.arange(len(self))[index].reshape(-1).tolist()

    def select(self, indices: torch.Tensor | Sequence[int]) -> FileSplit:
        """The samples at ``indices``, e.g. a validation or calibration subset; like ``TensorSplit.select``."""
        index = torch.tensor(self._positions(indices), dtype=torch.int64)
        spans = None if self.spans is None else self.spans[index]
        names = tuple(self.names[i] for i in index.tolist())
        return FileSplit(
            names,
            self.labels[index],
            self.image_size,
            self.resize,
            self.archive,
            spans,
            self.crop_pct,
            self.interpolation,
        )

    def read(self, i: int) -> torch.Tensor:
        """Sample ``i`` decoded: uint8 ``(3, S, S)``."""
        name, size = self.names[i], self.image_size
        span = (0, 0) if self.spans is None else self.spans[i].tolist()
        fit = Fit(size, self.crop_pct, self.interpolation) if self.resize else None
        pixels = decode_image(_read(name, self.archive, *span), name, fit)
        if pixels.shape != (size, size, 3):
            raise DataError(
                f"{name} is {pixels.shape[1]}x{pixels.shape[0]}, not {size}x{size}, and data.image_size is not set",
                hint="set data.image_size so every image is resized to the same size",
            )
        return torch.from_numpy(pixels.transpose(2, 0, 1).copy())  # a writable CHW copy of PIL's buffer

    def load(self, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """The samples at ``indices`` decoded: uint8 ``(N, 3, S, S)`` (e.g. export calibration or parity images)."""
        images = [self.read(i) for i in self._positions(indices)]
        size = self.image_size
        return torch.stack(images) if images else torch.empty((0, 3, size, size), dtype=torch.uint8)


def refuse_compressed(root: Path) -> None:
    """Raise DataError if ``root`` is a compressed archive (by name or by its first bytes): it cannot be streamed."""
    if not root.is_file():
        return
    with root.open("rb") as handle:
        head = handle.read(6)
    if root.name.lower().endswith(COMPRESSED_SUFFIXES) or head.startswith(_COMPRESSED_MAGIC):
        raise DataError(
            f"data.root {root} is a compressed archive, which cannot be streamed: reading one image means "
            "decompressing everything stored before it",
            hint=f"extract it (tar xf {root.name}) and point data.root at the folder, decompress it to a plain .tar "
            "(e.g. gunzip), or set data.loader: memory to decode it once into memory",
        )


def build_file_splits(
    root: Path, image_size: int | None = None, crop_pct: float | None = None, interpolation: str | None = None
) -> tuple[FileSplit, FileSplit, list[str]]:
    """Train and test ``FileSplit`` and class names of the imagefolder at ``root`` (a folder or a plain .tar), with
    the classes, labels, sample order and pixels that ``data.kind: imagefolder`` decodes into memory (``crop_pct``
    and ``interpolation`` as ``data.crop_pct``/``data.interpolation``: the test split's crop, both splits' filter)."""
    refuse_compressed(root)
    source = open_image_source(root)
    try:
        classes, train, test = list_imagefolder(source, root)
    finally:
        source.close()
    archive = root if isinstance(source, TarSource) else None
    size = image_size
    if size is None:  # the native size: that of the first train image, which must be square
        name = train[0][1].name
        height, width = decode_image(_read(name, archive, *_span(train[0][1])), name, None).shape[:2]
        if height != width:
            raise DataError(
                f"{name} is {width}x{height}, not square, and data.image_size is not set",
                hint="set data.image_size to resize every image to a square of that side",
            )
        size = height
    resize = image_size is not None
    filt = interpolation or "bilinear"
    return (
        _file_split(train, archive, size, resize, 1.0, filt),
        _file_split(test, archive, size, resize, crop_pct or 1.0, filt),
        classes,
    )


def _span(entry: ImageEntry) -> tuple[int, int]:
    """(data offset, size) of a tar member; (0, 0) for a file in a folder."""
    if isinstance(entry.handle, Path):
        return 0, 0
    if entry.handle.issparse():
        raise DataError(f"{entry.name} is a sparse tar member, which cannot be read by offset", hint="re-pack the tar")
    return entry.handle.offset_data, entry.handle.size


def _file_split(
    labelled: list[tuple[int, ImageEntry]],
    archive: Path | None,
    size: int,
    resize: bool,
    crop_pct: float = 1.0,
    interpolation: str = "bilinear",
) -> FileSplit:
    labels = torch.tensor([label for label, _ in labelled], dtype=torch.int64)
    spans = None if archive is None else torch.tensor([_span(e) for _, e in labelled], dtype=torch.int64)
    names = tuple(e.name for _, e in labelled)
    return FileSplit(names, labels, size, resize, archive, spans, crop_pct, interpolation)


class _Sampler:
    """Batch sampler: this rank's sample indices of global batches ``start``, ... in ``order``. StreamLoader sets both
    right before it iterates the DataLoader, which calls ``iter`` on its sampler then (persistent workers too).
    It holds no reference back to the loader: a cycle through the DataLoader would delay its workers' shutdown."""

    def __init__(self, batch_size: int, num_samples: int, num_batches: int, rank: int, world_size: int) -> None:
        self.batch_size, self.num_samples, self.num_batches = batch_size, num_samples, num_batches
        self.rank, self.world_size = rank, world_size
        self.order, self.start = torch.empty(0, dtype=torch.int64), 0

    def rows(self, k: int) -> tuple[int, int, int]:
        """(first row, rows) of this rank's shard of global batch ``k`` by tensor_split's rule, and the batch size."""
        total = min(self.batch_size, self.num_samples - k * self.batch_size)
        size, extra = divmod(total, self.world_size)
        return self.rank * size + min(self.rank, extra), size + int(self.rank < extra), total

    def indices(self, order: torch.Tensor, k: int) -> list[int]:
        first, count, _ = self.rows(k)
        return order[k * self.batch_size + first :][:count].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        order, start = self.order, self.start
        return (self.indices(order, k) for k in range(start, self.num_batches))

    def __len__(self) -> int:
        return self.num_batches - self.start


class StreamLoader:
    """``BatchLoader``'s batches, decoded from disk in DataLoader worker processes (see the module docstring).

    Args: those of ``BatchLoader``, with a ``FileSplit``, plus
        workers: decoding processes; 0 decodes in this process. They start with the first iteration and persist.
        prefetch: batches each worker decodes ahead (with workers > 0).
    """

    def __init__(
        self,
        split: FileSplit,
        *,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        augment: str = "none",
        seed: int = 0,
        device: torch.device | str = "cpu",
        drop_last: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
        prefetch: int = 2,
    ) -> None:
        if workers < 0 or prefetch < 1:
            raise ValueError(f"workers must be >= 0 and prefetch >= 1, got {workers} and {prefetch}")
        # The plan: BatchLoader itself checks the arguments and fixes the batch count, drop_last, order and rank.
        blank = TensorSplit(torch.empty((len(split), split.in_chans, 0, 0), dtype=torch.uint8), split.labels)
        self._plan = BatchLoader(
            blank, batch_size=batch_size, mean=mean, std=std, train=train, augment=augment, seed=seed,
            drop_last=drop_last, rank=rank, world_size=world_size,
        )  # fmt: skip
        self.split, self.batch_size, self.train, self.seed = split, batch_size, train, seed
        self.augment, self.drop_last = self._plan.augment, self._plan.drop_last
        self.rank, self.world_size = self._plan.rank, self._plan.world_size
        self.device = torch.device(device)
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._iterations = 0
        self._sampler = _Sampler(batch_size, len(split), len(self._plan), self.rank, self.world_size)
        self._loader = DataLoader(
            split,
            batch_sampler=self._sampler,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=prefetch if workers else None,
            persistent_workers=workers > 0,
        )

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self._plan)

    @property
    def num_samples(self) -> int:
        return self._plan.num_samples

    @property
    def epoch(self) -> int:
        return self._plan.epoch

    def set_epoch(self, epoch: int) -> None:
        self._plan.set_epoch(epoch)

    def order(self, epoch: int | None = None) -> torch.Tensor:
        """Sample indices of ``epoch`` (default: the current one) in batch order, on the loader's device."""
        return self._plan.order(epoch).to(self.device)

    def _finish(self, epoch: int, k: int, images: torch.Tensor, labels: torch.Tensor) -> Batch:
        """Move this rank's uint8 shard of batch ``k`` to the device, augment and normalise it as BatchLoader does."""
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if self.augment != "none":
            first, count, total = self._sampler.rows(k)
            if count < total:  # augment the shard at its rows of a global-size batch: the draws depend on the size
                full = images.new_zeros((total, *images.shape[1:]))
                full[first : first + count] = images
                images = full
            generator = torch.Generator(device=self.device).manual_seed(derive_seed(self.seed, "augment", epoch, k))
            images = augment_batch(images, self.augment, generator)[first : first + count]
        return normalize(images, self._mean, self._std), labels

    def iter_from(self, step: int) -> Iterator[Batch]:
        """Batches ``step``, ``step + 1``, ... of the current epoch: exactly the tail of a full iteration."""
        if not 0 <= step <= len(self):
            raise ValueError(f"step must be in [0, {len(self)}], got {step}")
        return self._iterate(self.epoch, step)

    def _iterate(self, epoch: int, step: int) -> Iterator[Batch]:
        # One live iteration at a time: a new one restarts the DataLoader's (persistent) iterator under the old one.
        self._iterations += 1
        mine = self._iterations
        self._sampler.order, self._sampler.start = self._plan.order(epoch), step
        batches = iter(self._loader)
        for k in range(step, len(self)):
            if self._iterations != mine:
                raise RuntimeError("another iteration of this StreamLoader started; finish or drop one first")
            images, labels = next(batches)
            yield self._finish(epoch, k, images, labels)

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)

    def batch(self, epoch: int, step: int) -> Batch:
        """Batch ``step`` of ``epoch`` as a full iteration makes it; decoded in this process, workers untouched."""
        if not 0 <= step < len(self):
            raise ValueError(f"step must be in [0, {len(self)}), got {step}")
        index = self._sampler.indices(self._plan.order(epoch), step)
        return self._finish(epoch, step, self.split.load(index), self.split.labels[index])

    def __repr__(self) -> str:
        return (
            f"StreamLoader(samples={self.num_samples}, batch_size={self.batch_size}, batches={len(self)}, "
            f"train={self.train}, augment={self.augment!r}, seed={self.seed}, epoch={self.epoch}, "
            f"device={self.device}, rank={self.rank}/{self.world_size}, workers={self._loader.num_workers})"
        )


def make_loader(
    split: TensorSplit | FileSplit, *, workers: int = 0, prefetch: int = 2, **kwargs: Any
) -> BatchLoader | StreamLoader:
    """A ``BatchLoader`` for an in-memory split, a ``StreamLoader`` (``workers``, ``prefetch``) for a streamed one;
    ``kwargs`` are their shared arguments (batch_size, mean, std, train, augment, seed, device, rank, ...)."""
    if isinstance(split, FileSplit):
        return StreamLoader(split, workers=workers, prefetch=prefetch, **kwargs)
    return BatchLoader(split, **kwargs)
