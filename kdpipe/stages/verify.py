"""``verify`` stage: measure the student (and the teacher, when there is one) on the test split and enforce the
accuracy gates, and, placed after a benchmark stage, latency budgets on what it measured. A failed gate writes its
report and then exits 4 with the numbers, so a pipeline can stop."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from kdpipe.config import LoadedConfig, StageConfig, StrictModel
from kdpipe.distill.evaluate import evaluate
from kdpipe.errors import ConfigError, Gate, GateFailed
from kdpipe.fileio import atomic_write_json
from kdpipe.registry import STAGES
from kdpipe.stages.base import Stage, StageResult
from kdpipe.stages.common import load_stage_model, test_loader, upstream_stage
from kdpipe.stages.outputs import BenchmarkOutput, ExportOutput, GatesOutput

Metric = Literal["p50_ms", "p99_ms"]


class LatencyBudget(StrictModel):
    """A latency gate on what an upstream benchmark stage measured."""

    metric: Metric = "p50_ms"
    max: PositiveFloat
    """Milliseconds per call at ``batch``."""
    batch: PositiveInt = 1
    backend: str = "onnxruntime"
    """One of the benchmark stage's backends."""
    export: str | None = None
    """The export stage whose artifact must meet it (default: every export the benchmark measured on ``backend``;
    with a torch backend, the PyTorch student)."""


def check_budget_benchmarked(field: str, where: str, backend: str, batch: int, bench_field: str, bench: Any) -> None:
    """A latency budget on a backend or batch size the benchmark does not measure is a config error at its line."""
    if backend not in bench.backends:
        raise ConfigError(
            f"{where}: {field}.backend: {backend!r} is not benchmarked ({bench_field}.backends: "
            f"{', '.join(bench.backends)})",
            hint=f"add {backend!r} to {bench_field}.backends, or budget on one of them",
        )
    if batch not in bench.batch_sizes:
        raise ConfigError(
            f"{where}: {field}.batch: batch {batch} is not benchmarked ({bench_field}.batch_sizes: "
            f"{list(bench.batch_sizes)})",
            hint=f"add {batch} to {bench_field}.batch_sizes",
        )


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
    max_latency: LatencyBudget | None = None
    """Fail when the benchmark stage upstream measured ``metric`` above ``max`` ms (needs: [bench])."""

    @model_validator(mode="after")
    def _some_gate(self) -> VerifyConfig:
        if all(v is None for v in self._accuracy_gates()) and self.max_latency is None:
            raise ValueError(
                "set at least one gate: min_top1, max_drop_vs_teacher, min_top5, min_agreement or max_latency"
            )
        return self

    def _accuracy_gates(self) -> tuple[float | None, ...]:
        return (self.min_top1, self.max_drop_vs_teacher, self.min_top5, self.min_agreement)


@STAGES.register("verify", summary="accuracy gates on the test split (exit 4 when one fails)")
class VerifyStage(Stage):
    Config = VerifyConfig
    Output = GatesOutput
    provides = frozenset({"verify"})
    config: VerifyConfig

    @classmethod
    def requires(cls, config: Any) -> tuple[str, ...]:
        needs_teacher = config.max_drop_vs_teacher is not None or config.min_agreement is not None
        latency = ("benchmark",) if config.max_latency is not None else ()
        return ("student", "teacher", *latency) if needs_teacher else ("student", *latency)

    @classmethod
    def preflight(cls, name: str, config: Any, loaded: LoadedConfig) -> None:
        budget = config.max_latency
        if budget is None:
            return
        field, where = f"stages.{name}.max_latency", loaded.where(("stages", name, "max_latency"))
        bench = upstream_stage(loaded, name, "benchmark")
        if bench is None:  # the graph check names the missing stage
            return
        check_budget_benchmarked(field, where, budget.backend, budget.batch, f"stages.{bench[0]}", bench[1])
        if budget.export is not None:
            exports = loaded.config.stages
            if budget.export not in exports or exports[budget.export].type not in ("export", "qad"):
                raise ConfigError(
                    f"{where}: {field}.export: {budget.export!r} is not an export stage",
                    hint="name the export stage whose artifact the budget is for",
                )

    def run(self) -> StageResult:
        ctx, cfg = self.ctx, self.config
        metrics: dict[str, Any] = {}
        gates: list[Gate] = []
        report: dict[str, Any] = {}
        if any(v is not None for v in cfg._accuracy_gates()):
            gates += self._accuracy(metrics, report)
        if cfg.max_latency is not None:
            gates += self._latency(cfg.max_latency, metrics)
        records = [g.to_dict() for g in gates]
        report = {"metrics": metrics, "gates": records, **report}
        atomic_write_json(ctx.dir / "report.json", report)
        failed = [g for g in gates if not g.passed]
        if failed:
            raise GateFailed("verify: " + "; ".join(g.message for g in failed), gates=gates)
        metrics["gates_passed"] = len(gates)
        return StageResult(
            metrics=metrics,
            artifacts={"report": "report.json"},
            summary="; ".join(g.message for g in gates),
            info={
                "gates": records,
                **({"per_class_top1": report["per_class_top1"]} if "per_class_top1" in report else {}),
            },
        )

    def _latency(self, budget: LatencyBudget, metrics: dict[str, Any]) -> list[Gate]:
        """One gate per benchmarked model the budget covers, from the upstream benchmark stage's cells."""
        ctx = self.ctx
        bench = ctx.require("benchmark")
        labels = None
        if budget.export is not None:
            export = next(r for r in ctx.upstream if r.name == budget.export).output(ExportOutput)
            labels = {f"{export.model_name} {export.format}"}
        cells = [
            c
            for c in bench.output(BenchmarkOutput).cells
            if c["backend"] == budget.backend
            and c["batch_size"] == budget.batch
            and (labels is None or c["model"] in labels)
        ]
        if not cells:
            raise GateFailed(
                f"verify: {bench.name} measured nothing on {budget.backend} at batch {budget.batch}"
                + (f" for {budget.export}" if budget.export else ""),
                gates=[Gate(f"max_{budget.metric}", budget.max, float("nan"), False, "nothing measured")],
            )
        gates = []
        for cell in cells:
            value = cell.get(budget.metric)
            what = f"{cell['model']} on {budget.backend}, batch {budget.batch}"
            if value is None:
                gates.append(
                    Gate(f"max_{budget.metric}", budget.max, float("nan"), False, f"{what}: {cell.get('error')}")
                )
                continue
            metrics[f"{budget.metric} {cell['model']}"] = value
            passed = value <= budget.max
            verdict = "passed" if passed else f"FAILED by {value - budget.max:.3f} ms"
            message = f"{what}: {budget.metric} {value:.3f} ms {'<=' if passed else '>'} {budget.max:g} ms: {verdict}"
            gates.append(Gate(f"max_{budget.metric}", budget.max, value, passed, message))
        return gates

    def _accuracy(self, metrics: dict[str, Any], report: dict[str, Any]) -> list[Gate]:
        """Test-split accuracy of the student (and the teacher) and the accuracy gates."""
        ctx, cfg = self.ctx, self.config
        splits = ctx.data()
        student_rec = ctx.require("student")
        student = evaluate(load_stage_model(student_rec, splits, ctx.device), test_loader(ctx), splits.num_classes)
        metrics.update(student_top1=student.top1, student_top5=student.top5)
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
        report["per_class_top1"] = dict(zip(splits.classes, student.per_class, strict=True))
        report["test_samples"] = student.num_samples
        return [g for g in candidates if g is not None]


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
