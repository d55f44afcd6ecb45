"""imagefolder: folder and tar layouts, class order, tar/folder safety, error messages and the tensor cache."""

from __future__ import annotations

import io
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdpipe.config import DataConfig
from kdpipe.data import create_splits, load_source
from kdpipe.data import imagefolder as imagefolder_module
from kdpipe.errors import DataError

LAYOUT = {"train": {"dog": 3, "cat": 2, "zebra": 2}, "test": {"cat": 1, "dog": 2}}


def _png(value: int, size: tuple[int, int] = (8, 8)) -> bytes:
    """A lossless image whose every pixel is (value, value // 2, 255 - value), so tests can read labels back."""
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    pixels[:] = (value, value // 2, 255 - value)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def make_tree(root: Path, layout: dict[str, dict[str, int]] = LAYOUT, size: tuple[int, int] = (8, 8)) -> Path:
    """Write ``layout`` as ``split/class/NN.png``; pixel value encodes (class position * 10 + image number)."""
    for split, classes in layout.items():
        for c, (name, count) in enumerate(sorted(classes.items())):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                (folder / f"{i:02d}.png").write_bytes(_png(c * 10 + i, size))
    return root


def make_tar(folder: Path, archive: Path, *, arc_prefix: str = "") -> Path:
    with tarfile.open(archive, "w:gz" if archive.name.endswith("gz") else "w") as tar:
        for path in sorted(folder.rglob("*"), reverse=True):  # reversed: archive order must not matter
            tar.add(path, arcname=arc_prefix + str(path.relative_to(folder)), recursive=False)
    return archive


def load(root: Path, **kwargs: object) -> object:
    cfg = DataConfig(kind="imagefolder", root=root, val_fraction=0.0, **kwargs)  # type: ignore[arg-type]
    return create_splits(cfg, seed=0, base_dir=root.parent)


def test_folder_layout_classes_and_order(tmp_path: Path) -> None:
    splits = load(make_tree(tmp_path / "ds"))
    assert splits.classes == ["cat", "dog", "zebra"]  # sorted folder names, not creation order
    assert splits.train.labels.tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert splits.test.labels.tolist() == [0, 1, 1]  # test lacks zebra; labels follow train's list
    assert splits.train.images.shape == (7, 3, 8, 8) and splits.image_size == 8 and splits.in_chans == 3
    # Within a class, files are in path order: pixel value = class * 10 + file number.
    assert splits.train.images[:, 0, 0, 0].tolist() == [0, 1, 10, 11, 12, 20, 21]


@pytest.mark.parametrize("name", ["ds.tar", "ds.tar.gz", "ds.tgz"])
def test_tar_matches_folder(tmp_path: Path, name: str) -> None:
    folder = make_tree(tmp_path / "ds")
    from_folder = load(folder)
    from_tar = load(make_tar(folder, tmp_path / name))
    assert from_tar.classes == from_folder.classes
    assert torch.equal(from_tar.train.images, from_folder.train.images)
    assert torch.equal(from_tar.test.labels, from_folder.test.labels)


def test_wrapper_folder_val_split_and_ignored_files(tmp_path: Path) -> None:
    folder = make_tree(tmp_path / "src" / "mydata", {"train": {"a": 2, "b": 2}, "val": {"b": 1}})
    (folder / "README.txt").write_text("not an image")
    (folder / "train" / "a" / "notes.csv").write_text("x")
    (folder / "train" / "a" / "._00.png").write_bytes(b"macOS resource fork, not an image")
    (folder / "train" / ".DS_Store").write_bytes(b"\0\0")
    (folder / "train" / "stray.png").write_bytes(_png(1))  # not inside a class folder
    archive = make_tar(tmp_path / "src", tmp_path / "wrapped.tar.gz", arc_prefix="./")
    for root in (tmp_path / "src", archive):
        splits = load(root)
        assert splits.classes == ["a", "b"] and (len(splits.train), len(splits.test)) == (4, 1)


def test_native_size_and_resize(tmp_path: Path) -> None:
    folder = make_tree(tmp_path / "ds", size=(12, 8))
    with pytest.raises(DataError, match="not square"):
        load(folder)
    splits = load(folder, image_size=6)
    assert splits.train.images.shape[1:] == (3, 6, 6) and splits.image_size == 6
    mixed = make_tree(tmp_path / "mixed")
    (mixed / "train" / "cat" / "big.png").write_bytes(_png(5, (16, 16)))
    with pytest.raises(DataError, match="image_size"):
        load(mixed)


def test_grayscale_and_rgba_become_rgb(tmp_path: Path) -> None:
    folder = make_tree(tmp_path / "ds")
    Image.new("L", (8, 8), 100).save(folder / "train" / "cat" / "gray.png")
    Image.new("RGBA", (8, 8), (1, 2, 3, 4)).save(folder / "train" / "dog" / "rgba.png")
    splits = load(folder)
    assert splits.train.images.shape == (9, 3, 8, 8)


# --- errors --------------------------------------------------------------------------------------------------------


def test_missing_root_names_path_and_field(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load(tmp_path / "nope.tar.gz")
    assert "data.root" in str(info.value) and "nope.tar.gz" in str(info.value)


def test_no_train_folder_says_what_was_found(tmp_path: Path) -> None:
    folder = make_tree(tmp_path / "ds", {"training": {"a": 1}, "testing": {"a": 1}})
    with pytest.raises(DataError, match=r"no train/ folder.*found at the top level: testing, training"):
        load(folder)


def test_no_test_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no test/ or val/"):
        load(make_tree(tmp_path / "ds", {"train": {"a": 1}}))


def test_no_classes_and_empty_class(tmp_path: Path) -> None:
    folder = make_tree(tmp_path / "ds", {"test": {"a": 1}})
    (folder / "train").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load(folder)
    (folder / "train" / "a").mkdir()
    (folder / "train" / "b").mkdir()
    (folder / "train" / "a" / "x.png").write_bytes(_png(0))
    with pytest.raises(DataError, match=r"without images.*train/b"):
        load(folder)


def test_test_classes_must_be_subset(tmp_path: Path) -> None:
    folder = make_tree(tmp_path / "ds", {"train": {"a": 1}, "test": {"a": 1, "q": 1}})
    with pytest.raises(DataError, match="classes that train/ lacks: q"):
        load(folder)


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    folder = make_tree(tmp_path / "ds")
    (folder / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(DataError, match=r"cannot decode image .*broken\.jpg"):
        load(folder)
    archive = make_tar(folder, tmp_path / "ds.tar")
    with pytest.raises(DataError, match=r"ds\.tar:train/dog/broken\.jpg"):
        load(archive)


def test_not_an_archive(tmp_path: Path) -> None:
    bogus = tmp_path / "data.zip"
    bogus.write_bytes(b"PK")
    with pytest.raises(DataError, match="neither a folder nor"):
        load(bogus)
    fake = tmp_path / "fake.tar.gz"
    fake.write_bytes(b"this is not gzip")
    with pytest.raises(DataError, match="not a readable tar"):
        load(fake)


# --- tar and folder safety -----------------------------------------------------------------------------------------


def _evil_tar(tmp_path: Path, add_bad: object) -> Path:
    """A valid dataset archive plus one member added by ``add_bad(tar)``."""
    folder = make_tree(tmp_path / "good")
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        for path in sorted(folder.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(folder)), recursive=False)
        add_bad(tar)  # type: ignore[operator]
    return archive


def _file_member(name: str) -> tuple[tarfile.TarInfo, io.BytesIO]:
    data = _png(3)
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, io.BytesIO(data)


def _special_member(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        (lambda tar: tar.addfile(*_file_member("/tmp/abs.png")), "absolute path"),
        (lambda tar: tar.addfile(*_file_member("train/cat/../../../escape.png")), r"'\.\.'"),
        (lambda tar: tar.addfile(_special_member("train/cat/s.png", tarfile.SYMTYPE, "/etc/passwd")), "link"),
        (lambda tar: tar.addfile(_special_member("train/cat/h.png", tarfile.LNKTYPE, "train/cat/00.png")), "link"),
        (lambda tar: tar.addfile(_special_member("train/cat/dev.png", tarfile.CHRTYPE)), "device"),
        (lambda tar: tar.addfile(_special_member("train/cat/blk", tarfile.BLKTYPE)), "device"),
        (lambda tar: tar.addfile(_special_member("train/fifo", tarfile.FIFOTYPE)), "FIFO"),
        (lambda tar: tar.addfile(_special_member(".hidden/link", tarfile.SYMTYPE, "/")), "link"),
    ],
    ids=["absolute", "dotdot", "symlink", "hardlink", "chardev", "blockdev", "fifo", "hidden-symlink"],
)
def test_unsafe_tar_members_are_refused(tmp_path: Path, member: object, reason: str) -> None:
    archive = _evil_tar(tmp_path, member)
    with pytest.raises(DataError, match=rf"archive .*evil\.tar has an unsafe member .*{reason}"):
        load(archive)


def test_folder_symlinks(tmp_path: Path) -> None:
    folder = make_tree(tmp_path / "ds")
    outside = tmp_path / "outside.png"
    outside.write_bytes(_png(9))
    (folder / "train" / "cat" / "inside.png").symlink_to(folder / "train" / "cat" / "00.png")
    assert len(load(folder).train) == 8  # a link that stays inside the root is followed
    (folder / "train" / "cat" / "escape.png").symlink_to(outside)
    with pytest.raises(DataError, match=r"outside data\.root"):
        load(folder)


def test_folder_symlink_loop_and_root_symlink(tmp_path: Path) -> None:
    folder = make_tree(tmp_path / "ds")
    (folder / "train" / "cat" / "loop").symlink_to(folder / "train")
    linked_root = tmp_path / "link-to-ds"
    linked_root.symlink_to(folder)
    assert len(load(linked_root).train) == 7  # the root itself may be a link; the loop is not descended twice


def test_folder_fifo_is_refused(tmp_path: Path) -> None:
    folder = make_tree(tmp_path / "ds")
    os.mkfifo(folder / "train" / "cat" / "pipe.png")
    with pytest.raises(DataError, match="FIFO"):
        load(folder)


# --- cache ---------------------------------------------------------------------------------------------------------


def _cache_files(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / "data").glob("*.pt"))


def test_cache_is_reused_rebuilt_when_corrupt_and_pruned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache_dir = tmp_path / "cache"
    archive = make_tar(make_tree(tmp_path / "ds"), tmp_path / "ds.tar.gz")
    cfg = DataConfig(kind="imagefolder", root=archive, cache_dir=cache_dir)
    first = load_source(cfg, archive, cache_dir=cache_dir)
    (cached,) = _cache_files(cache_dir)
    assert not list((cache_dir / "data").glob(".*tmp"))  # the temporary file was renamed, not left behind

    real_build = imagefolder_module.build_imagefolder

    def no_build(*args: object, **kwargs: object) -> object:
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(imagefolder_module, "build_imagefolder", no_build)
    again = load_source(cfg, archive, cache_dir=cache_dir)
    assert torch.equal(again.train_images, first.train_images) and again.classes == first.classes

    # Flip bytes in the middle of the file: the checksum (or the zip reader) must catch it and rebuild.
    raw = bytearray(cached.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 64] = bytes(64)
    cached.write_bytes(bytes(raw))
    monkeypatch.setattr(imagefolder_module, "build_imagefolder", real_build)
    rebuilt = load_source(cfg, archive, cache_dir=cache_dir)
    assert torch.equal(rebuilt.train_images, first.train_images)

    # Truncated file: rebuilt too.
    cached.write_bytes(cached.read_bytes()[:100])
    assert torch.equal(load_source(cfg, archive, cache_dir=cache_dir).test_images, first.test_images)

    # A changed archive gets a new key; the stale file of the same source is removed.
    make_tree(tmp_path / "ds", {"train": {"cat": 4}})
    make_tar(tmp_path / "ds", archive)
    os.utime(archive, ns=(1, 1))
    changed = load_source(cfg, archive, cache_dir=cache_dir)
    assert len(changed.train_images) == 9
    assert len(_cache_files(cache_dir)) == 1 and _cache_files(cache_dir)[0] != cached


def test_folder_cache_key_follows_listing(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    folder = make_tree(tmp_path / "ds")
    cfg = DataConfig(kind="imagefolder", root=folder, cache_dir=cache_dir)
    assert len(load_source(cfg, folder, cache_dir=cache_dir).train_images) == 7
    (folder / "train" / "cat" / "new.png").write_bytes(_png(7))
    assert len(load_source(cfg, folder, cache_dir=cache_dir).train_images) == 8


def test_relative_cache_dir_and_unwritable_cache(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = make_tree(tmp_path / "ds")
    cfg = DataConfig(kind="imagefolder", root=Path("ds"), cache_dir=Path("kdcache"), val_fraction=0.0)
    create_splits(cfg, seed=0, base_dir=tmp_path)
    assert len(_cache_files(tmp_path / "kdcache")) == 1  # resolved against the stages.yaml folder
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING):
        splits = create_splits(cfg.model_copy(update={"cache_dir": blocker}), seed=0, base_dir=tmp_path)
    assert len(splits.train) == 7 and "continuing without it" in caplog.text
    assert folder.exists()
