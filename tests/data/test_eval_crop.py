"""data.crop_pct and data.interpolation: test images get timm's evaluation transform (short side resized to
floor(size / crop_pct), centre crop), train images the short-side fit, both with the chosen filter; unset, they follow
the pretrained student (else teacher), and bad combinations are refused naming the field.

Pixels are compared with timm's own eval transform on a real photograph (scikit-learn's bundled sample images)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import timm
import timm.data
import torch
from PIL import Image
from pydantic import ValidationError
from sklearn.datasets import load_sample_image

import kdpipe.stages  # noqa: F401  (registers the stage types configs name)
from kdpipe.config import DataConfig, load_config
from kdpipe.data import create_splits
from kdpipe.data.imagefolder import Fit, decode_image
from kdpipe.errors import ConfigError
from kdpipe.pipeline.normalization import resolve_preprocessing


def _jpeg(name: str, box: tuple[int, int, int, int] | None = None) -> bytes:
    image = Image.fromarray(load_sample_image(name))
    if box is not None:
        image = image.crop(box)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _timm_eval(data: bytes, size: int, crop_pct: float, interpolation: str) -> np.ndarray:
    """timm's eval transform (Resize + CenterCrop + ToTensor, normalisation off) as uint8 HWC."""
    transform = timm.data.create_transform(
        size, is_training=False, crop_pct=crop_pct, interpolation=interpolation, mean=(0, 0, 0), std=(1, 1, 1)
    )
    with Image.open(io.BytesIO(data)) as image:
        tensor = transform(image.convert("RGB"))
    return (tensor * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


@pytest.mark.parametrize(("crop_pct", "interpolation"), [(0.875, "bicubic"), (0.9, "bilinear"), (0.95, "bicubic")])
def test_eval_fit_is_timms_eval_transform(crop_pct: float, interpolation: str) -> None:
    data = _jpeg("china.jpg")  # 640 x 427: the short side is resized, the long one cropped
    ours = decode_image(data, "china.jpg", Fit(64, crop_pct, interpolation))
    assert ours.shape == (64, 64, 3)
    np.testing.assert_array_equal(ours, _timm_eval(data, 64, crop_pct, interpolation))
    whole = decode_image(data, "china.jpg", Fit(64, 1.0, interpolation))
    assert np.abs(ours.astype(int) - whole.astype(int)).mean() > 2  # the crop really cuts the border off


def _folder(root: Path) -> Path:
    """Two classes of real photo crops (non-square), 2 train and 1 test image each."""
    boxes = [(0, 0, 300, 200), (100, 50, 400, 427), (300, 0, 640, 300)]
    for c, name in enumerate(("china.jpg", "flower.jpg")):
        for i, box in enumerate(boxes):
            folder = root / ("train" if i < 2 else "test") / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i}.jpg").write_bytes(_jpeg(name, box))
    return root


def test_test_split_is_cropped_train_split_fitted_in_memory_and_streamed(tmp_path: Path) -> None:
    root = _folder(tmp_path / "images")
    base = {"kind": "imagefolder", "root": root, "image_size": 32, "val_fraction": 0.0, "cache_dir": tmp_path / "c"}
    splits = create_splits(DataConfig(**base, crop_pct=0.875, interpolation="bicubic"), seed=0, base_dir=tmp_path)
    assert (splits.crop_pct, splits.interpolation) == (0.875, "bicubic")
    test_files = sorted((root / "test").rglob("*.jpg"))
    train_files = sorted((root / "train").rglob("*.jpg"))
    for k, path in enumerate(test_files):
        expected = _timm_eval(path.read_bytes(), 32, 0.875, "bicubic")
        np.testing.assert_array_equal(splits.test.load(torch.tensor([k]))[0].permute(1, 2, 0).numpy(), expected)
    for k, path in enumerate(train_files):
        expected = decode_image(path.read_bytes(), path.name, Fit(32, 1.0, "bicubic"))
        np.testing.assert_array_equal(splits.train.load(torch.tensor([k]))[0].permute(1, 2, 0).numpy(), expected)
    # The defaults decode the test split differently: a cached decode of the other crop is never reused.
    plain = create_splits(DataConfig(**base), seed=0, base_dir=tmp_path)
    assert (plain.crop_pct, plain.interpolation) == (1.0, "bilinear")
    assert not torch.equal(plain.test.load(torch.arange(2)), splits.test.load(torch.arange(2)))
    assert not torch.equal(plain.train.load(torch.arange(4)), splits.train.load(torch.arange(4)))
    streamed = create_splits(
        DataConfig(**base, crop_pct=0.875, interpolation="bicubic", loader="stream", workers=0),
        seed=0,
        base_dir=tmp_path,
    )
    assert torch.equal(streamed.test.load(torch.arange(2)), splits.test.load(torch.arange(2)))
    assert torch.equal(streamed.train.load(torch.arange(4)), splits.train.load(torch.arange(4)))


def test_crop_and_filter_are_for_resized_imagefolder_data(write_config: Callable[..., Path], tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"data.crop_pct is for kind imagefolder"):
        DataConfig(kind="digits", crop_pct=0.9)
    with pytest.raises(ValidationError, match=r"data.interpolation is for kind imagefolder"):
        DataConfig(kind="digits", interpolation="bicubic")
    with pytest.raises(ValidationError, match="crop_pct"):
        DataConfig(kind="imagefolder", root=tmp_path, crop_pct=1.5)
    _folder(tmp_path / "images")
    text = IMAGEFOLDER.replace("image_size: 32, ", "crop_pct: 0.9, ").replace(
        "TEACHER_WEIGHTS", "weights: {train: {epochs: 1}}"
    )
    text = text.replace("STUDENT_WEIGHTS", "")
    with pytest.raises(ConfigError, match=r"data.image_size is unset and no pretrained network gives an input size"):
        resolve_preprocessing(load_config(write_config(text)))


IMAGEFOLDER = """\
version: 1
name: crops
data: {kind: imagefolder, root: images, image_size: 32, val_fraction: 0.0}
stages:
  teacher:
    type: teacher
    model: resnet10t
    TEACHER_WEIGHTS
  distill:
    type: distill
    student: resnet10t
    STUDENT_WEIGHTS
    method: {name: kd}
    train: {epochs: 1}
"""


def _hub(path: Path, crop_pct: float, interpolation: str) -> Path:
    """A timm hub folder's config.json (all that resolving the preprocessing reads; the weights are never loaded)."""
    path.mkdir(parents=True)
    cfg = {"crop_pct": crop_pct, "interpolation": interpolation, "input_size": [3, 32, 32]}
    (path / "config.json").write_text(
        json.dumps({"architecture": "resnet10t", "num_classes": 2, "pretrained_cfg": cfg})
    )
    return path


def test_unset_crop_and_filter_follow_the_pretrained_student(write_config: Callable[..., Path], tmp_path: Path) -> None:
    _hub(tmp_path / "teacher-hub", 0.95, "bilinear")
    _hub(tmp_path / "student-hub", 0.875, "bicubic")
    teacher = "weights: {checkpoint: teacher-hub, train: {epochs: 1}}"
    student = "student_weights: {checkpoint: student-hub}"
    both = IMAGEFOLDER.replace("TEACHER_WEIGHTS", teacher).replace("STUDENT_WEIGHTS", student)
    pre = resolve_preprocessing(load_config(write_config(both)))
    assert (pre.crop_pct, pre.interpolation) == (0.875, "bicubic")  # the deployed student's, not the teacher's
    only_teacher = IMAGEFOLDER.replace("TEACHER_WEIGHTS", teacher).replace("STUDENT_WEIGHTS", "")
    pre = resolve_preprocessing(load_config(write_config(only_teacher, "teacher.yaml")))
    assert (pre.crop_pct, pre.interpolation) == (0.95, "bilinear")
    chosen = both.replace("val_fraction: 0.0", "val_fraction: 0.0, crop_pct: 1.0")
    pre = resolve_preprocessing(load_config(write_config(chosen, "chosen.yaml")))
    assert pre.crop_pct is None and pre.interpolation == "bicubic"  # the config's own value stays
    assert pre.data_updates() == {"interpolation": "bicubic"}
    # Two pretrained students of the same run that disagree: the config must pick.
    _hub(tmp_path / "other-hub", 0.9, "bicubic")
    two = both + "  second:\n    type: distill\n    student: resnet10t\n    student_weights: {checkpoint: other-hub}\n"
    two += "    method: {name: kd}\n    train: {epochs: 1}\n"
    with pytest.raises(ConfigError, match=r"expect different evaluation crops: .*crop_pct 0.875; .*crop_pct 0.9") as e:
        resolve_preprocessing(load_config(write_config(two, "two.yaml")))
    assert "set data.crop_pct" in (e.value.hint or "")
