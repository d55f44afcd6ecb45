"""``verify`` stage: measure the student (and the teacher, when there is one) on the test split and enforce the
accuracy gates. A failed gate writes its report and then exits 4 with the numbers, so a pipeline can stop."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, model_validator

from kdpipe.config import StageConfig
from kdpipe.distill.evaluate import evaluate
from kdpipe.errors import Gate, GateFailed
from kdpipe.fileio import atomic_write_json
from kdpipe.registry import STAGES
from kdpipe.stages.base import Stage, StageResult
from kdpipe.stages.common import load_stage_model, test_loader
from kdpipe.stages.outputs import GatesOutput


class VerifyConfig(StageConfig):
    """Accuracy gates on the test split. A gate left unset is not checked."""

    type: Literal["verify"]
    min_top1: float | None = Field(None, ge=0.0, le=1.0)
    """Fail when the student's test top-1 (a fraction, 0.95 = 95%) is below this."""
    max_drop_vs_teacher: float | None = Field(None, ge=0.0, le=1.0)
    """Fail when teacher top-1 minus student top-1 exceeds this (needs a teacher stage upstream)."""
    min_top5: float | None = Field(None, ge=0.0, le=1.0)
    min_agreement: float | None = Field(None, ge=0.0, le=1.0)
    """Fail when the student's top-1 prediction matches the teacher's on less than this share of test images."""

    @model_validator(mode="after")
    def _some_gate(self) -> VerifyConfig:
        if all(v is None for v in (self.min_top1, self.max_drop_vs_teacher, self.min_top5, self.min_agreement)):
            raise ValueError("set at least one gate: min_top1, max_drop_vs_teacher, min_top5 or min_agreement")
        return self


@STAGES.register("verify", summary="accuracy gates on the test split (exit 4 when one fails)")
class VerifyStage(Stage):
    Config = VerifyConfig
    Output = GatesOutput
    provides = frozenset({"verify"})
    config: VerifyConfig

    @classmethod
    def requires(cls, config: Any) -> tuple[str, ...]:
        needs_teacher = config.max_drop_vs_teacher is not None or config.min_agreement is not None
        return ("student", "teacher") if needs_teacher else ("student",)

    def run(self) -> StageResult:
        ctx, cfg = self.ctx, self.config
        splits = ctx.data()
        student_rec = ctx.require("student")
        student = evaluate(load_stage_model(student_rec, splits, ctx.device), test_loader(ctx), splits.num_classes)
        metrics: dict[str, Any] = {"student_top1": student.top1, "student_top5": student.top5}
        teacher_rec = ctx.find("teacher")
        if teacher_rec is not None:
            teacher = evaluate(load_stage_model(teacher_rec, splits, ctx.device), test_loader(ctx), splits.num_classes)
            assert student.predictions is not None and teacher.predictions is not None
            metrics.update(
                teacher_top1=teacher.top1,
                teacher_top5=teacher.top5,
                drop_vs_teacher=teacher.top1 - student.top1,
                agreement=float((student.predictions == teacher.predictions).float().mean()),
            )
        candidates = [
            _gate("min_top1", cfg.min_top1, metrics["student_top1"], higher_is_better=True),
            _gate("min_top5", cfg.min_top5, metrics["student_top5"], higher_is_better=True),
            _gate(
                "max_drop_vs_teacher", cfg.max_drop_vs_teacher, metrics.get("drop_vs_teacher"), higher_is_better=False
            ),
            _gate("min_agreement", cfg.min_agreement, metrics.get("agreement"), higher_is_better=True),
        ]
        gates = [g for g in candidates if g is not None]
        per_class = {name: acc for name, acc in zip(splits.classes, student.per_class, strict=True)}
        records = [g.to_dict() for g in gates]
        report = {
            "metrics": metrics,
            "gates": records,
            "per_class_top1": per_class,
            "test_samples": student.num_samples,
        }
        atomic_write_json(ctx.dir / "report.json", report)
        failed = [g for g in gates if not g.passed]
        if failed:
            raise GateFailed("verify: " + "; ".join(g.message for g in failed), gates=gates)
        metrics["gates_passed"] = len(gates)
        return StageResult(
            metrics=metrics,
            artifacts={"report": "report.json"},
            summary="; ".join(g.message for g in gates),
            info={"gates": records, "per_class_top1": per_class},
        )


def _gate(name: str, threshold: float | None, value: float | None, higher_is_better: bool) -> Gate | None:
    """One gate outcome with a message that says by how much it passed or failed."""
    if threshold is None:
        return None
    assert value is not None and not math.isnan(value)
    passed = value >= threshold if higher_is_better else value <= threshold
    margin = value - threshold if higher_is_better else threshold - value
    label = {"min_top1": "student top-1", "min_top5": "student top-5", "min_agreement": "agreement with teacher"}.get(
        name, "top-1 drop vs teacher"
    )
    relation = (">=" if passed else "<") if higher_is_better else ("<=" if passed else ">")
    verdict = "passed" if passed else f"FAILED by {abs(margin):.4f}"
    message = f"{label} {value:.4f} {relation} {name} {threshold:.4f}: {verdict}"
    return Gate(name=name, threshold=threshold, value=value, passed=passed, message=message)
