"""Real CIFAR data from ``../shared/data`` (JPEG archives in the imagefolder layout); skipped when absent.

The cache lives in a temporary folder per test session, so the first test here pays the full decode (about 10 s
on 2 cores) and the rest read the cache.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from kdpipe.config import DataConfig
from kdpipe.data import BatchLoader, Splits, create_splits

# tests/data/<this file> -> the repository root is parents[2]; the shared folder sits beside the clone.
SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
CIFAR10 = SHARED_DATA / "cifar10-jpg.tar.gz"
CIFAR100 = SHARED_DATA / "cifar100-jpg.tar.gz"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Per-channel means of the official CIFAR-10 train set; the JPEG copy is within a few thousandths.
CIFAR10_MEAN = (0.491, 0.482, 0.447)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kdpipe-cache")


def _cifar10(cache_dir: Path, **kwargs: object) -> Splits:
    if not CIFAR10.exists():
        pytest.skip(f"real CIFAR-10 archive not found at {CIFAR10.resolve()}")
    cfg = DataConfig(kind="imagefolder", root=CIFAR10, cache_dir=cache_dir, **kwargs)  # type: ignore[arg-type]
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


def test_cifar10_warm_load_is_fast_and_equal(cifar10: Splits, cache_dir: Path) -> None:
    start = time.perf_counter()
    again = _cifar10(cache_dir, val_fraction=0.1)
    elapsed = time.perf_counter() - start
    assert torch.equal(again.train.images, cifar10.train.images)
    assert torch.equal(again.test.labels, cifar10.test.labels)
    assert elapsed < 5.0, f"warm load from the cache took {elapsed:.1f} s"


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
    if not CIFAR100.exists():
        pytest.skip(f"real CIFAR-100 archive not found at {CIFAR100.resolve()}")
    cfg = DataConfig(kind="imagefolder", root=CIFAR100, cache_dir=cache_dir, val_fraction=0.0)
    splits = create_splits(cfg, seed=0, base_dir=Path.cwd())
    assert splits.num_classes == 100 and splits.classes[0] == "apple" and splits.classes[-1] == "worm"
    assert (len(splits.train), len(splits.test)) == (50_000, 10_000)
    assert splits.mean == pytest.approx((0.5067, 0.4864, 0.4410), abs=0.002)
