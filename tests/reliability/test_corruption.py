"""Damaged files in a run directory: truncated or bit-flipped stage outputs (model.safetensors, model.onnx),
edited result.json and run.lock.json, a garbage pid file, and a damaged training checkpoint. Each is detected (by
the hashes in run.lock.json, or the checkpoint's CRC-32s) and rebuilt; nothing damaged is ever used: the rebuilt
run ends with the reference run's weights, bit for bit."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kdpipe.models.factory import create_model
from tests.reliability._support import (
    STAGES,
    TEACHER_FROM_CHECKPOINT,
    TRAINED_STAGES,
    assert_consistent,
    assert_same_weights,
    checkpoint_epoch,
    error_lines,
    flip_byte,
    flip_zip_tensor_byte,
    last_run_events,
    mentions,
    result_of,
    run_cli,
    truncate,
)


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _bump_metric(data: dict) -> None:
    data["metrics"]["top1"] = 0.999  # a plausible, valid edit: only the hash can tell


def _forge_onnx_hash(data: dict) -> None:
    data["stages"]["onnx"]["outputs"]["model.onnx"] = "0" * 64


DOWNSTREAM = {"teacher": set(STAGES), "distill": {"distill", "onnx", "bench"}, "onnx": {"onnx", "bench"}}

slow = pytest.mark.slow

# (file in the run directory, damage, stages that must rerun); the default suite runs one of each file kind
OUTPUT_DAMAGE = [
    pytest.param("teacher/model.safetensors", flip_byte, DOWNSTREAM["teacher"], id="teacher-weights-bitflip"),
    pytest.param(
        "teacher/model.safetensors", truncate, DOWNSTREAM["teacher"], id="teacher-weights-truncated", marks=slow
    ),
    pytest.param(
        "distill/model.safetensors", flip_byte, DOWNSTREAM["distill"], id="student-weights-bitflip", marks=slow
    ),
    pytest.param("onnx/model.onnx", truncate, DOWNSTREAM["onnx"], id="onnx-truncated"),
    pytest.param("onnx/model.onnx", flip_byte, DOWNSTREAM["onnx"], id="onnx-bitflip", marks=slow),
    pytest.param(
        "distill/result.json", lambda p: _edit_json(p, _bump_metric), DOWNSTREAM["distill"], id="result-edited"
    ),
    pytest.param("bench/result.json", Path.unlink, {"bench"}, id="result-deleted", marks=slow),
    pytest.param("run.lock.json", truncate, set(STAGES), id="lock-truncated", marks=slow),
    pytest.param("run.lock.json", lambda p: _edit_json(p, _forge_onnx_hash), DOWNSTREAM["onnx"], id="lock-hash-edited"),
    pytest.param(".kdpipe.pid", lambda p: p.write_bytes(b"\x00garbage\xff"), set(), id="pid-file-garbage"),
]


@pytest.mark.parametrize(("rel", "damage", "rerun"), OUTPUT_DAMAGE)
def test_damaged_file_is_detected_and_rebuilt(
    reference: Path, tmp_path: Path, rel: str, damage: Callable[[Path], None], rerun: set[str]
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    config = reference.parent / "stages.yaml"
    damage(run_dir / rel)
    code, output = run_cli("run", config, "--out", run_dir, cwd=tmp_path)
    assert code == 0, output[-3000:]
    events = last_run_events(run_dir)
    assert {e["stage"] for e in events if e["event"] == "stage_start"} == rerun
    assert {e["stage"] for e in events if e["event"] == "stage_skip"} == set(STAGES) - rerun
    for stage in TRAINED_STAGES:
        assert_same_weights(reference / stage / "model.safetensors", run_dir / stage / "model.safetensors")
    assert (run_dir / "onnx" / "model.onnx").read_bytes() == (reference / "onnx" / "model.onnx").read_bytes()
    assert_consistent(run_dir)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(flip_zip_tensor_byte, id="tensor-bitflip"),
        pytest.param(truncate, id="truncated", marks=slow),
        pytest.param(flip_byte, id="middle-bitflip", marks=slow),
    ],
)
def test_damaged_training_checkpoint_is_not_resumed(
    interrupted: Path, reference: Path, tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    """torch.load does not check the zip's CRC-32s: a flipped bit in the weights loads fine. kdpipe checks them and
    trains from the start instead (with a warning naming the file), ending exactly where an intact run ends."""
    run_dir = tmp_path / "run"
    shutil.copytree(interrupted, run_dir)
    checkpoint = run_dir / "teacher" / "checkpoints" / "last.pt"
    damage(checkpoint)
    code, output = run_cli("run", reference.parent / "stages.yaml", "--out", run_dir, cwd=tmp_path)
    assert code == 0, output[-3000:]
    assert mentions(output, f"checkpoint {checkpoint}"), output[-3000:]
    assert result_of(run_dir, "teacher")["info"]["resumed_from"] is None
    for stage in TRAINED_STAGES:
        assert_same_weights(reference / stage / "model.safetensors", run_dir / stage / "model.safetensors")
    assert_consistent(run_dir)


def test_intact_training_checkpoint_is_resumed(interrupted: Path, reference: Path, tmp_path: Path) -> None:
    """The control for the test above: the same checkpoint, undamaged, is resumed (and gives the same weights)."""
    run_dir = tmp_path / "run"
    shutil.copytree(interrupted, run_dir)
    epoch = checkpoint_epoch(run_dir / "teacher" / "checkpoints" / "last.pt")
    code, output = run_cli("run", reference.parent / "stages.yaml", "--out", run_dir, cwd=tmp_path)
    assert code == 0, output[-3000:]
    assert result_of(run_dir, "teacher")["info"]["resumed_from"] == epoch
    assert_same_weights(reference / "teacher" / "model.safetensors", run_dir / "teacher" / "model.safetensors")


def _teacher_checkpoint(path: Path, seed: int) -> None:
    """A real resnet8 state_dict for the 4-class, 3-channel synthetic data (torch.save's zip, with CRC-32s)."""
    torch.manual_seed(seed)
    torch.save(create_model("resnet8", num_classes=4, in_chans=3).state_dict(), path)


def test_damaged_teacher_checkpoint_is_refused(tmp_path: Path) -> None:
    """A user's teacher checkpoint with one flipped bit in its weights: torch.load would load it without a word;
    kdpipe checks the zip's CRC-32s and stops with exit 3, naming the file and the fix."""
    checkpoint = tmp_path / "teacher.pt"
    _teacher_checkpoint(checkpoint, seed=0)
    flip_zip_tensor_byte(checkpoint)
    config = tmp_path / "stages.yaml"
    config.write_text(TEACHER_FROM_CHECKPOINT.format(checkpoint=checkpoint.name))
    code, output = run_cli("run", config, "--out", tmp_path / "run", cwd=tmp_path)
    assert code == 3, output[-3000:]
    (error,) = error_lines(output)
    assert f"{checkpoint} is truncated or corrupt" in error and "CRC-32" in error
    assert mentions(output, "hint: copy the file again")


def test_replaced_teacher_checkpoint_reruns_the_teacher(tmp_path: Path) -> None:
    checkpoint = tmp_path / "teacher.pt"
    config = tmp_path / "stages.yaml"
    config.write_text(TEACHER_FROM_CHECKPOINT.format(checkpoint=checkpoint.name))
    _teacher_checkpoint(checkpoint, seed=0)
    assert run_cli("run", config, "--out", tmp_path / "run", cwd=tmp_path)[0] == 0
    _teacher_checkpoint(checkpoint, seed=1)  # new weights, same path
    assert run_cli("run", config, "--out", tmp_path / "run", cwd=tmp_path)[0] == 0
    assert [e["event"] for e in last_run_events(tmp_path / "run") if e["stage"] == "teacher"] == [
        "stage_start",
        "stage_end",
    ]
