"""``sweep`` stage: choose the student to deploy. One teacher, a grid of candidates (students x methods x export
precisions), each distilled, verified, exported, parity-checked and benchmarked as ordinary stages, and a measured
accuracy-latency Pareto frontier from which a latency budget picks the deployed model.

```yaml
  sweep:
    type: sweep
    students: [resnet8, resnet14, mobilenetv2_x0_5_cifar]
    methods: [{name: kd}, {name: dkd, warmup_epochs: 2}]   # or {label: {name: ...}, ...} to name variants
    precisions: [fp32, int8]                               # fp32 | fp16 | int8 | qad | trt-fp16 | trt-int8
    train: {epochs: 30, lr: 0.05}
    verify: {min_top1: 0.9}                                # optional accuracy gates of every candidate
    benchmark: {backends: [onnxruntime], batch_sizes: [1, 64]}
    select: {metric: p50_ms, max: 0.2, batch: 1, backend: onnxruntime}
```

The engine expands the stage (``expand``) into one sub-run per student and method, ``<sweep>/<student>-<method>/``,
holding its ``distill``, ``verify``, one export (or ``qad``) stage per precision and a ``bench`` stage; each sub-run
has its own lock, so ``kdpipe run stages.yaml --only sweep/resnet8-kd`` runs one candidate (on any machine that
shares the run folder) and a later whole ``kdpipe run`` collects them. Adding a student, a method or a precision adds
stages and leaves the finished ones up to date.

The sweep stage itself runs after its members: a table of every candidate (student, method, precision: parameters,
top-1, parity, p50/p99 at the chosen batch and backend, size) with the Pareto frontier marked (``report.md``,
``report.json``) and a plot of accuracy against latency (``pareto.png``); then ``select`` picks the most accurate
candidate within the latency budget. That candidate's stages become the run's deployed model: the stages after the
sweep (card, serve) see only its student, export and benchmark (the others are hidden, ``SweepOutput.hides``). No
candidate within the budget is a failed gate (exit 4) that names the closest one. A candidate that missed one of its
own gates (accuracy, parity) is reported as such and left out of the choice; the run goes on.
"""

from __future__ import annotations

import io
import json
import logging
import re
from typing import Any, Literal

from pydantic import (
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from kdpipe.config import LoadedConfig, StageConfig, StrictModel, TrainConfig
from kdpipe.distill.methods.base import MethodParams
from kdpipe.distill.methods.kd import KDParams
from kdpipe.distill.precision import Precision
from kdpipe.errors import ConfigError, Gate, GateFailed
from kdpipe.fileio import atomic_open, atomic_write_json, atomic_write_text
from kdpipe.markdown import table
from kdpipe.registry import BACKENDS, FORMATS, METHODS, STAGES
from kdpipe.stages.base import Expansion, Stage, StageRecord, StageResult
from kdpipe.stages.benchmark import BenchmarkConfig
from kdpipe.stages.common import upstream_stage, with_method_union
from kdpipe.stages.distill import distill_config_model
from kdpipe.stages.export import ExportConfig, ParityConfig, TensorRTConfig
from kdpipe.stages.outputs import BenchmarkOutput, ExportOutput, ModelOutput, SweepOutput
from kdpipe.stages.qad import qad_config_model
from kdpipe.stages.validators import known_model
from kdpipe.stages.verify import Metric, VerifyConfig, check_budget_benchmarked

log = logging.getLogger(__name__)

PRECISIONS: dict[str, tuple[str, str, str | None]] = {
    "fp32": ("export", "onnx", None),
    "fp16": ("export", "onnx-fp16", None),
    "int8": ("export", "onnx-int8", None),
    "qad": ("qad", "onnx-int8-qad", None),
    "trt-fp16": ("export", "tensorrt", "fp16"),
    "trt-int8": ("export", "tensorrt", "int8"),
}
"""Precision token -> (member stage type, export format, TensorRT precision)."""


class SweepSelect(StrictModel):
    """How the deployed candidate is chosen: the most accurate one whose latency ``metric`` at ``batch`` on
    ``backend`` is at most ``max`` milliseconds (no ``max``: the most accurate one)."""

    metric: Metric = "p50_ms"
    max: PositiveFloat | None = None
    """The latency budget in milliseconds; a failed gate (exit 4) when no candidate meets it."""
    batch: PositiveInt = 1
    backend: str = "onnxruntime"
    """A backend of ``benchmark.backends`` that runs the exports (onnxruntime, tensorrt)."""


class SweepExport(StrictModel):
    """Settings every candidate's export shares (see the export stage)."""

    opset: int = 18
    max_batch_size: PositiveInt = 64
    calibration_samples: PositiveInt = 512
    """int8 and qad: training images that calibrate activation ranges."""
    per_channel: bool = True
    reduce_range: bool | None = None
    parity: ParityConfig = Field(default_factory=ParityConfig)
    """Parity gates (default: each format's own); a candidate that misses them is left out of the choice."""
    tensorrt: TensorRTConfig = Field(default_factory=TensorRTConfig)
    """trt-* precisions: the engine's batch profile and workspace (its precision comes from the token)."""


def _no_wiring(data: Any) -> Any:
    """A block inside the sweep is not a stage of the file: the sweep sets its ``type`` and ``needs``."""
    if isinstance(data, dict) and "needs" in data:
        raise ValueError("the sweep wires its candidates' stages itself: no needs here")
    return data


class SweepVerify(VerifyConfig):
    """A verify stage's gates, checked for every candidate."""

    type: Literal["verify"] = "verify"
    _wiring = model_validator(mode="before")(_no_wiring)


class SweepBenchmark(BenchmarkConfig):
    """A benchmark stage's settings, used for every candidate."""

    type: Literal["benchmark"] = "benchmark"
    _wiring = model_validator(mode="before")(_no_wiring)


def _default_benchmark() -> SweepBenchmark:
    return SweepBenchmark(backends=["onnxruntime"], batch_sizes=[1, 64])


_METHODS_DOC = (
    "Method blocks as in a distill stage; a list labels each by its name, a mapping {label: block} names variants of "
    "one method (kd-t4, kd-t8)."
)


class SweepConfig(StageConfig):
    """Distil, verify, export and benchmark every candidate (students x methods x precisions), then choose."""

    type: Literal["sweep"]
    students: list[str] = Field(min_length=1)
    """timm model names (or kdpipe's CIFAR nets), each distilled from the teacher."""
    methods: list[MethodParams] | dict[str, MethodParams] = Field(default_factory=lambda: [KDParams()])  # type: ignore[assignment]
    """Method blocks as in a distill stage (see ``_METHODS_DOC``)."""
    precisions: list[str] = Field(default_factory=lambda: ["fp32"], min_length=1)
    """fp32 | fp16 | int8 | qad (int8 fine-tuned with the teacher, ModelOpt) | trt-fp16 | trt-int8 (TensorRT)."""
    train: TrainConfig
    """Each candidate's distillation schedule."""
    train_precision: Precision = "bf16"
    """Each candidate's training precision, as a distill stage's ``precision``."""
    verify: SweepVerify | None = None
    """Accuracy gates of every candidate (a verify stage's: min_top1, max_drop_vs_teacher, ...)."""
    export: SweepExport = Field(default_factory=SweepExport)
    qad: dict[str, Any] = Field(default_factory=dict)
    """The qad stage's settings for the qad precision (train, method, max_drop_vs_fp32, ...)."""
    benchmark: SweepBenchmark = Field(default_factory=_default_benchmark)
    """How every candidate is benchmarked (a benchmark stage's settings; default onnxruntime at batch 1 and 64)."""
    select: SweepSelect = Field(default_factory=SweepSelect)

    @field_validator("students")
    @classmethod
    def _known_students(cls, value: list[str]) -> list[str]:
        return _distinct([known_model(cls, name) for name in value])

    @field_validator("precisions")
    @classmethod
    def _known_precisions(cls, value: list[str]) -> list[str]:
        for token in value:
            if token not in PRECISIONS:
                raise ValueError(f"unknown precision {token!r}; choose from {', '.join(PRECISIONS)}")
        return _distinct(value)

    @field_validator("methods")
    @classmethod
    def _distinct_methods(cls, value: Any) -> Any:
        labels = method_labels(value)
        blocks = [json.dumps(m.model_dump(mode="json"), sort_keys=True) for m in labels.values()]
        for i, block in enumerate(blocks):
            if block in blocks[:i]:
                first, again = list(labels)[blocks.index(block)], list(labels)[i]
                raise ValueError(f"{again!r} is the same method and settings as {first!r}")
        return value

    @field_validator("qad")
    @classmethod
    def _qad_settings(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "type" in value or "needs" in value:
            raise ValueError("the sweep sets the qad stages' type and needs itself")
        try:
            qad_config_model().model_validate({**value, "type": "qad"})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ValueError(problems) from None
        return value

    @model_validator(mode="after")
    def _qad_listed(self) -> SweepConfig:
        if "qad" not in self.precisions and self.qad:
            raise ValueError("qad: settings for the qad precision, which precisions does not list")
        return self


def _distinct(values: list[str]) -> list[str]:
    again = [v for i, v in enumerate(values) if v in values[:i]]
    if again:
        raise ValueError(f"{again[0]!r} is listed twice; each candidate must be distinct")
    return values


def method_labels(methods: list[MethodParams] | dict[str, MethodParams]) -> dict[str, MethodParams]:
    """Each method block by its label: the method's name in a list, the key in a mapping. Two blocks of one method
    in a list is an error that says to name them."""
    if isinstance(methods, dict):
        return dict(methods)
    out: dict[str, MethodParams] = {}
    for block in methods:
        if block.name in out:
            raise ValueError(
                f"{block.name!r} appears twice in the list; to compare two settings of one method, give them "
                f"labels: methods: {{{block.name}-a: {{name: {block.name}, ...}}, {block.name}-b: {{...}}}}"
            )
        out[block.name] = block
    return out


def job_id(student: str, label: str) -> str:
    """The sub-run of one student and method: a folder and ``--only`` name (timm tags' dots and colons kept out)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{student}-{label}")


def sweep_config_model() -> type[SweepConfig]:
    """SweepConfig with ``methods`` over the methods registered now."""

    def list_or_mapping(union: Any) -> Any:
        return list[union] | dict[str, union]

    return with_method_union(SweepConfig, "methods", list_or_mapping, lambda: [KDParams()], _METHODS_DOC)


@STAGES.register("sweep", summary="students x methods x precisions: Pareto frontier, latency budget picks one")
class SweepStage(Stage):
    Config = SweepConfig
    Output = SweepOutput
    provides = frozenset({"sweep"})
    config: SweepConfig

    @classmethod
    def config_model(cls) -> type[SweepConfig]:
        return sweep_config_model()

    @classmethod
    def requires(cls, config: Any) -> tuple[str, ...]:
        return ()

    @classmethod
    def expand(cls, name: str, config: Any, loaded: LoadedConfig) -> Expansion:
        cfg: SweepConfig = config
        _check_select(name, cfg, loaded)
        names = list(loaded.config.stages)
        before = names[: names.index(name)]
        needs = list(cfg.needs) if cfg.needs is not None else before[-1:]
        teacher = _teacher_model(name, needs, loaded)
        labels = method_labels(cfg.methods)
        members: dict[str, StageConfig] = {}
        locations: dict[str, tuple[str | int, ...]] = {}
        jobs: dict[str, tuple[str, str]] = {}
        benches = []
        for s_index, student in enumerate(cfg.students):
            for m_index, (label, method) in enumerate(labels.items()):
                job = job_id(student, label)
                if job in jobs:
                    raise ConfigError(
                        f"{loaded.where(('stages', name, 'students', s_index))}: stages.{name}: candidates "
                        f"{jobs[job]} and {(student, label)} share the sub-run name {job!r}",
                        hint="rename one method label",
                    )
                jobs[job] = (student, label)
                _check_pair(name, student, label, method, teacher, loaded, m_index, cfg)
                prefix = f"{name}/{job}"
                where: tuple[str | int, ...] = (
                    "stages",
                    name,
                    "methods",
                    label if isinstance(cfg.methods, dict) else m_index,
                )
                members[f"{prefix}/distill"] = distill_config_model().model_validate(
                    {
                        "type": "distill",
                        "student": student,
                        "method": method.model_dump(),
                        "train": cfg.train.model_dump(),
                        "precision": cfg.train_precision,
                        "needs": needs or None,
                    }
                )
                locations[f"{prefix}/distill"] = where
                last = f"{prefix}/distill"
                if cfg.verify is not None:
                    members[f"{prefix}/verify"] = VerifyConfig(
                        **{**cfg.verify.model_dump(), "type": "verify", "needs": [last]}
                    )
                    locations[f"{prefix}/verify"] = ("stages", name, "verify")
                    last = f"{prefix}/verify"
                exports = []
                for p_index, token in enumerate(cfg.precisions):
                    member = f"{prefix}/{token}"
                    members[member] = _export_member(cfg, token, last)
                    locations[member] = ("stages", name, "precisions", p_index)
                    exports.append(member)
                bench = f"{prefix}/bench"
                members[bench] = BenchmarkConfig(
                    **{**cfg.benchmark.model_dump(), "type": "benchmark", "needs": exports}
                )
                locations[bench] = ("stages", name, "benchmark")
                benches.append(bench)
        stage = cfg.model_copy(update={"needs": benches})
        return Expansion(members=members, stage=stage, locations=locations)

    def run(self) -> StageResult:
        ctx, cfg = self.ctx, self.config
        by_name = {r.name: r for r in ctx.upstream}
        labels = method_labels(cfg.methods)
        rows = []
        for student in cfg.students:
            for label in labels:
                job = job_id(student, label)
                for token in cfg.precisions:
                    rows.append(self._row(job, student, label, token, by_name))
        frontier = pareto_frontier(rows)
        for row in rows:
            row["pareto"] = row["candidate"] in frontier
        chosen, gate = choose(rows, cfg.select)
        report = {"select": cfg.select.model_dump(mode="json"), "rows": rows, "frontier": frontier, "selected": chosen}
        atomic_write_json(ctx.dir / "report.json", report)
        atomic_write_text(ctx.dir / "report.md", markdown_report(rows, cfg.select, chosen))
        artifacts = {"report": "report.json", "table": "report.md"}
        plot = render_pareto(rows, cfg.select, chosen)
        if plot is not None:
            with atomic_open(ctx.dir / "pareto.png", "wb", encoding=None) as fh:
                fh.write(plot)
            artifacts["plot"] = "pareto.png"
        gates = [gate] if gate is not None else []
        if gate is not None and not gate.passed:
            raise GateFailed(gate.message, hint=f"the sweep's report is in {ctx.dir / 'report.md'}", gates=gates)
        keep = set()
        if chosen is not None:
            row = next(r for r in rows if r["candidate"] == chosen)
            keep = {f"{ctx.name}/{row['job']}/{role}" for role in ("distill", "verify", row["precision"], "bench")}
        hides = [n for n in by_name if n.startswith(f"{ctx.name}/") and n not in keep]
        hides += [n for n in ctx.failed_upstream if n.startswith(f"{ctx.name}/") and n not in keep]
        ok = [r for r in rows if r["status"] == "ok"]
        summary = f"{len(ok)} of {len(rows)} candidates measured, {len(frontier)} on the Pareto frontier"
        if chosen is not None:
            row = next(r for r in rows if r["candidate"] == chosen)
            summary += (
                f"; selected {chosen}: top-1 {row['top1']:.4f}, {cfg.select.metric} {row['latency_ms']:.3f} ms "
                f"(batch {cfg.select.batch}, {cfg.select.backend})"
            )
        return StageResult(
            metrics={"candidates": len(rows), "measured": len(ok), "frontier": len(frontier)},
            artifacts=artifacts,
            summary=summary,
            info={
                "gates": [g.to_dict() for g in gates],
                "hides": sorted(set(hides)),
                "selected": chosen,
                "select": cfg.select.model_dump(mode="json"),
                "rows": rows,
                "frontier": frontier,
            },
        )

    def _row(self, job: str, student: str, label: str, token: str, by_name: dict[str, StageRecord]) -> dict[str, Any]:
        """One candidate's line of the report: its numbers, or why it has none."""
        ctx, select = self.ctx, self.config.select
        prefix = f"{ctx.name}/{job}"
        row: dict[str, Any] = {
            "candidate": f"{job}/{token}",
            "job": job,
            "student": student,
            "method": label,
            "precision": token,
            "status": "ok",
        }
        roles = ["distill", *(["verify"] if self.config.verify is not None else []), token, "bench"]
        for role in roles:
            stage = f"{prefix}/{role}"
            if stage in ctx.failed_upstream:
                failed = [g["message"] for g in ctx.failed_upstream[stage] if not g.get("passed")]
                row.update(status="failed", reason=f"{role}: {'; '.join(failed)}")
                return row
            if stage not in by_name:
                row.update(status="missing", reason=f"{role} did not finish")
                return row
        distill, export, bench = by_name[f"{prefix}/distill"], by_name[f"{prefix}/{token}"], by_name[f"{prefix}/bench"]
        out = export.output(ExportOutput)
        row.update(
            params=int(distill.metrics["params"]),
            student_top1=float(distill.metrics["top1"]),
            top1=float(export.metrics["top1"]),
            agreement=float(export.metrics["top1_agreement"]),
            size_bytes=int(export.metrics["size_bytes"]),
            format=out.format,
        )
        label_of = f"{distill.output(ModelOutput).model_name} {out.format}"
        cells = [
            c
            for c in bench.output(BenchmarkOutput).cells
            if c["model"] == label_of and c["backend"] == select.backend and c["batch_size"] == select.batch
        ]
        cell = cells[0] if cells else None
        if cell is None or cell.get("error"):
            reason = cell["error"] if cell else f"not measured on {select.backend} at batch {select.batch}"
            row.update(status="unmeasured", reason=reason)
            return row
        row.update(p50_ms=cell["p50_ms"], p99_ms=cell["p99_ms"], latency_ms=cell[select.metric])
        return row


def _export_member(cfg: SweepConfig, token: str, needs: str) -> StageConfig:
    """The stage that makes one precision of a candidate: an export stage, or a qad stage for ``qad``."""
    stage_type, fmt, trt_precision = PRECISIONS[token]
    common = cfg.export.model_dump()
    if stage_type == "qad":
        qad = {k: v for k, v in common.items() if k in ("opset", "max_batch_size", "calibration_samples", "per_channel",
                                                          "reduce_range", "parity")}  # fmt: skip
        member: StageConfig = qad_config_model().model_validate({**qad, **cfg.qad, "type": "qad", "needs": [needs]})
        return member
    settings = {**common, "type": "export", "format": fmt, "needs": [needs]}
    if trt_precision is not None:
        settings["tensorrt"] = {**common["tensorrt"], "precision": trt_precision}
    return ExportConfig.model_validate(settings)


def _teacher_model(name: str, needs: list[str], loaded: LoadedConfig) -> str | None:
    stages = loaded.config.stages
    for candidate in needs:
        if "teacher" in STAGES.get(stages[candidate].type).provides:
            return str(stages[candidate].model)
    found = upstream_stage(loaded, name, "teacher")
    return str(found[1].model) if found is not None else None


def _check_pair(
    name: str,
    student: str,
    label: str,
    method: MethodParams,
    teacher: str | None,
    loaded: LoadedConfig,
    index: int,
    cfg: SweepConfig,
) -> None:
    """A method that cannot serve a student (or the teacher) is refused before any work, at its line."""
    key: str | int = label if isinstance(cfg.methods, dict) else index
    where = loaded.where(("stages", name, "methods", key))
    method_cls = METHODS.get(method.name)
    if method_cls.teacher_role != "none" and teacher is None:
        raise ConfigError(
            f"{where}: stages.{name}.methods.{key}: {method.name} needs a teacher stage above the sweep",
            hint="add a teacher stage before it, or point the sweep's needs: at one",
        )
    try:
        method_cls.check_pair(method, student, teacher)
    except ValueError as exc:
        raise ConfigError(
            f"{where}: stages.{name}.methods.{key}: {label} cannot distil student {student!r}: {exc}",
            hint=f"drop {student!r} or {label!r} from the sweep",
        ) from None
    if method_cls.needs_val_split and loaded.config.data.val_fraction <= 0:
        raise ConfigError(
            f"{where}: stages.{name}.methods.{key}: {method.name} learns from a held-out validation split, but "
            "data.val_fraction is 0",
            hint="set data.val_fraction (e.g. 0.1)",
        )


def _check_select(name: str, cfg: SweepConfig, loaded: LoadedConfig) -> None:
    """The budget must be on a backend and batch size the sweep benchmarks, with a backend that runs its exports."""
    select = cfg.select
    where = loaded.where(("stages", name, "select"))
    check_budget_benchmarked(
        f"stages.{name}.select", where, select.backend, select.batch, f"stages.{name}.benchmark", cfg.benchmark
    )
    backend = BACKENDS.get(select.backend)
    suffixes = {FORMATS.get(PRECISIONS[t][1]).suffix for t in cfg.precisions}
    if backend.needs != "path" or not suffixes & set(backend.consumes):
        runs = "the PyTorch student" if backend.needs != "path" else ", ".join(backend.consumes)
        raise ConfigError(
            f"{where}: stages.{name}.select.backend: {select.backend!r} runs {runs}, none of the candidates' exports "
            f"({', '.join(sorted(suffixes))})",
            hint="budget on onnxruntime for ONNX precisions, tensorrt for trt-* precisions",
        )


def pareto_frontier(rows: list[dict[str, Any]]) -> list[str]:
    """The measured candidates no other beats on both accuracy (higher top-1) and latency (lower), in order of
    latency: the only ones worth deploying at some budget."""
    measured = [r for r in rows if r["status"] == "ok"]
    frontier = []
    for r in measured:
        dominated = any(
            o["top1"] >= r["top1"]
            and o["latency_ms"] <= r["latency_ms"]
            and (o["top1"] > r["top1"] or o["latency_ms"] < r["latency_ms"])
            for o in measured
        )
        if not dominated:
            frontier.append(r)
    return [r["candidate"] for r in sorted(frontier, key=lambda r: r["latency_ms"])]


def choose(rows: list[dict[str, Any]], select: SweepSelect) -> tuple[str | None, Gate | None]:
    """The most accurate measured candidate within the budget (ties: the faster), and the gate that chose it (None
    without a budget). No candidate measured, or none within the budget, is a failed gate; the latter names the
    closest candidate."""
    measured = [r for r in rows if r["status"] == "ok"]
    if not measured:
        message = f"no candidate was measured ({len(rows)} failed or missing): none to deploy"
        return None, Gate("candidates_measured", 1, 0, False, message)
    if select.max is None:
        best = max(measured, key=lambda r: (r["top1"], -r["latency_ms"]))
        return best["candidate"], None
    name = f"max_{select.metric}"
    within = [r for r in measured if r["latency_ms"] <= select.max]
    where = f"{select.metric} at batch {select.batch} on {select.backend}"
    if within:
        best = max(within, key=lambda r: (r["top1"], -r["latency_ms"]))
        message = (
            f"{best['candidate']}: {where} {best['latency_ms']:.3f} ms <= {select.max:g} ms, the most accurate of "
            f"{len(within)} within budget (top-1 {best['top1']:.4f})"
        )
        return best["candidate"], Gate(name, select.max, best["latency_ms"], True, message)
    closest = min(measured, key=lambda r: r["latency_ms"])
    message = (
        f"no candidate meets the budget {where} <= {select.max:g} ms; the closest is {closest['candidate']} at "
        f"{closest['latency_ms']:.3f} ms (top-1 {closest['top1']:.4f})"
    )
    return None, Gate(name, select.max, closest["latency_ms"], False, message)


def markdown_report(rows: list[dict[str, Any]], select: SweepSelect, chosen: str | None) -> str:
    """Every candidate in order of latency, the frontier marked, the chosen one in bold; failures at the end."""
    measured = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["latency_ms"])
    header = ["candidate", "params", "student top-1", "export top-1", "agreement", "p50 ms", "p99 ms", "size",
              "Pareto"]  # fmt: skip
    body = []
    for r in measured:
        name = f"**{r['candidate']}** (selected)" if r["candidate"] == chosen else r["candidate"]
        body.append(
            [
                name,
                f"{r['params'] / 1e6:.3f}M",
                f"{r['student_top1']:.4f}",
                f"{r['top1']:.4f}",
                f"{r['agreement']:.4f}",
                f"{r['p50_ms']:.3f}",
                f"{r['p99_ms']:.3f}",
                f"{r['size_bytes'] / 1e6:.2f} MB",
                "yes" if r["pareto"] else "",
            ]
        )
    budget = f"<= {select.max:g} ms" if select.max is not None else "none (the most accurate)"
    text = (
        f"Latency: {select.metric.replace('_ms', '')} at batch {select.batch} on {select.backend}; budget: {budget}. "
        "Pareto: no other candidate is both more accurate and faster.\n\n" + table(header, body, right=range(1, 8))
    )
    others = [r for r in rows if r["status"] != "ok"]
    if others:
        text += "\n\nLeft out of the choice:\n\n" + "\n".join(
            f"- {r['candidate']}: {r['status']} ({r.get('reason', '')})" for r in others
        )
    return text + "\n"


def render_pareto(rows: list[dict[str, Any]], select: SweepSelect, chosen: str | None) -> bytes | None:
    """Accuracy against latency as a PNG: every measured candidate, the frontier joined, the chosen one ringed and the
    budget as a vertical line. None when matplotlib is missing or nothing was measured."""
    measured = [r for r in rows if r["status"] == "ok"]
    if not measured:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no Pareto plot")
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for precision in sorted({r["precision"] for r in measured}):
        group = [r for r in measured if r["precision"] == precision]
        ax.scatter([r["latency_ms"] for r in group], [100 * r["top1"] for r in group], label=precision, s=28)
    front = sorted((r for r in measured if r["pareto"]), key=lambda r: r["latency_ms"])
    ax.plot([r["latency_ms"] for r in front], [100 * r["top1"] for r in front], "k--", lw=1, label="Pareto frontier")
    for r in measured:
        ax.annotate(r["job"], (r["latency_ms"], 100 * r["top1"]), fontsize=6, alpha=0.7, xytext=(3, 3),
                    textcoords="offset points")  # fmt: skip
    if chosen is not None:
        c = next(r for r in measured if r["candidate"] == chosen)
        ax.scatter([c["latency_ms"]], [100 * c["top1"]], s=160, facecolors="none", edgecolors="red", label="selected")
    if select.max is not None:
        ax.axvline(select.max, color="red", lw=1, alpha=0.6, label=f"budget {select.max:g} ms")
    ax.set_xscale("log")  # candidates span decades of latency; a far budget must not squash them together
    ax.set_xlabel(f"{select.metric.replace('_ms', '')} latency (ms, log scale), batch {select.batch}, {select.backend}")
    ax.set_ylabel("test top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()
