"""Real-data fixtures for the method tests: scikit-learn's digits through kdpipe's own data path (16x16, stratified
splits), a teacher trained on it once per session, and a helper that trains a method a few epochs with kdpipe's
Trainer and reports what a method test asserts (loss falls, accuracy far above chance).

The teacher is a resnet14 (stage widths 16-32-64, like the resnet8 students), so block-swapping methods can pair
it with a resnet8 without adapters; feature methods also see a real depth gap (2 vs 1 blocks per stage).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import kdpipe  # noqa: F401  (registers the CIFAR nets with timm)
from kdpipe.config import DataConfig, TrainConfig
from kdpipe.data import BatchLoader, Splits, create_splits
from kdpipe.distill.evaluate import evaluate
from kdpipe.distill.methods import KDMethod, MethodContext, MethodParams, create_method
from kdpipe.distill.methods.ce import CEParams
from kdpipe.distill.trainer import Trainer, TrainResult
from kdpipe.models.factory import create_model

TEACHER_ARCH = "resnet14"
STUDENT_ARCH = "resnet8"
CHANCE = 0.1


@dataclass
class DigitsRun:
    splits: Splits
    teacher: nn.Module
    teacher_top1: float
    cache_dir: Path

    def student(self, arch: str = STUDENT_ARCH, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return create_model(arch, num_classes=10, in_chans=1)

    def context(self, batch_size: int = 64) -> MethodContext:
        return method_context(self.splits, batch_size)

    def train(
        self,
        params: MethodParams,
        *,
        epochs: int = 4,
        batch_size: int = 64,
        lr: float = 0.05,
        seed: int = 0,
        student: nn.Module | None = None,
        tmp_path: Path,
    ) -> tuple[KDMethod, TrainResult]:
        """Train a fresh resnet8 with ``params`` for ``epochs`` (cosine lr) and return the method and the result."""
        student = student if student is not None else self.student(seed=seed)
        method = create_method(params, student, self.teacher if params.name != "ce" else None, self.context(batch_size))
        torch.manual_seed(seed)
        result = fit(method, self.splits, tmp_path, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
        return method, result


def loaders(splits: Splits, batch_size: int, seed: int = 0) -> tuple[BatchLoader, BatchLoader]:
    train = BatchLoader(
        splits.train, batch_size=batch_size, train=True, augment="crop", seed=seed, mean=splits.mean, std=splits.std
    )
    test = BatchLoader(splits.test, batch_size=256, train=False, mean=splits.mean, std=splits.std)
    return train, test


def method_context(splits: Splits, batch_size: int = 64, seed: int = 0) -> MethodContext:
    """What the distill stage gives a method, built by the same code."""
    return MethodContext.from_splits(
        splits, batch_size=batch_size, seed=seed, student_name=STUDENT_ARCH, teacher_name=TEACHER_ARCH
    )


def fit(
    method: KDMethod,
    splits: Splits,
    work: Path,
    *,
    epochs: int,
    batch_size: int = 64,
    lr: float = 0.05,
    seed: int = 0,
    performance: dict[str, object] | None = None,
    early_stopping: dict[str, object] | None = None,
    stop_after_steps: int | None = None,
) -> TrainResult:
    train, test = loaders(splits, batch_size, seed)
    cfg = TrainConfig.model_validate(
        {
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "schedule": {"name": "cosine"},
            "performance": performance or {},
            "early_stopping": early_stopping,
        }
    )
    trainer = Trainer(
        method,
        cfg,
        train_batches=train,
        eval_batches=test,
        num_classes=10,
        device=torch.device("cpu"),
        checkpoint_path=work / "last.pt",
        fingerprint=f"test-{seed}",
        stop_after_steps=stop_after_steps,
    )
    return trainer.fit()


def test_top1(model: nn.Module, splits: Splits) -> float:
    _, test = loaders(splits, 64)
    return evaluate(model, test, 10).top1


test_top1.__test__ = False  # type: ignore[attr-defined]  (a helper, not a test)


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> DigitsRun:
    """Digits splits (16x16, val 10%) and a resnet14 teacher trained 6 epochs on them (~97% test top-1)."""
    work = tmp_path_factory.mktemp("digits-teacher")
    cfg = DataConfig.model_validate(
        {"kind": "digits", "image_size": 16, "augment": "crop", "val_fraction": 0.1, "cache_dir": str(work / "cache")}
    )
    splits = create_splits(cfg, seed=0, base_dir=work)
    torch.manual_seed(0)
    teacher = create_model(TEACHER_ARCH, num_classes=10, in_chans=1)
    fit(create_method(CEParams(), teacher, None), splits, work, epochs=6, lr=0.1)
    teacher.eval().zero_grad(set_to_none=True)
    top1 = test_top1(teacher, splits)
    assert top1 > 0.9, f"the digits teacher should learn (test top-1 {top1:.3f})"
    return DigitsRun(splits, teacher, top1, work)
