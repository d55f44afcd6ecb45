"""Datasets as in-memory uint8 tensors, seeded splits, and a deterministic, resumable batch loader.

``create_splits(cfg, seed=..., base_dir=...)`` loads ``data.kind`` (digits, cifar10, cifar100, imagefolder,
synthetic) into ``Splits``; ``BatchLoader`` turns one split into normalised, augmented batches on a device.
"""

from __future__ import annotations

from kdpipe.data.augment import AUGMENTS, augment_batch
from kdpipe.data.cache import resolve_cache_dir
from kdpipe.data.loader import BatchLoader, normalize
from kdpipe.data.sources import SourceData, list_kinds, load_source
from kdpipe.data.splits import Splits, channel_stats, create_splits, resolve_root
from kdpipe.data.tensor_split import TensorSplit, derive_seed, sample_indices

__all__ = [
    "AUGMENTS",
    "BatchLoader",
    "SourceData",
    "Splits",
    "TensorSplit",
    "augment_batch",
    "channel_stats",
    "create_splits",
    "derive_seed",
    "list_kinds",
    "load_source",
    "normalize",
    "resolve_cache_dir",
    "resolve_root",
    "sample_indices",
]
