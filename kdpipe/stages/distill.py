"""``distill`` stage: train a student with a registered KD method against the nearest upstream teacher, evaluate
it on the test split and save the deployable student (never a training-only head) as safetensors."""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from kdpipe.config import StageConfig, TrainConfig
from kdpipe.distill.evaluate import evaluate
from kdpipe.distill.methods import create_method, method_params_union
from kdpipe.distill.methods.kd import KDParams
from kdpipe.distill.trainer import Precision
from kdpipe.models.factory import count_params
from kdpipe.registry import METHODS, STAGES
from kdpipe.stages.base import Stage, StageResult
from kdpipe.stages.common import build_model, load_stage_model, model_facts, save_stage_model, test_loader, train_method
from kdpipe.stages.validators import known_model

log = logging.getLogger(__name__)


class DistillConfig(StageConfig):
    """Distil a student from the upstream teacher with a KD method."""

    type: Literal["distill"]
    student: str
    """Any timm model name, or a CIFAR-style net kdpipe registers (kdpipe list models)."""
    method: method_params_union() = Field(default_factory=KDParams)  # type: ignore[valid-type]
    """The KD method and its hyperparameters: {name: kd, temperature: 4.0, ...} (kdpipe list methods)."""
    train: TrainConfig
    precision: Precision = "bf16"
    """Training precision on GPU (fp32 | bf16 | fp16); CPU always trains in fp32."""

    _student = field_validator("student")(known_model)


@STAGES.register("distill", summary="train a student with a KD method (kdpipe list methods)")
class DistillStage(Stage):
    Config = DistillConfig
    provides = frozenset({"student", "model"})
    config: DistillConfig

    @classmethod
    def requires(cls, config: Any) -> tuple[str, ...]:
        return ("teacher",) if METHODS.get(config.method.name).teacher_role == "frozen" else ()

    def run(self) -> StageResult:
        ctx, cfg = self.ctx, self.config
        splits = ctx.data()
        method_cls = METHODS.get(cfg.method.name)
        teacher = None
        teacher_info: dict[str, Any] = {}
        if method_cls.teacher_role == "frozen":
            record = ctx.require("teacher")
            teacher = load_stage_model(record, splits, ctx.device)
            teacher_info = {"teacher_stage": record.name, "teacher_model": record.result["info"]["model_name"]}
        torch.manual_seed(ctx.seed)
        student = build_model(cfg.student, splits)
        info: dict[str, Any] = {**model_facts(student, cfg.student), **teacher_info, "method": cfg.method.name}
        method = create_method(cfg.method, student, teacher)
        label = f"{ctx.name} ({cfg.method.name}: {cfg.student})"
        result = train_method(ctx, method, cfg.train, cfg.precision, label)
        deployable = method.deployable()
        test = evaluate(deployable, test_loader(ctx), splits.num_classes)
        artifacts = {"model": save_stage_model(ctx, deployable, cfg.student, role="student")}
        metrics: dict[str, Any] = {
            "top1": test.top1,
            "top5": test.top5,
            "loss": test.loss,
            "params": count_params(deployable),
            "best_eval_top1": result.best_top1,
            "best_epoch": result.best_epoch,
        }
        if teacher is not None:
            metrics["teacher_params"] = count_params(teacher)
            metrics["compression"] = metrics["teacher_params"] / metrics["params"]
        info.update(history=result.history, train_seconds=result.seconds, resumed_from=result.resumed_from)
        return StageResult(
            metrics=metrics,
            artifacts=artifacts,
            summary=f"{label}: test top-1 {test.top1:.4f}, {metrics['params'] / 1e6:.2f}M params",
            info=info,
        )
