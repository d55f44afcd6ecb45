"""Seeded stratified splits, normalisation statistics, Splits.describe and data.root resolution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdpipe.config import DataConfig
from kdpipe.data import Splits, TensorSplit, channel_stats, create_splits, derive_seed, resolve_root
from kdpipe.data.splits import data_identity, stratified_holdout
from kdpipe.errors import DataError


def _labels(counts: list[int]) -> torch.Tensor:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]


@pytest.mark.parametrize(("counts", "fraction"), [([100] * 10, 0.1), ([37, 5, 120, 2, 61], 0.2), ([3, 3], 0.5)])
def test_stratified_holdout_sizes_and_shares(counts: list[int], fraction: float) -> None:
    labels = _labels(counts)
    keep, held = stratified_holdout(labels, fraction, seed=3)
    assert len(held) == round(fraction * len(labels))
    assert torch.equal(torch.sort(torch.cat([keep, held])).values, torch.arange(len(labels)))  # disjoint, complete
    assert torch.equal(keep, torch.sort(keep).values) and torch.equal(held, torch.sort(held).values)
    per_class = torch.bincount(labels[held], minlength=len(counts))
    for c, n in enumerate(counts):
        assert abs(int(per_class[c]) - fraction * n) < 1.0 + 1e-9
        assert int((labels[keep] == c).sum()) >= 1


def test_stratified_holdout_depends_only_on_seed() -> None:
    labels = _labels([50, 30, 20])
    a = stratified_holdout(labels, 0.25, seed=7)[1]
    assert torch.equal(a, stratified_holdout(labels, 0.25, seed=7)[1])
    assert not torch.equal(a, stratified_holdout(labels, 0.25, seed=8)[1])
    torch.manual_seed(123)
    state = torch.get_rng_state()
    stratified_holdout(labels, 0.25, seed=7)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is never used


def test_stratified_holdout_edge_cases() -> None:
    keep, held = stratified_holdout(_labels([4, 4]), 0.0, seed=0)
    assert len(keep) == 8 and len(held) == 0
    # A tiny fraction still holds out one sample; singleton classes are never emptied.
    assert len(stratified_holdout(_labels([10, 10]), 0.01, seed=0)[1]) == 1
    labels = _labels([1, 1, 1, 5])
    keep, held = stratified_holdout(labels, 0.5, seed=0)
    assert len(held) == 4 and torch.equal(torch.sort(labels[keep]).values, torch.tensor([0, 1, 2, 3]))


def test_create_splits_val_seeded_and_stratified(tmp_path: Path) -> None:
    cfg = DataConfig(kind="digits", val_fraction=0.2)
    a = create_splits(cfg, seed=0, base_dir=tmp_path)
    b = create_splits(cfg, seed=0, base_dir=tmp_path)
    c = create_splits(cfg, seed=1, base_dir=tmp_path)
    assert a.val is not None and c.val is not None
    assert len(a.train) + len(a.val) == 1797 - len(a.test)
    assert len(a.val) == round(0.2 * (len(a.train) + len(a.val)))
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.val.labels, b.val.labels)
    assert not torch.equal(a.train.images, c.train.images)
    assert torch.equal(a.test.images, c.test.images)
    shares = torch.bincount(a.val.labels, minlength=10) / torch.bincount(
        torch.cat([a.train.labels, a.val.labels]), minlength=10
    )
    assert torch.all((shares - 0.2).abs() < 0.01)


def test_subset_is_stratified_and_keeps_the_test_part_fixed(tmp_path: Path) -> None:
    full = create_splits(DataConfig(kind="digits", val_fraction=0.0), seed=0, base_dir=tmp_path)
    a = create_splits(DataConfig(kind="digits", val_fraction=0.0, subset=0.2), seed=0, base_dir=tmp_path)
    b = create_splits(DataConfig(kind="digits", val_fraction=0.0, subset=0.2), seed=1, base_dir=tmp_path)
    assert len(a.train) == round(0.2 * len(full.train)) and len(a.test) == round(0.2 * len(full.test))
    shares = torch.bincount(a.train.labels, minlength=10) / torch.bincount(full.train.labels, minlength=10)
    assert torch.all((shares - 0.2).abs() < 0.02), shares
    assert not torch.equal(a.train.labels, b.train.labels) or not torch.equal(a.train.images, b.train.images)
    assert torch.equal(a.test.images, b.test.images), "the test subset must not depend on the run seed"
    with pytest.raises(ValueError):
        DataConfig(kind="digits", subset=1.0)


def test_val_fraction_zero_gives_no_val(tmp_path: Path) -> None:
    splits = create_splits(DataConfig(kind="synthetic", val_fraction=0.0), seed=0, base_dir=tmp_path)
    assert splits.val is None and len(splits.train) == 256
    assert splits.describe()["val"] is None


def test_mean_std_measured_on_final_train(tmp_path: Path) -> None:
    splits = create_splits(DataConfig(kind="synthetic", val_fraction=0.3), seed=0, base_dir=tmp_path)
    x = splits.train.images.double() / 255.0
    expected_mean = x.mean(dim=(0, 2, 3))
    expected_std = x.permute(1, 0, 2, 3).reshape(3, -1).std(dim=1, unbiased=False)
    assert torch.allclose(torch.tensor(splits.mean, dtype=torch.float64), expected_mean, atol=1e-9)
    assert torch.allclose(torch.tensor(splits.std, dtype=torch.float64), expected_std, atol=1e-9)


def test_channel_stats_of_constant_and_empty() -> None:
    mean, std = channel_stats(torch.full((4, 2, 3, 3), 51, dtype=torch.uint8))
    assert mean == pytest.approx((0.2, 0.2)) and std == pytest.approx((0.0, 0.0))
    with pytest.raises(DataError):
        channel_stats(torch.empty((0, 1, 2, 2), dtype=torch.uint8))


def test_describe_is_json_ready(tmp_path: Path) -> None:
    splits = create_splits(DataConfig(kind="digits"), seed=0, base_dir=tmp_path)
    info = splits.describe()
    json.dumps(info)
    assert info["num_classes"] == 10 == splits.num_classes
    assert (info["train"], info["val"], info["test"]) == (len(splits.train), len(splits.val or []), len(splits.test))
    assert info["in_chans"] == 1 and info["image_size"] == 16 and len(info["mean"]) == 1
    assert isinstance(splits, Splits)


def test_tensor_split_validates() -> None:
    images = torch.zeros((3, 1, 4, 4), dtype=torch.uint8)
    split = TensorSplit(images, torch.arange(3))
    assert len(split) == 3 and len(split.select(torch.tensor([0, 2]))) == 2
    with pytest.raises(ValueError, match="uint8"):
        TensorSplit(images.float(), torch.arange(3))
    with pytest.raises(ValueError, match="int64"):
        TensorSplit(images, torch.arange(3).int())
    with pytest.raises(ValueError, match="labels"):
        TensorSplit(images, torch.arange(2))


def test_resolve_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_root(DataConfig(kind="digits"), tmp_path) is None
    cfg = DataConfig(kind="imagefolder", root=Path("data/x.tar.gz"))
    assert resolve_root(cfg, tmp_path) == tmp_path / "data" / "x.tar.gz"
    assert resolve_root(cfg.model_copy(update={"root": Path("/abs/x")}), tmp_path) == Path("/abs/x")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_root(cfg.model_copy(update={"root": Path("~/d")}), Path("/elsewhere")) == tmp_path / "d"
    with pytest.raises(DataError, match=r"data.root 'data/x.tar.gz' does not exist"):
        resolve_root(cfg, tmp_path, must_exist=True)


def test_derive_seed_is_stable_and_separates_purposes() -> None:
    assert derive_seed(0, "shuffle", 1) == derive_seed(0, "shuffle", 1)
    assert len({derive_seed(0, "shuffle", 1), derive_seed(0, "augment", 1), derive_seed(1, "shuffle", 0)}) == 3
    assert 0 <= derive_seed(2**40, "x") < 2**63


def test_data_identity_follows_the_files(tmp_path: Path) -> None:
    """The fingerprint's view of data.root: None for bundled data, the CIFAR batch files (not their neighbours),
    and a change in one file's content changes it."""
    assert data_identity(DataConfig(kind="digits"), tmp_path) is None
    assert data_identity(DataConfig(kind="cifar10", root=Path("nowhere")), tmp_path) == f"missing:{tmp_path}/nowhere"

    batches = tmp_path / "data" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    (batches / "data_batch_1").write_bytes(b"a" * 10)
    cfg = DataConfig(kind="cifar10", root=Path("data"))
    first = data_identity(cfg, tmp_path)
    (tmp_path / "data" / "unrelated.bin").write_bytes(b"x")  # beside the batches folder: not part of the dataset
    assert data_identity(cfg, tmp_path) == first
    (batches / "data_batch_1").write_bytes(b"b" * 11)
    assert data_identity(cfg, tmp_path) != first
    assert data_identity(DataConfig(kind="cifar10", root=batches), tmp_path) == data_identity(cfg, tmp_path)
