"""Every registered method trains on the common timm deployment families, as student and as teacher.

Five families (ResNet, MobileNetV3, EfficientNet, ConvNeXt, RegNet) in a rotation: each is the student of one pair
and the teacher of another, so a method that only works on the CIFAR zoo, or only with a ResNet on one side, fails
here. For every pair and every method in the registry (a method registered later is tested too): the distill stage's
pair check passes (or the pair is in REFUSED, and the refusal names both models), one real optimizer step through
kdpipe's Trainer moves the student's weights with a finite loss, and the deployed network is exactly the student
architecture (extra modules of a method, its adapters or fusion heads, stay out of the export). The deployed student
of each family is exported to ONNX (onnxruntime checks it against torch inside ``export_onnx``); every method x pair
export runs under ``--runslow``.

A flow test on synthetic 32x32 images: nothing here claims accuracy.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import kdpipe  # noqa: F401  (registers the CIFAR nets with timm)
from kdpipe.config import DataConfig
from kdpipe.data import Splits, create_splits
from kdpipe.distill.methods import KDMethod, create_method
from kdpipe.errors import Interrupted
from kdpipe.exports.onnx import Preprocessing, export_onnx
from kdpipe.models.factory import create_model
from kdpipe.registry import METHODS

from .conftest import fit, method_context

FAMILIES = {
    "resnet": "resnet10t",
    "mobilenetv3": "mobilenetv3_small_050",
    "efficientnet": "efficientnet_lite0",
    "convnext": "convnext_atto",
    "regnet": "regnetx_002",
}
_NAMES = list(FAMILIES.values())
# (teacher, student): student family i learns from family i+1, so every family is once on each side.
PAIRS = [(_NAMES[(i + 1) % len(_NAMES)], _NAMES[i]) for i in range(len(_NAMES))]
REFUSED: dict[tuple[str, str, str], str] = {}
"""(method, teacher, student) -> a phrase the refusal must contain, for pairs a method truly cannot serve. Empty:
every method serves every pair here."""
IMAGE_SIZE, NUM_CLASSES = 32, 4


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> Splits:
    work = tmp_path_factory.mktemp("families")
    cfg = DataConfig.model_validate(
        {
            "kind": "synthetic",
            "num_classes": NUM_CLASSES,
            "num_samples": 64,
            "image_size": IMAGE_SIZE,
            "augment": "none",
            "val_fraction": 0.25,
            "cache_dir": str(work / "cache"),
        }
    )
    return create_splits(cfg, seed=0, base_dir=work)


def _cases() -> list[tuple[str, str, str]]:
    return [(m, t, s) for m in sorted(e.name for e in METHODS) for t, s in PAIRS]


def _build(method_name: str, teacher: str, student: str, splits: Splits) -> KDMethod:
    cls = METHODS.get(method_name)
    params = cls.Params()  # the method's defaults, as `method: {name: ...}` gives them
    cls.check_pair(params, student, teacher if cls.teacher_role != "none" else None)
    torch.manual_seed(0)
    student_net = create_model(student, num_classes=NUM_CLASSES, in_chans=3)
    teacher_net = (
        create_model(teacher, num_classes=NUM_CLASSES, in_chans=3).eval() if cls.teacher_role != "none" else None
    )
    ctx = method_context(splits, batch_size=8)
    ctx.student_name, ctx.teacher_name = student, teacher
    return create_method(params, student_net, teacher_net, ctx)


def _one_step(method: KDMethod, splits: Splits, work: Path) -> None:
    try:
        fit(method, splits, work, epochs=1, batch_size=8, stop_after_steps=1)
    except Interrupted:  # the test hook stops the loop like SIGTERM after the step, with a checkpoint
        pass
    else:
        raise AssertionError("the trainer should have stopped after one step")


@pytest.mark.parametrize(("method_name", "teacher", "student"), _cases(), ids=lambda v: str(v))
def test_one_training_step_on_timm_families(
    method_name: str, teacher: str, student: str, splits: Splits, tmp_path: Path
) -> None:
    refused = REFUSED.get((method_name, teacher, student))
    if refused is not None:
        with pytest.raises(ValueError, match=refused) as info:
            _build(method_name, teacher, student, splits)
        assert student in str(info.value) and teacher in str(info.value)
        return
    method = _build(method_name, teacher, student, splits)
    before = {k: v.clone() for k, v in method.student.state_dict().items() if v.is_floating_point()}
    _one_step(method, splits, tmp_path)
    after = method.student.state_dict()
    moved = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert moved, f"{method_name}: one step on {teacher} -> {student} left every student weight unchanged"
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    deployed = method.deployable()
    fresh = create_model(student, num_classes=NUM_CLASSES, in_chans=3)
    assert set(deployed.state_dict()) == set(fresh.state_dict()), "the deployed network must be the plain student"


def _export(method: KDMethod, splits: Splits, path: Path) -> None:
    pre = Preprocessing(
        mean=tuple(splits.mean),
        std=tuple(splits.std),
        image_size=IMAGE_SIZE,
        in_chans=3,
        channel_order="RGB",
        classes=tuple(str(i) for i in range(NUM_CLASSES)),
    )
    net: nn.Module = method.deployable()
    export_onnx(net, path, preprocessing=pre, simplify=False, check_batch=2)
    assert path.is_file()


# The method with the most extra modules (adapters and a feature-mixing student) exports every family by default.
@pytest.mark.parametrize(("teacher", "student"), PAIRS, ids=lambda v: str(v))
def test_deployed_student_of_every_family_exports_to_onnx(
    teacher: str, student: str, splits: Splits, tmp_path: Path
) -> None:
    method = _build("iakd", teacher, student, splits)
    _one_step(method, splits, tmp_path)
    _export(method, splits, tmp_path / "student.onnx")


@pytest.mark.slow
@pytest.mark.parametrize(("method_name", "teacher", "student"), _cases(), ids=lambda v: str(v))
def test_every_method_and_family_exports_to_onnx(
    method_name: str, teacher: str, student: str, splits: Splits, tmp_path: Path
) -> None:
    if (method_name, teacher, student) in REFUSED:
        pytest.skip("refused at validation (tested above)")
    method = _build(method_name, teacher, student, splits)
    _one_step(method, splits, tmp_path)
    _export(method, splits, tmp_path / "student.onnx")
