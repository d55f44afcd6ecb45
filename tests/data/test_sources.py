"""The built-in dataset kinds: digits, synthetic, cifar10/cifar100 (torchvision format, faked offline)."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from kdpipe.config import DataConfig
from kdpipe.data import create_splits, list_kinds, load_source
from kdpipe.data.sources import resize_uint8
from kdpipe.errors import ConfigError, DataError


def test_list_kinds_matches_config() -> None:
    assert list_kinds() == sorted(["digits", "cifar10", "cifar100", "imagefolder", "synthetic"])


def test_digits_shapes_and_classes(tmp_path: Path) -> None:
    source = load_source(DataConfig(kind="digits"), None)
    assert source.classes == [str(d) for d in range(10)]
    assert source.train_images.dtype == torch.uint8 and source.train_labels.dtype == torch.int64
    assert source.train_images.shape[1:] == (1, 16, 16)
    assert len(source.train_images) + len(source.test_images) == 1797
    assert len(source.test_images) == round(0.2 * 1797)
    assert int(source.train_images.max()) == 255 and int(source.train_images.min()) == 0
    # Stratified: each class's test share is within one sample of 20 %.
    all_counts = torch.bincount(torch.cat([source.train_labels, source.test_labels]), minlength=10)
    test_counts = torch.bincount(source.test_labels, minlength=10)
    assert torch.all((test_counts - 0.2 * all_counts).abs() <= 1)


def test_digits_image_size_and_test_split_independent_of_seed(tmp_path: Path) -> None:
    a = create_splits(DataConfig(kind="digits", image_size=8), seed=1, base_dir=tmp_path)
    b = create_splits(DataConfig(kind="digits", image_size=8), seed=2, base_dir=tmp_path)
    assert a.image_size == 8 and a.in_chans == 1 and a.train.images.shape[1:] == (1, 8, 8)
    assert torch.equal(a.test.images, b.test.images) and torch.equal(a.test.labels, b.test.labels)
    assert a.val is not None and b.val is not None
    assert not torch.equal(a.val.labels, b.val.labels) or not torch.equal(a.val.images, b.val.images)


def test_synthetic_sizes_and_determinism(tmp_path: Path) -> None:
    cfg = DataConfig(kind="synthetic", num_classes=4, num_samples=100, val_fraction=0.0)
    a = create_splits(cfg, seed=0, base_dir=tmp_path)
    b = create_splits(cfg, seed=5, base_dir=tmp_path)
    assert (len(a.train), len(a.test), a.val) == (100, 25, None)
    assert a.train.images.shape[1:] == (3, 16, 16) and a.num_classes == 4
    assert torch.bincount(a.train.labels).tolist() == [25, 25, 25, 25]
    assert torch.equal(a.train.images, b.train.images)


def test_synthetic_is_learnable_by_class_means(tmp_path: Path) -> None:
    """A nearest-class-mean classifier fitted on train must beat chance by far on test."""
    splits = create_splits(DataConfig(kind="synthetic", num_samples=400), seed=0, base_dir=tmp_path)
    x, y = splits.train.images.flatten(1).float(), splits.train.labels
    centroids = torch.stack([x[y == c].mean(0) for c in range(splits.num_classes)])
    predicted = torch.cdist(splits.test.images.flatten(1).float(), centroids).argmin(1)
    assert (predicted == splits.test.labels).float().mean() > 0.9


def test_resize_uint8_keeps_range_and_identity() -> None:
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    assert resize_uint8(images, 8) is images
    up = resize_uint8(images, 16)
    assert up.shape == (5, 3, 16, 16) and up.dtype == torch.uint8
    flat = torch.full((2, 1, 32, 32), 77, dtype=torch.uint8)
    assert torch.all(resize_uint8(flat, 7) == 77)


def test_unknown_kind_suggests() -> None:
    from kdpipe.data.sources import get_source_loader

    with pytest.raises(ConfigError, match="did you mean 'cifar10'"):
        get_source_loader("cifar1O")


# --- cifar10 / cifar100 in torchvision's pickled layout, faked with a few images and matching MD5s ---------------


def _write_pickle(path: Path, obj: object) -> tuple[str, str]:
    path.write_bytes(pickle.dumps(obj))
    return path.name, hashlib.md5(path.read_bytes()).hexdigest()


def _fake_cifar10(root: Path, monkeypatch: pytest.MonkeyPatch, per_batch: int = 4) -> np.ndarray:
    from torchvision.datasets import CIFAR10

    folder = root / CIFAR10.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_list, first = [], None
    for i in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        first = data if first is None else first
        train_list.append(_write_pickle(folder / f"data_batch_{i}", {"data": data, "labels": [i % 10] * per_batch}))
    test = _write_pickle(
        folder / "test_batch", {"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), "labels": [1, 2, 3]}
    )
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    meta_name, meta_md5 = _write_pickle(folder / "batches.meta", {"label_names": names})
    # torchvision verifies every file against the real dataset's MD5s; point it at the fakes' sums instead.
    monkeypatch.setattr(CIFAR10, "train_list", [list(t) for t in train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [list(test)])
    monkeypatch.setattr(CIFAR10, "meta", {"filename": meta_name, "key": "label_names", "md5": meta_md5})
    assert first is not None
    return first


def test_cifar10_reads_torchvision_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _fake_cifar10(tmp_path / "cifar", monkeypatch)
    splits = create_splits(DataConfig(kind="cifar10", root=Path("cifar"), val_fraction=0.0), seed=0, base_dir=tmp_path)
    assert (len(splits.train), len(splits.test)) == (20, 3)
    assert splits.classes[0] == "airplane" and splits.num_classes == 10
    assert splits.train.images.shape[1:] == (3, 32, 32)
    # torchvision's rows are CHW-flattened; the tensor must hold the same pixels.
    assert torch.equal(splits.train.images[0], torch.from_numpy(first[0].reshape(3, 32, 32)))
    # Pointing at the batches folder itself works too, and image_size resizes.
    cfg = DataConfig(kind="cifar10", root=tmp_path / "cifar" / "cifar-10-batches-py", image_size=16)
    assert create_splits(cfg, seed=0, base_dir=tmp_path).train.images.shape[1:] == (3, 16, 16)


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_missing_names_root_and_download(tmp_path: Path, kind: str) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as info:
        create_splits(DataConfig(kind=kind, root=Path("empty")), seed=0, base_dir=tmp_path)
    text = str(info.value)
    assert "data.root" in text and str(tmp_path / "empty") in text
    assert "download: true" in text and "imagefolder" in text


def test_cifar_archive_root_points_to_imagefolder(tmp_path: Path) -> None:
    archive = tmp_path / "cifar10-jpg.tar.gz"
    archive.write_bytes(b"not really")
    with pytest.raises(DataError, match="imagefolder"):
        create_splits(DataConfig(kind="cifar10", root=archive), seed=0, base_dir=tmp_path)
