"""The teacher stage's three weight sources: a local checkpoint, pretrained hub weights, training here."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kdpipe.stages  # noqa: F401
from kdpipe.config import load_config
from kdpipe.errors import ConfigError, DataError
from kdpipe.models.factory import create_model
from kdpipe.models.weights import save_weights
from kdpipe.pipeline.runner import Runner
from tests.conftest import TINY

TRAIN = "weights: {train: {epochs: 2, batch_size: 32, lr: 0.05}}"


def teacher_only(text: str) -> str:
    return text[: text.index("  distill:")]


def test_teacher_from_local_checkpoint(write_config: Callable[..., Path], tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = create_model("resnet8", num_classes=4, in_chans=3)
    save_weights(model, tmp_path / "teacher.safetensors")
    cfg = write_config(teacher_only(TINY.replace(TRAIN, "weights: {checkpoint: teacher.safetensors}")))
    summary = Runner(load_config(cfg), tmp_path / "run").run()
    assert summary.stages[0].status == "ran"
    saved = load_file(tmp_path / "run" / "teacher" / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_teacher_fine_tuned_from_checkpoint(write_config: Callable[..., Path], tmp_path: Path) -> None:
    model = create_model("resnet8", num_classes=4, in_chans=3)
    save_weights(model, tmp_path / "teacher.safetensors")
    weights = "weights: {checkpoint: teacher.safetensors, train: {epochs: 1, batch_size: 32}}"
    cfg = write_config(teacher_only(TINY.replace(TRAIN, weights)))
    Runner(load_config(cfg), tmp_path / "run").run()
    saved = load_file(tmp_path / "run" / "teacher" / "model.safetensors")
    assert not torch.equal(saved["conv1.weight"], model.state_dict()["conv1.weight"])


def test_checkpoint_of_another_architecture_is_a_clear_error(write_config: Callable[..., Path], tmp_path: Path) -> None:
    # (a head of another class count is adapted: tests/stages/test_pretrained.py)
    save_weights(create_model("resnet20", num_classes=4, in_chans=3), tmp_path / "teacher.safetensors")
    cfg = write_config(teacher_only(TINY.replace(TRAIN, "weights: {checkpoint: teacher.safetensors}")))
    with pytest.raises(DataError, match="saved from 'resnet20'"):
        Runner(load_config(cfg), tmp_path / "run").run()


def test_pretrained_without_published_weights(write_config: Callable[..., Path], tmp_path: Path) -> None:
    cfg = write_config(teacher_only(TINY.replace(TRAIN, "weights: {pretrained: true}")))
    with pytest.raises(ConfigError, match="no published pretrained weights"):
        Runner(load_config(cfg), tmp_path / "run").run()


def test_pretrained_and_checkpoint_are_exclusive(write_config: Callable[..., Path], tmp_path: Path) -> None:
    (tmp_path / "t.safetensors").write_bytes(b"")
    cfg = write_config(teacher_only(TINY.replace(TRAIN, "weights: {pretrained: true, checkpoint: t.safetensors}")))
    with pytest.raises(ConfigError, match="either pretrained: true or checkpoint"):
        load_config(cfg)
