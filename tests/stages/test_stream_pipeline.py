"""``data.loader: stream`` through a whole pipeline: an imagefolder of real digits PNGs, read by DataLoader workers,
trains, distills, quantizes and checks parity exactly as the in-memory loader does — the same weights, bit for bit,
because both loaders cut, augment and normalise the same batches."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

import kdpipe.stages  # noqa: F401
from kdpipe.config import load_config
from kdpipe.errors import ConfigError, DataError
from kdpipe.pipeline.runner import Runner

CONFIG = """
name: stream
seed: 0
device: cpu
data: {{kind: imagefolder, root: {root}, image_size: 16, augment: crop, val_fraction: 0.1, loader: {loader},
        workers: {workers}}}
stages:
  teacher:
    type: teacher
    model: resnet8
    weights: {{train: {{epochs: 8, batch_size: 32, lr: 0.1}}}}
  distill:
    type: distill
    student: resnet8
    method: {{name: kd}}
    train: {{epochs: 6, batch_size: 32, lr: 0.05}}
  int8:
    type: export
    format: onnx-int8
    calibration_samples: 64
"""


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """400 train + 100 test scikit-learn digits as PNGs in train/<class>/, test/<class>/."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.clip(np.round(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    root = tmp_path_factory.mktemp("digits-folder") / "digits"
    for i in range(500):
        folder = root / ("train" if i < 400 else "test") / str(bunch.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[i]).save(folder / f"{i:04d}.png")
    return root


def _run(write_config: Callable[..., Path], out: Path, root: Path, loader: str, workers: int = 0) -> Path:
    text = CONFIG.format(root=root, loader=loader, workers=workers)
    Runner(load_config(write_config(text, name=f"{loader}.yaml")), out).run()
    return out


def test_streamed_run_gives_the_in_memory_run_weights(
    digits_folder: Path, write_config: Callable[..., Path], tmp_path: Path
) -> None:
    memory = _run(write_config, tmp_path / "memory", digits_folder, "memory")
    archive = digits_folder.parent / "digits.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(digits_folder, arcname="digits")
    streamed = _run(write_config, tmp_path / "stream", archive, "stream", workers=2)
    for stage in ("teacher", "distill"):
        a, b = load_file(memory / stage / "model.safetensors"), load_file(streamed / stage / "model.safetensors")
        assert a.keys() == b.keys()
        assert all((a[k] == b[k]).all() for k in a), f"{stage} weights differ"
    parity = [json.loads((run / "int8" / "parity.json").read_text()) for run in (memory, streamed)]
    assert parity[0]["export_top1"] == parity[1]["export_top1"] and parity[0]["num_samples"] == 100
    assert json.loads((streamed / "distill" / "result.json").read_text())["metrics"]["top1"] > 0.6


def test_stream_needs_an_imagefolder_and_refuses_a_compressed_archive(
    digits_folder: Path, write_config: Callable[..., Path], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="loader: stream is for kind imagefolder"):
        load_config(write_config("name: x\ndata: {kind: digits, loader: stream}\nstages: {}\n", name="bad.yaml"))
    archive = digits_folder.parent / "digits.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(digits_folder, arcname="digits")
    with pytest.raises(DataError, match="compressed archive"):
        _run(write_config, tmp_path / "gz", archive, "stream")
    assert not (tmp_path / "gz" / "teacher").exists()  # refused before any stage ran
