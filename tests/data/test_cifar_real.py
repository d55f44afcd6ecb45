"""Real CIFAR data from ``../shared/data`` (JPEG archives in the imagefolder layout); skipped when absent.

The cache lives in a temporary folder per test session, so the first test here pays the full decode (about 10 s
on 2 cores) and the rest read the cache.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdpipe.config import DataConfig
from kdpipe.data import BatchLoader, Splits, create_splits
from tests.conftest import shared_dataset

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Per-channel means of the official CIFAR-10 train set; the JPEG copy is within a few thousandths.
CIFAR10_MEAN = (0.491, 0.482, 0.447)


def _cifar10(cache_dir: Path, **kwargs: object) -> Splits:
    cfg = DataConfig(kind="imagefolder", root=shared_dataset("cifar10-jpg.tar.gz"), cache_dir=cache_dir, **kwargs)  # type: ignore[arg-type]
    return create_splits(cfg, seed=0, base_dir=Path.cwd())


@pytest.fixture(scope="session")
def cifar10(cache_dir: Path) -> Splits:
    return _cifar10(cache_dir, val_fraction=0.1)


def test_cifar10_classes_and_sizes(cifar10: Splits) -> None:
    assert cifar10.classes == CIFAR10_CLASSES
    assert cifar10.val is not None
    assert (len(cifar10.train), len(cifar10.val), len(cifar10.test)) == (45_000, 5_000, 10_000)
    assert torch.bincount(cifar10.train.labels).tolist() == [4_500] * 10
    assert torch.bincount(cifar10.val.labels).tolist() == [500] * 10
    assert torch.bincount(cifar10.test.labels).tolist() == [1_000] * 10
    assert cifar10.train.images.shape[1:] == (3, 32, 32) and cifar10.train.images.dtype == torch.uint8
    assert (cifar10.in_chans, cifar10.image_size) == (3, 32)


def test_cifar10_train_mean_matches_known_values(cifar10: Splits) -> None:
    assert cifar10.mean == pytest.approx(CIFAR10_MEAN, abs=0.01)
    assert all(0.2 < s < 0.3 for s in cifar10.std)


def test_cifar10_second_load_reads_the_cache(cifar10: Splits, cache_dir: Path) -> None:
    cached = {p: p.stat().st_mtime_ns for p in cache_dir.rglob("*") if p.is_file()}
    assert cached, "the first load wrote no cache file"
    again = _cifar10(cache_dir, val_fraction=0.1)
    assert {p: p.stat().st_mtime_ns for p in cache_dir.rglob("*") if p.is_file()} == cached  # read, not rebuilt
    assert torch.equal(again.train.images, cifar10.train.images)
    assert torch.equal(again.test.labels, cifar10.test.labels)


def test_cifar10_one_augmented_epoch_of_batches(cifar10: Splits) -> None:
    loader = BatchLoader(
        cifar10.train, batch_size=512, mean=cifar10.mean, std=cifar10.std, train=True, augment="cifar", seed=0
    )
    x, y = next(iter(loader))
    assert x.shape == (512, 3, 32, 32) and y.shape == (512,)
    # Normalised with the train statistics: roughly zero mean, unit std (the zero padding pulls the mean down).
    assert abs(float(x.mean())) < 0.3 and 0.7 < float(x.std()) < 1.3


@pytest.mark.slow
def test_cifar100_classes_and_sizes(cache_dir: Path) -> None:
    cfg = DataConfig(
        kind="imagefolder", root=shared_dataset("cifar100-jpg.tar.gz"), cache_dir=cache_dir, val_fraction=0.0
    )
    splits = create_splits(cfg, seed=0, base_dir=Path.cwd())
    assert splits.num_classes == 100 and splits.classes[0] == "apple" and splits.classes[-1] == "worm"
    assert (len(splits.train), len(splits.test)) == (50_000, 10_000)
    assert splits.mean == pytest.approx((0.5067, 0.4864, 0.4410), abs=0.002)
