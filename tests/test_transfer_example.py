"""examples/transfer_imagefolder.yaml end to end on real CIFAR-10 images, with "pretrained" timm hub folders made
here (the hub is unreachable): both heads re-initialised, the models' normalisation in training and in the ONNX
metadata, exported and packaged. Sizes are cut (64 px, 20 images per class, one epoch) to fit the default run."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import onnx
import pytest
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN

import kdpipe.stages  # noqa: F401
from kdpipe.config import load_config
from kdpipe.pipeline.runner import Runner
from tests.conftest import REPO, shared_dataset

EXAMPLE = REPO / "examples" / "transfer_imagefolder.yaml"


def _small_cifar(archive: Path, dest: Path, train: int, test: int) -> Path:
    """The first ``train``/``test`` images of each class of the archive, as an imagefolder."""
    counts: dict[tuple[str, str], int] = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 3:
                continue
            split, cls = parts[-3], parts[-2]
            key = (split, cls)
            if counts.get(key, 0) >= (train if split == "train" else test):
                continue
            counts[key] = counts.get(key, 0) + 1
            out = dest / split / cls / parts[-1]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
    return dest


def _hub_folder(dest: Path, arch: str, seed: int) -> Path:
    torch.manual_seed(seed)
    timm.models.save_for_hf(timm.create_model(arch, num_classes=1000), dest, safe_serialization=True)
    return dest


def test_transfer_example_runs_with_local_pretrained_folders(tmp_path: Path) -> None:
    data = _small_cifar(shared_dataset("cifar10-jpg.tar.gz"), tmp_path / "images", train=20, test=10)
    teacher = _hub_folder(tmp_path / "teacher-hub", "resnet18", 1)
    student = _hub_folder(tmp_path / "student-hub", "mobilenetv3_small_050", 2)
    train = "{epochs: 1, batch_size: 32, optimizer: adamw, lr: 0.001, backbone_lr_scale: 0.1}"
    overrides = [
        f"data.root={data}",
        "data.image_size=64",
        "stages.teacher.model=resnet18",
        f"stages.teacher.weights={{checkpoint: {teacher}, train: {train}}}",
        "stages.distill.student=mobilenetv3_small_050",
        f"stages.distill.student_weights={{checkpoint: {student}}}",
        f"stages.distill.train={train}",
        "stages.verify.min_top1=0.0",
        "stages.verify.max_drop_vs_teacher=1.0",
    ]
    summary = Runner(load_config(EXAMPLE, overrides), tmp_path / "run").run()
    assert [o.status for o in summary.stages] == ["ran"] * 6
    run = tmp_path / "run"
    for stage, classes in (("teacher", 10), ("distill", 10)):
        head = json.loads((run / stage / "result.json").read_text())["info"]["weights"]["head"]
        assert head["file_classes"] == 1000 and head["classes"] == classes
    meta = {p.key: p.value for p in onnx.load(run / "onnx" / "model.onnx").metadata_props}
    assert json.loads(meta["kdpipe.preprocessing.mean"]) == pytest.approx(list(IMAGENET_DEFAULT_MEAN))
    # timm's eval transform of the deployed student (mobilenetv3: crop_pct 0.875, bicubic; resnet18 has 0.95)
    assert json.loads(meta["kdpipe.preprocessing.crop_pct"]) == 0.875
    assert meta["kdpipe.preprocessing.interpolation"] == "bicubic"
    triton = next((run / "serve").rglob("config.pbtxt")).read_text()
    assert "preprocessing.mean" in triton and "0.485" in triton
    assert 'key: "preprocessing.crop_pct"' in triton and 'string_value: "0.875"' in triton
    card = json.loads((run / "card" / "card.json").read_text())
    assert card["dataset"]["normalization"].startswith("model: stages.teacher")
    readme = (run / "card" / "README.md").read_text()
    assert "Starting weights" in readme
    assert "evaluation resize: short side to 73 px (bicubic), then the centre 64×64 (crop_pct 0.875)" in readme
