"""Streaming imagefolder data on real images (scikit-learn's digits as PNGs): FileSplit lists and decodes what the
in-memory imagefolder loader holds, and StreamLoader yields BatchLoader's batches bit for bit."""

from __future__ import annotations

import itertools
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdpipe.config import DataConfig
from kdpipe.data import BatchLoader, Splits, create_splits
from kdpipe.data.stream import FileSplit, StreamLoader, build_file_splits
from kdpipe.errors import DataError

Batches = list[tuple[torch.Tensor, torch.Tensor]]
SIZE = 16  # digits are 8x8: decoding fits (resizes) them, as real datasets need


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 train + 50 test digits as PNGs in train/<class>/ and test/<class>/ (names not in label order)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.clip(np.round(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    root = tmp_path_factory.mktemp("digits") / "digits"
    for i in range(250):
        split = "train" if i < 200 else "test"
        folder = root / split / f"class_{bunch.target[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[i]).save(folder / f"{(i * 7919) % 1000:03d}.png")
    return root


@pytest.fixture(scope="module")
def plain_tar(folder: Path) -> Path:
    archive = folder.parent / "digits.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(folder, arcname="digits")  # wrapped in one top-level folder, as real archives are
    return archive


@pytest.fixture(scope="module")
def memory(folder: Path) -> Splits:
    """The in-memory imagefolder loader's view of the same folder, at the same size."""
    cache = folder.parent / "cache"
    cfg = DataConfig(kind="imagefolder", root=folder, image_size=SIZE, val_fraction=0.0, cache_dir=cache)
    return create_splits(cfg, seed=0, base_dir=folder.parent)


@pytest.fixture(scope="module", params=["folder", "tar"])
def stream(request: pytest.FixtureRequest, folder: Path, plain_tar: Path) -> tuple[FileSplit, FileSplit, list[str]]:
    return build_file_splits(folder if request.param == "folder" else plain_tar, SIZE)


def _same(a: Batches, b: Batches) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(a, b, strict=True)
    )


def _loaders(memory: Splits, train: FileSplit, **kwargs: object) -> tuple[BatchLoader, StreamLoader]:
    options: dict[str, object] = {"batch_size": 32, "mean": memory.mean, "std": memory.std, "train": True, "seed": 3}
    options.update(kwargs)
    workers = options.pop("workers", 0)
    return BatchLoader(memory.train, **options), StreamLoader(train, workers=workers, **options)  # type: ignore[arg-type]


def test_listing_and_decoding_match_the_memory_loader(
    stream: tuple[FileSplit, FileSplit, list[str]], memory: Splits
) -> None:
    train, test, classes = stream
    assert classes == memory.classes == [f"class_{d}" for d in range(10)]
    assert torch.equal(train.labels, memory.train.labels) and torch.equal(test.labels, memory.test.labels)
    assert (len(train), len(test), train.image_size, train.in_chans) == (200, 50, SIZE, 3)
    assert torch.equal(train.load(torch.arange(200)), memory.train.images)
    assert torch.equal(test.load(range(50)), memory.test.images)
    part = torch.tensor([5, 0, 199, 17])
    picked = train.select(part)
    assert torch.equal(picked.load(range(4)), memory.train.select(part).images)
    assert torch.equal(picked.labels, memory.train.labels[part])
    assert train.load([]).shape == (0, 3, SIZE, SIZE)
    mask = memory.train.labels == 3  # a bool mask and negative indices select as they do on a TensorSplit
    assert torch.equal(train.select(mask).load([0, -1]), memory.train.select(mask).images[[0, -1]])
    clone = pickle.loads(pickle.dumps(picked))  # what spawn / forkserver workers receive
    assert torch.equal(clone.load(range(4)), memory.train.images[part])


def test_native_size_without_image_size(plain_tar: Path) -> None:
    train, _, _ = build_file_splits(plain_tar)
    assert (train.image_size, train.resize, tuple(train.load([0]).shape)) == (8, False, (1, 3, 8, 8))


@pytest.mark.parametrize(("workers", "augment"), [(0, "cifar"), (2, "cifar"), (0, "imagenet")])
def test_batches_are_bit_identical_to_batch_loader(
    stream: tuple[FileSplit, FileSplit, list[str]], memory: Splits, workers: int, augment: str
) -> None:
    train, test, _ = stream
    reference, streamed = _loaders(memory, train, augment=augment, workers=workers)
    assert len(streamed) == len(reference) == 7 and streamed.num_samples == 200  # 6 x 32 + 8
    for epoch in (0, 1):
        reference.set_epoch(epoch)
        streamed.set_epoch(epoch)
        assert torch.equal(streamed.order(), reference.order())
        assert _same(list(streamed), list(reference))
    ref_eval = BatchLoader(memory.test, batch_size=16, mean=memory.mean, std=memory.std, train=False)
    eval_ = StreamLoader(test, batch_size=16, mean=memory.mean, std=memory.std, train=False, workers=workers)
    assert _same(list(eval_), list(ref_eval)) and len(eval_) == 4
    reference, streamed = _loaders(memory, train, augment=augment, batch_size=199)  # the 1-sample tail is dropped
    assert len(streamed) == len(reference) == 1 and _same(list(streamed), list(reference))


def test_resume_is_the_tail_of_a_full_iteration(stream: tuple[FileSplit, FileSplit, list[str]], memory: Splits) -> None:
    _, streamed = _loaders(memory, stream[0], augment="cifar", workers=2, batch_size=24)
    streamed.set_epoch(1)
    full = list(streamed)
    list(itertools.islice(iter(streamed), 2))  # an abandoned iteration must not disturb the next one
    assert _same(list(streamed.iter_from(3)), full[3:])
    assert list(streamed.iter_from(len(streamed))) == []
    streamed.set_epoch(0)
    assert _same([streamed.batch(1, 4)], full[4:5])  # decoded in this process, same batch
    with pytest.raises(ValueError, match="step must be"):
        streamed.iter_from(len(streamed) + 1)


@pytest.mark.parametrize("augment", ["cifar", "imagenet"])
def test_rank_shards_match_batch_loader_and_concatenate(
    stream: tuple[FileSplit, FileSplit, list[str]], memory: Splits, augment: str
) -> None:
    _, whole = _loaders(memory, stream[0], augment=augment)
    shards = []
    for rank in range(3):  # 32 = 11 + 11 + 10 per batch, the last batch of 8 = 3 + 3 + 2
        reference, streamed = _loaders(memory, stream[0], augment=augment, rank=rank, world_size=3)
        batches = list(streamed)
        assert _same(batches, list(reference))
        shards.append(batches)
    for k, (images, labels) in enumerate(whole):
        assert torch.equal(torch.cat([s[k][0] for s in shards]), images)
        assert torch.equal(torch.cat([s[k][1] for s in shards]), labels)


def test_compressed_archives_are_refused(folder: Path, tmp_path: Path) -> None:
    archive = tmp_path / "digits.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="digits")
    with pytest.raises(DataError, match="compressed archive") as info:
        build_file_splits(archive, SIZE)
    assert str(archive) in str(info.value) and "data.loader: memory" in str(info.value)
    disguised = tmp_path / "digits.tar"  # gzip data under a plain name: offsets would point into compressed bytes
    disguised.write_bytes(archive.read_bytes())
    with pytest.raises(DataError, match="compressed archive"):
        build_file_splits(disguised, SIZE)


def test_a_second_iteration_ends_the_first(stream: tuple[FileSplit, FileSplit, list[str]], memory: Splits) -> None:
    _, streamed = _loaders(memory, stream[0], workers=2)
    first = iter(streamed)
    next(first)
    second = list(streamed)  # restarts the persistent DataLoader iterator under `first`
    assert len(second) == len(streamed)
    with pytest.raises(RuntimeError, match="another iteration"):
        next(first)


def test_streamed_train_stats_are_cached(
    plain_tar: Path, memory: Splits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Measuring a streamed split's mean/std decodes every train image: it happens once per dataset identity and
    train selection, and the cached values are the in-memory loader's."""
    import os

    from kdpipe.data import splits as splits_module

    cfg = DataConfig(
        kind="imagefolder",
        root=plain_tar,
        image_size=SIZE,
        loader="stream",
        val_fraction=0.0,
        cache_dir=tmp_path,
        workers=0,
    )
    first = create_splits(cfg, seed=0, base_dir=tmp_path)
    assert first.mean == pytest.approx(memory.mean) and first.std == pytest.approx(memory.std)

    def no_decoding(*args: object) -> None:
        raise AssertionError("train images decoded again")

    with monkeypatch.context() as patch:
        patch.setattr(splits_module, "_uint8_batches", no_decoding)
        again = create_splits(cfg, seed=0, base_dir=tmp_path)
        assert (again.mean, again.std) == (first.mean, first.std)
        with pytest.raises(AssertionError, match="decoded again"):  # another train selection: measured anew
            create_splits(cfg.model_copy(update={"val_fraction": 0.2}), seed=0, base_dir=tmp_path)
        stat = plain_tar.stat()
        os.utime(plain_tar, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # the archive "changed"
        try:
            with pytest.raises(AssertionError, match="decoded again"):
                create_splits(cfg, seed=0, base_dir=tmp_path)
        finally:
            os.utime(plain_tar, ns=(stat.st_atime_ns, stat.st_mtime_ns))
