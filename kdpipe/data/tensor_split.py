"""The in-memory split and the seed derivation every loader shares: a module of their own so that the loaders
(``loader``, ``stream``) and the split builder (``splits``) import them without importing each other."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


def derive_seed(*parts: object) -> int:
    """Mix ``parts`` (ints and short strings) into a 63-bit seed for a dedicated ``torch.Generator``.

    Hashing instead of ``seed + epoch`` keeps streams for different purposes (val split, epoch shuffle, batch
    augmentation) statistically independent even when their integer parts collide.
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sample_indices(length: int, n: int, seed: int, purpose: str) -> torch.Tensor:
    """A seeded random order of a split's ``length`` indices, cut to ``min(n, length)``: a sample that spreads over
    the classes of a class-sorted split (an ImageFolder's files are in class order, so its first 512 images are one
    class), the same for every run with the same ``seed``. Draws for different ``purpose`` strings are independent;
    two cuts of one purpose are nested (the first 512 of a longer cut are the same 512)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, purpose))
    return torch.randperm(length, generator=generator)[: min(n, length)]


@dataclass(frozen=True, eq=False)
class TensorSplit:
    """One split, fully in memory: uint8 images ``(N, C, H, W)`` already at the target size, int64 labels ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError(f"labels must be int64 (N,), got {self.labels.dtype} {tuple(self.labels.shape)}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def load(self, indices: torch.Tensor) -> torch.Tensor:
        """uint8 images at ``indices`` (the same call reads them from disk for a streamed ``FileSplit``)."""
        return self.images[indices]

    @property
    def in_chans(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def select(self, indices: torch.Tensor) -> TensorSplit:
        """Return the samples at ``indices`` (a copy), e.g. a calibration subset."""
        return TensorSplit(self.images[indices], self.labels[indices])
