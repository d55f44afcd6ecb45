"""The training loop's speed settings (train.performance) keep what a run learns: channels_last, fused optimizer
kernels and torch.compile each train the digits student to the same accuracy as the plain loop, within noise."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from kdpipe.config import TrainConfig
from kdpipe.distill.methods import create_method
from kdpipe.distill.methods.kd import KDParams
from kdpipe.distill.trainer import compile_networks, create_optimizer, default_channels_last, sync_batchnorm
from kdpipe.distributed import World
from kdpipe.errors import ConfigError
from tests.distill.conftest import DigitsRun, fit


def _kd_run(digits: DigitsRun, work: Path, **performance: object) -> tuple[torch.nn.Module, float, float]:
    student = digits.student(seed=0)
    method = create_method(KDParams(), student, digits.teacher, digits.context())
    torch.manual_seed(0)
    result = fit(method, digits.splits, work, epochs=4, performance=performance)
    assert result.final is not None
    return student, result.final.top1, result.history[0]["train_loss"]


def test_channels_last_trains_nhwc_weights_to_the_same_accuracy(digits: DigitsRun, tmp_path: Path) -> None:
    _, plain_top1, plain_loss = _kd_run(digits, tmp_path / "plain", channels_last=False)
    student, nhwc_top1, nhwc_loss = _kd_run(digits, tmp_path / "nhwc", channels_last=True)
    conv = next(m for m in student.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()  # really NHWC, not a 1x1 corner case
    # Same math in another memory order: float sums differ in order only (and grow over an epoch of steps).
    assert nhwc_loss == pytest.approx(plain_loss, rel=2e-2)
    assert abs(nhwc_top1 - plain_top1) <= 0.02
    assert plain_top1 > 0.8
    # The frozen teacher went NHWC too (it is hidden from the module tree), and went back for the other tests.
    digits.teacher.to(memory_format=torch.contiguous_format)


@pytest.mark.parametrize(
    ("device", "precision", "nhwc"),
    [("cuda", "bf16", True), ("cuda", "fp32", True), ("cpu", "bf16", True), ("cpu", "fp32", False)],
)
def test_channels_last_is_on_by_default_where_it_was_measured_faster(device: str, precision: str, nhwc: bool) -> None:
    """benchmarks/results/train_options_cpu.md: NHWC 1.35x a CPU KD step in bf16, no gain in fp32 (0.89x)."""
    assert default_channels_last(torch.device(device), precision) is nhwc  # type: ignore[arg-type]


def test_fused_optimizer_kernels_are_used_when_asked() -> None:
    params = [torch.nn.Parameter(torch.randn(4, 4))]
    for optimizer in ("sgd", "adamw"):
        cfg = TrainConfig.model_validate(
            {"epochs": 1, "optimizer": optimizer, "performance": {"fused_optimizer": True}}
        )
        assert create_optimizer(params, cfg, torch.device("cpu")).defaults["fused"] is True
        default = TrainConfig.model_validate({"epochs": 1, "optimizer": optimizer})
        opt = create_optimizer(params, default, torch.device("cpu"))
        assert opt.defaults["foreach"] is True and not opt.defaults["fused"]


def test_fused_sgd_matches_foreach_on_digits(digits: DigitsRun, tmp_path: Path) -> None:
    _, plain_top1, plain_loss = _kd_run(digits, tmp_path / "foreach", fused_optimizer=False)
    _, fused_top1, fused_loss = _kd_run(digits, tmp_path / "fused", fused_optimizer=True)
    assert fused_loss == pytest.approx(plain_loss, rel=1e-4)
    assert abs(fused_top1 - plain_top1) <= 0.02


def test_compile_without_a_cpu_compiler_is_a_clear_config_error(
    digits: DigitsRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    method = create_method(KDParams(), digits.student(), digits.teacher, digits.context())
    with pytest.raises(ConfigError, match="C\\+\\+ compiler") as info:
        compile_networks(method, "default", torch.device("cpu"))
    assert "train.performance.compile: false" in (info.value.hint or "")


def test_bad_compile_mode_names_the_field() -> None:
    with pytest.raises(ValueError, match="compile_mode"):
        TrainConfig.model_validate({"epochs": 1, "performance": {"compile_mode": "fastest"}})


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_training_matches_eager(digits: DigitsRun, tmp_path: Path) -> None:
    _, eager_top1, eager_loss = _kd_run(digits, tmp_path / "eager")
    student, compiled_top1, compiled_loss = _kd_run(digits, tmp_path / "compiled", compile=True)
    assert student.state_dict().keys() == digits.student().state_dict().keys()  # compiled in place: same keys
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-2)
    assert abs(compiled_top1 - eager_top1) <= 0.03


def test_sync_bn_is_a_no_op_alone_and_refused_on_cpu_under_torchrun(digits: DigitsRun) -> None:
    method = create_method(KDParams(), digits.student(), digits.teacher, digits.context())
    sync_batchnorm(method, World(), torch.device("cpu"))
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in method.modules())
    with pytest.raises(ConfigError, match="sync_bn needs CUDA") as info:
        sync_batchnorm(method, World(rank=0, size=2, backend="gloo"), torch.device("cpu"))
    assert "sync_bn: false" in (info.value.hint or "")


@pytest.mark.gpu
def test_sync_bn_converts_the_trained_networks_not_the_teacher(digits: DigitsRun) -> None:
    method = create_method(KDParams(), digits.student(), digits.teacher, digits.context())
    weights = list(method.student.parameters())
    sync_batchnorm(method, World(rank=0, size=2, backend="nccl"), torch.device("cuda"))
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in method.student.modules())
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in digits.teacher.modules())
    after = list(method.student.parameters())
    assert len(after) == len(weights) and all(a is b for a, b in zip(after, weights, strict=True))  # same tensors


def test_a_nan_loss_stops_training_with_the_epoch_and_the_fix(
    digits: DigitsRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    method = create_method(KDParams(), digits.student(), digits.teacher, digits.context())
    real_loss = method.loss
    calls = {"n": 0}

    def poisoned(*args: object) -> dict[str, torch.Tensor]:
        out = real_loss(*args)  # type: ignore[arg-type]
        calls["n"] += 1
        if calls["n"] == 30:  # epoch 2, step 9 (21 steps per epoch)
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(method, "loss", poisoned)
    with pytest.raises(
        FloatingPointError, match=r"loss became nan in epoch 2 \(by step 9\); lower the lr \(training in fp32\)$"
    ):
        fit(method, digits.splits, tmp_path, epochs=3)
    # The checkpoint is the end of epoch 1: a rerun resumes from weights the nan never reached.
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    assert saved["epoch"] == 1 and saved["step"] == 0
