"""``distill`` stage: train a student with a registered KD method against the nearest upstream teacher, evaluate
it on the test split and save the deployable student (never a training-only head) as safetensors."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from kdpipe.config import LoadedConfig, StageConfig, TrainConfig
from kdpipe.distill.evaluate import evaluate
from kdpipe.distill.methods import create_method
from kdpipe.distill.methods.base import MethodContext, MethodParams
from kdpipe.distill.methods.kd import KDParams
from kdpipe.distill.precision import Precision
from kdpipe.errors import ConfigError
from kdpipe.models.factory import count_params, weight_source_files
from kdpipe.registry import METHODS, STAGES
from kdpipe.stages.base import Stage, StageResult
from kdpipe.stages.common import (
    build_model_with_info,
    check_early_stopping,
    load_stage_model,
    model_facts,
    save_stage_model,
    test_loader,
    train_method,
    upstream_stage,
    with_method_union,
)
from kdpipe.stages.outputs import ModelOutput
from kdpipe.stages.teacher import ModelWeights, check_checkpoint
from kdpipe.stages.validators import known_model

log = logging.getLogger(__name__)


_METHOD_DOC = "The KD method and its hyperparameters: {name: kd, temperature: 4.0, ...} (kdpipe list methods)."


class DistillConfig(StageConfig):
    """Distil a student from the upstream teacher with a KD method."""

    type: Literal["distill"]
    student: str
    """Any timm model name, or a CIFAR-style net kdpipe registers (kdpipe list models)."""
    method: MethodParams = Field(default_factory=KDParams)
    """The KD method and its hyperparameters: {name: kd, temperature: 4.0, ...} (kdpipe list methods)."""
    student_weights: ModelWeights | None = None
    """Start the student from pretrained weights ({pretrained: true} or {checkpoint: file or timm hub folder})
    instead of a random initialisation; a head of another class count is re-initialised. The method's extra
    modules (adapters, fusion heads, generators) are trained from scratch and never exported."""
    train: TrainConfig
    precision: Precision = "bf16"
    """Training precision (fp32 | bf16 | fp16): bf16 autocast on GPUs and on CPUs that compute bf16 natively (AVX-512
    BF16 or AMX), fp16 with loss scaling on GPUs; elsewhere fp32, and the log and the result's ``info.precision`` say
    so and why."""

    _student = field_validator("student")(known_model)


def distill_config_model() -> type[DistillConfig]:
    """DistillConfig with ``method`` as the discriminated union of the methods registered now."""
    return with_method_union(DistillConfig, "method", lambda union: union, KDParams, _METHOD_DOC)


@STAGES.register("distill", summary="train a student with a KD method (kdpipe list methods)")
class DistillStage(Stage):
    Config = DistillConfig
    Output = ModelOutput
    provides = frozenset({"student", "model"})
    data_parallel = True
    config: DistillConfig

    @classmethod
    def config_model(cls) -> type[DistillConfig]:
        return distill_config_model()

    @classmethod
    def requires(cls, config: Any) -> tuple[str, ...]:
        return ("teacher",) if METHODS.get(config.method.name).teacher_role != "none" else ()

    @classmethod
    def input_files(cls, config: Any) -> list[Path]:
        ckpt = config.student_weights.checkpoint if config.student_weights is not None else None
        return weight_source_files(ckpt) if ckpt is not None else []

    @classmethod
    def preflight(cls, name: str, config: Any, loaded: LoadedConfig) -> None:
        check_early_stopping(config.train, ("stages", name, "train"), loaded)
        check_checkpoint(config.student_weights, ("stages", name, "student_weights"), loaded)
        method_cls = METHODS.get(config.method.name)
        where = loaded.where(("stages", name, "method", "name"))
        if method_cls.needs_val_split and loaded.config.data.val_fraction <= 0:
            raise ConfigError(
                f"{where}: stages.{name}.method: {config.method.name} learns from a held-out validation split, "
                "but data.val_fraction is 0",
                hint="set data.val_fraction (e.g. 0.1)",
            )
        teacher_stage = upstream_stage(loaded, name, "teacher") if method_cls.teacher_role != "none" else None
        teacher = str(teacher_stage[1].model) if teacher_stage is not None else None
        if method_cls.teacher_role == "frozen" and teacher_stage is not None and teacher_stage[1].weights is None:
            raise ConfigError(
                f"{where}: stages.{name}.method: {config.method.name} distils from a trained teacher, but stage "
                f"{teacher_stage[0]!r} gives only an architecture (no weights)",
                hint=f"give stages.{teacher_stage[0]}.weights (train, pretrained or checkpoint), "
                "or use an online method (dml, switokd) that trains the teacher jointly",
            )
        try:
            method_cls.check_pair(config.method, config.student, teacher)
        except ValueError as exc:
            raise ConfigError(f"{where}: stages.{name}.method: {exc}") from None

    def _networks(self, method: Any, artifacts: dict[str, str], deployed_test: Any) -> dict[str, dict[str, Any]]:
        """Test metrics of every network an online method trained, and a weight file for each one not deployed
        (``networks/<name>.safetensors``). Empty for methods that train only the student."""
        nets = method.networks()
        if len(nets) < 2:
            return {}
        ctx = self.ctx
        splits = ctx.data()
        out: dict[str, dict[str, Any]] = {}
        for name, net in nets.items():
            deployed = name == method.deployed_network
            test = deployed_test if deployed else evaluate(net, test_loader(ctx), splits.num_classes)
            arch = method.network_arch(name)
            entry: dict[str, Any] = {"model": arch, "top1": test.top1, "top5": test.top5, "params": count_params(net)}
            if deployed:
                entry["deployed"] = True
            else:
                file = f"networks/{name}.safetensors"
                role = f"online network {name}"
                artifacts[f"network_{name}"] = save_stage_model(ctx, net, arch, role=role, file=file)
            out[name] = entry
        return out

    def run(self) -> StageResult:
        ctx, cfg = self.ctx, self.config
        splits = ctx.data()
        method_cls = METHODS.get(cfg.method.name)
        teacher = None
        teacher_info: dict[str, Any] = {}
        if method_cls.teacher_role != "none":
            record = ctx.require("teacher")
            teacher = load_stage_model(record, splits, ctx.device)
            teacher_info = {"teacher_stage": record.name, "teacher_model": record.output(ModelOutput).model_name}
            if method_cls.teacher_role == "joint":
                teacher.train()
        torch.manual_seed(ctx.seed)
        sw = cfg.student_weights
        student, source = build_model_with_info(
            cfg.student,
            splits,
            pretrained=sw is not None and sw.pretrained,
            checkpoint=sw.checkpoint if sw is not None else None,
        )
        info: dict[str, Any] = {**model_facts(student, cfg.student), **teacher_info, "method": cfg.method.name}
        info["weights"] = source.as_dict()
        context = MethodContext.from_splits(
            splits,
            batch_size=cfg.train.batch_size,
            seed=ctx.seed,
            device=ctx.device,
            student_name=cfg.student,
            teacher_name=teacher_info.get("teacher_model", ""),
            workers=ctx.pipeline.data.workers,
        )
        method = create_method(cfg.method, student, teacher, context)
        label = f"{ctx.name} ({cfg.method.name}: {cfg.student})"
        result = train_method(ctx, method, cfg.train, cfg.precision, label)
        deployable = method.deployable()
        test = evaluate(deployable, test_loader(ctx), splits.num_classes)
        artifacts = {"model": save_stage_model(ctx, deployable, cfg.student, role="student")}
        networks = self._networks(method, artifacts, test)
        metrics: dict[str, Any] = {
            "top1": test.top1,
            "top5": test.top5,
            "loss": test.loss,
            "params": count_params(deployable),
            "best_eval_top1": result.best_top1,
            "best_epoch": result.best_epoch,
        }
        if networks:
            metrics["networks"] = networks
            metrics["deployed_network"] = method.deployed_network
        if teacher is not None:
            metrics["teacher_params"] = count_params(teacher)
            metrics["compression"] = metrics["teacher_params"] / metrics["params"]
        info.update(method_params=cfg.method.model_dump(mode="json"))
        info.update(history=result.history, train_seconds=result.seconds, resumed_from=result.resumed_from)
        info.update(precision=result.precision, precision_note=result.precision_note)
        info.update(stopped_early=result.stopped_early)
        return StageResult(
            metrics=metrics,
            artifacts=artifacts,
            summary=f"{label}: test top-1 {test.top1:.4f}, {metrics['params'] / 1e6:.2f}M params",
            info=info,
        )
