"""``teacher`` stage: a timm teacher from pretrained hub weights, a local checkpoint, or trained here (optionally
fine-tuned from either), evaluated on the test split and saved as safetensors."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import field_validator, model_validator
from pydantic_core.core_schema import ValidationInfo

from kdpipe.config import LoadedConfig, StageConfig, StrictModel, TrainConfig, resolve_path
from kdpipe.distill.evaluate import evaluate
from kdpipe.distill.methods.ce import CEParams, CrossEntropy
from kdpipe.distill.precision import Precision
from kdpipe.errors import ConfigError, DataError
from kdpipe.models.factory import hub_folder_weights, weight_source_files
from kdpipe.registry import STAGES
from kdpipe.stages.base import Stage, StageResult
from kdpipe.stages.common import (
    build_model_with_info,
    check_early_stopping,
    model_facts,
    save_stage_model,
    test_loader,
    train_method,
)
from kdpipe.stages.outputs import ModelOutput
from kdpipe.stages.validators import known_model

log = logging.getLogger(__name__)


class ModelWeights(StrictModel):
    """Pretrained weights for a model: timm's published ones, or a local file or timm hub folder.

    A number of classes other than the run's is adapted as timm does: the class head is dropped and initialised
    afresh (logged, and recorded in the stage result and the model card); a mismatch anywhere else is refused.
    """

    pretrained: bool = False
    """timm's published weights for the model name (a tag picks a variant: resnet50.a1_in1k), from the Hugging
    Face hub, or from the local hub cache alone with HF_HUB_OFFLINE=1."""
    checkpoint: Path | None = None
    """A local state_dict file (.safetensors/.pt/.pth/.bin/.ckpt) or a timm hub folder (config.json +
    model.safetensors, as save_for_hf writes it); relative to the stages.yaml folder."""

    @field_validator("checkpoint")
    @classmethod
    def _resolve(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else resolve_path(value, info)

    @model_validator(mode="after")
    def _one_source(self) -> ModelWeights:
        if self.pretrained and self.checkpoint is not None:
            raise ValueError("give either pretrained: true or checkpoint, not both")
        if type(self) is ModelWeights and not (self.pretrained or self.checkpoint is not None):
            raise ValueError("say where the weights come from: {pretrained: true} or {checkpoint: path}")
        return self


class TeacherWeights(ModelWeights):
    """Where the teacher's weights come from. ``train`` may be combined with either source to fine-tune."""

    train: TrainConfig | None = None
    """Train (or fine-tune) the teacher on the run's data with cross-entropy."""

    @model_validator(mode="after")
    def _some_source(self) -> TeacherWeights:
        if not (self.pretrained or self.checkpoint is not None or self.train is not None):
            raise ValueError(
                "say where the weights come from: {train: {...}}, {pretrained: true} or {checkpoint: path}"
            )
        return self


def check_checkpoint(weights: ModelWeights | None, loc: tuple[str, ...], loaded: LoadedConfig) -> None:
    """Preflight: a configured checkpoint exists (a file, or a folder holding a timm hub model)."""
    ckpt = weights.checkpoint if weights is not None else None
    if ckpt is None or ckpt.is_file():
        return
    where = loaded.where((*loc, "checkpoint"))
    field = ".".join((*loc, "checkpoint"))
    if not ckpt.exists():
        raise ConfigError(f"{where}: {field}: file not found: {ckpt}")
    try:
        hub_folder_weights(ckpt)
    except DataError as exc:
        raise ConfigError(f"{where}: {field}: {exc.message}", hint=exc.hint) from None


class TeacherConfig(StageConfig):
    """A teacher network for the distill stage."""

    type: Literal["teacher"]
    model: str
    """Any timm model name, or a CIFAR-style net kdpipe registers (kdpipe list models)."""
    weights: TeacherWeights | None = None
    """Where the weights come from. Leave it out for an online method (dml, switokd), which trains the teacher
    jointly with the student: the stage then saves the architecture at its seeded random initialisation."""
    precision: Precision = "bf16"
    """Training precision (fp32 | bf16 | fp16): bf16 autocast on GPUs and on CPUs that compute bf16 natively (AVX-512
    BF16 or AMX), fp16 with loss scaling on GPUs; elsewhere fp32, and the log and the result's ``info.precision`` say
    so and why."""

    _model = field_validator("model")(known_model)


@STAGES.register("teacher", summary="a timm teacher: pretrained, from a checkpoint, or trained here")
class TeacherStage(Stage):
    Config = TeacherConfig
    Output = ModelOutput
    provides = frozenset({"teacher", "model"})
    data_parallel = True
    config: TeacherConfig

    @classmethod
    def input_files(cls, config: Any) -> list[Path]:
        ckpt = config.weights.checkpoint if config.weights is not None else None
        return weight_source_files(ckpt) if ckpt is not None else []

    @classmethod
    def preflight(cls, name: str, config: Any, loaded: LoadedConfig) -> None:
        if config.weights is not None:
            check_early_stopping(config.weights.train, ("stages", name, "weights", "train"), loaded)
        check_checkpoint(config.weights, ("stages", name, "weights"), loaded)

    def run(self) -> StageResult:
        ctx, cfg = self.ctx, self.config
        splits = ctx.data()
        torch.manual_seed(ctx.seed)
        weights = cfg.weights or TeacherWeights.model_construct(pretrained=False, checkpoint=None, train=None)
        model, source = build_model_with_info(
            cfg.model, splits, pretrained=weights.pretrained, checkpoint=weights.checkpoint
        )
        if source.head is not None and weights.train is None:
            raise ConfigError(
                f"stages.{ctx.name}.weights: {source.describe_head()}, so the teacher's outputs would be random",
                hint=f"add stages.{ctx.name}.weights.train to fine-tune it on the run's data first, or use "
                f"weights with {splits.num_classes} classes",
            )
        info: dict[str, Any] = {**model_facts(model, cfg.model), "weights": source.as_dict()}
        history: list[dict[str, float]] = []
        if weights.train is not None:
            method = CrossEntropy(CEParams(), model)
            result = train_method(ctx, method, weights.train, cfg.precision, f"{ctx.name} ({cfg.model})")
            history = result.history
            info["train_seconds"] = result.seconds
            info.update(precision=result.precision, precision_note=result.precision_note)
            info["best_eval_top1"] = result.best_top1
            info["resumed_from"] = result.resumed_from
            info["stopped_early"] = result.stopped_early
        model = model.to(ctx.device)
        test = evaluate(model, test_loader(ctx), splits.num_classes)
        artifacts = {"model": save_stage_model(ctx, model, cfg.model, role="teacher")}
        metrics = {"top1": test.top1, "top5": test.top5, "loss": test.loss, "params": info["params"]}
        return StageResult(
            metrics=metrics,
            artifacts=artifacts,
            summary=f"{cfg.model}: test top-1 {test.top1:.4f}, {info['params'] / 1e6:.2f}M params",
            info={**info, "history": history, "source": _source(cfg.weights), "trained": cfg.weights is not None},
        )


def _source(weights: TeacherWeights | None) -> str:
    if weights is None:
        return "architecture only (seeded random initialisation, trained jointly by an online method)"
    base = "pretrained" if weights.pretrained else f"checkpoint {weights.checkpoint}" if weights.checkpoint else ""
    if weights.train is not None:
        return f"fine-tuned from {base}" if base else "trained from scratch"
    return base
