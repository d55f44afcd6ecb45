"""``export`` stage: the deployable student as ONNX (fp32, fp16 or static-QDQ int8) or a TensorRT engine, proven
equal to the PyTorch student on real test images before it is accepted.

Every format is exported from the student of the nearest upstream distill (or teacher) stage, so each export
stage stands alone and several can feed one benchmark (``needs: [onnx, int8]``). Parity is measured on the test
split: max |logit diff|, top-1 agreement with PyTorch and the export's own top-1; a miss fails the gate (exit 4)
after the report is written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, PositiveInt, ValidationError, ValidationInfo, field_validator, model_validator

from kdpipe.config import LoadedConfig, StageConfig, StrictModel
from kdpipe.data import normalize, sample_indices
from kdpipe.errors import ConfigError, Gate, GateFailed, StageError
from kdpipe.exports.formats import ExportJob, get_format
from kdpipe.fileio import atomic_write_json
from kdpipe.registry import STAGES
from kdpipe.requirements import Requirement, needs_cuda, needs_module
from kdpipe.stages.base import Stage, StageResult
from kdpipe.stages.common import load_stage_model
from kdpipe.stages.outputs import ExportOutput, ModelOutput

log = logging.getLogger(__name__)


class ParityConfig(StrictModel):
    """Gates on the exported model against the PyTorch student, measured on the test split. Unset = the format's
    default (fp32: |diff| <= 1e-3, agreement >= 0.999; fp16: 0.1, 0.99; int8: agreement >= 0.95, drop <= 0.01)."""

    max_abs_diff: float | None = Field(None, ge=0.0)
    """Largest allowed |logit difference| over all test images and classes."""
    min_agreement: float | None = Field(None, ge=0.0, le=1.0)
    """Share of test images whose top-1 class matches PyTorch's."""
    max_top1_drop: float | None = Field(None, ge=0.0, le=1.0)
    """PyTorch top-1 minus the export's top-1 (a fraction: 0.01 = one point)."""
    samples: PositiveInt | None = None
    """Test images to use: a seeded random sample over every class (default: the whole test split)."""


class TensorRTConfig(StrictModel):
    precision: Literal["fp32", "fp16", "int8"] = "fp16"
    """int8 needs a QDQ graph: it is built from a calibrated int8 ONNX (TensorRT 11 has no calibrator)."""
    min_batch: PositiveInt = 1
    opt_batch: PositiveInt = 8
    max_batch: PositiveInt = 64
    workspace_gb: float = Field(4.0, gt=0)

    @model_validator(mode="after")
    def _profile(self) -> TensorRTConfig:
        if self.max_batch < self.opt_batch:
            raise ValueError("tensorrt.max_batch must be >= tensorrt.opt_batch")
        if self.opt_batch < self.min_batch:
            raise ValueError("tensorrt.opt_batch must be >= tensorrt.min_batch")
        return self


class ExportConfig(StageConfig):
    """Export the deployable student and check it against PyTorch on real images."""

    type: Literal["export"]
    format: str = "onnx"
    """onnx | onnx-fp16 | onnx-int8 | tensorrt, or a plugin's format (kdpipe list formats)."""
    opset: int = 18
    """ONNX opset (kdpipe checks it against the installed exporter's range)."""
    dynamic_batch: bool = True
    """A symbolic batch dimension (checked by running batch 1 and batch 8 through onnxruntime)."""
    max_batch_size: PositiveInt = 64
    """Largest batch the artifact is meant to serve (Triton max_batch_size, TensorRT profile max)."""
    simplify: bool = True
    """Simplify the graph with onnxslim (kept only when outputs are unchanged)."""
    parity: ParityConfig = Field(default_factory=ParityConfig)
    calibration_samples: PositiveInt = 512
    """onnx-int8 (and tensorrt int8): training images used to calibrate activation ranges."""
    per_channel: bool = True
    """onnx-int8: per-output-channel weight scales."""
    reduce_range: bool | None = None
    """int8: 7-bit weights. Default: on for onnx-int8 (exact on x86 CPUs without AVX-512 VNNI, where 8-bit
    weights saturate onnxruntime's 16-bit intermediates), off for TensorRT int8. false: 8-bit weights, for CPUs
    known to have VNNI."""
    mixed_precision: int = Field(0, ge=0)
    """onnx-int8: when the int8 graph misses the min_agreement gate on held-out images, keep up to this many of its
    most sensitive Conv/Gemm layers in float until it meets it (0: off). The layers chosen and the batch-1 latency of
    both graphs go to mixed_precision.json, the stage result and the card."""
    tensorrt: TensorRTConfig = Field(default_factory=TensorRTConfig)
    options: dict[str, Any] = Field(default_factory=dict)
    """The format's own settings (a plugin format's ``Params``); the built-in formats take none."""

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        try:
            fmt = get_format(value)  # raises a ConfigError with did-you-mean
        except ConfigError as exc:  # as a ValueError, pydantic reports it at its file:line and field
            raise ValueError(exc.message) from None
        if fmt.made_by is not None:
            raise ValueError(f"format {value!r} is made by a stage of type {fmt.made_by!r}, not by an export stage")
        return value

    @field_validator("options")
    @classmethod
    def _format_options(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        name = info.data.get("format")
        if name is None:  # the format itself was refused
            return value
        params = get_format(name).Params
        try:
            params.model_validate(value)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(options)'}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"format {name!r} options: {problems}") from None
        return value

    def format_options(self) -> BaseModel:
        """``options`` parsed by the format's ``Params`` model."""
        return get_format(self.format).Params.model_validate(self.options)

    @model_validator(mode="after")
    def _consistent(self) -> ExportConfig:
        if not self.dynamic_batch and self.max_batch_size != 1:
            raise ValueError("a static export serves batch 1 only: set max_batch_size: 1 or dynamic_batch: true")
        return self


@STAGES.register("export", summary="ONNX fp32/fp16/int8 or TensorRT, with a parity gate on real images")
class ExportStage(Stage):
    Config = ExportConfig
    Output = ExportOutput
    provides = frozenset({"export"})
    config: ExportConfig

    @classmethod
    def requires(cls, config: Any) -> tuple[str, ...]:
        return ("model",)

    @classmethod
    def requirements(cls, name: str, config: Any, loaded: LoadedConfig) -> list[Requirement]:
        fmt = get_format(config.format)
        field, where = f"stages.{name}.format", loaded.where(("stages", name, "format"))
        reqs = [needs_module(lib, field=field, where=where, value=config.format, hint=fmt.hint) for lib in fmt.requires]
        if fmt.needs_cuda:  # e.g. TensorRT builds and runs engines on a GPU only
            reqs.append(needs_cuda(field=field, where=where, value=config.format))
        return reqs

    @classmethod
    def preflight(cls, name: str, config: Any, loaded: LoadedConfig) -> None:
        check_opset_field(name, config.opset, loaded)
        names = list(loaded.config.stages)
        needs = config.needs if config.needs is not None else names[max(names.index(name) - 1, 0) : names.index(name)]
        qad = [n for n in needs if loaded.config.stages[n].type == "qad"]
        if qad and config.format == "tensorrt" and config.tensorrt.precision != "int8":
            raise ConfigError(
                f"{loaded.where(('stages', name, 'tensorrt'))}: stages.{name}.tensorrt.precision: an engine built "
                f"after qad stage {qad[0]!r} is int8, from its fine-tuned QDQ graph",
                hint=f"set stages.{name}.tensorrt.precision: int8, or drop {qad[0]!r} from its needs",
            )

    def run(self) -> StageResult:
        from kdpipe.exports import export_onnx

        ctx, cfg = self.ctx, self.config
        fmt = get_format(cfg.format)
        splits = ctx.data()
        record = ctx.find("student") or ctx.require("model")
        model = load_stage_model(record, splits, torch.device("cpu"))
        model_name = record.output(ModelOutput).model_name
        pre = export_preprocessing(splits)
        meta = {"run": ctx.pipeline.name, "stage": ctx.name, "model": model_name}
        fp32_path = ctx.dir / "model.fp32.onnx"
        onnx_info = export_onnx(
            model,
            fp32_path,
            preprocessing=pre,
            opset=cfg.opset,
            dynamic_batch=cfg.dynamic_batch,
            simplify=cfg.simplify,
            metadata=meta,
        )

        def calibration(n: int) -> torch.Tensor:
            return calibration_images(splits, n, ctx.seed)

        def heldout(n: int) -> torch.Tensor:
            return heldout_images(splits, cfg.calibration_samples, n, ctx.seed)

        qdq = upstream_qdq_graph(ctx)
        job = ExportJob(
            qdq_source=qdq[1] if qdq is not None else None,
            model=model,
            fp32_path=fp32_path,
            onnx=onnx_info,
            out_dir=ctx.dir,
            input_shape=(splits.in_chans, splits.image_size, splits.image_size),
            settings=cfg,
            options=cfg.format_options(),
            calibration=calibration,
            heldout=heldout,
        )
        artifact = fmt.export(job)
        if artifact.suffix != fmt.suffix or not artifact.is_file():
            raise StageError(f"export format {fmt.name!r} did not write a {fmt.suffix} file (got {artifact})")
        mixed = job.info.get("mixed_precision")
        if mixed is not None:
            record_mixed_precision(ctx.dir, artifact, mixed, job.input_shape)

        run_exported, batch = fmt.open_runner(artifact, job)
        return gate_and_record(
            ctx,
            model=model,
            run_exported=run_exported,
            batch_size=batch,
            artifact=artifact,
            onnx_info=onnx_info,
            fmt_name=cfg.format,
            parity_cfg=cfg.parity,
            defaults=fmt.parity_defaults(cfg),
            source=record.name,
            model_name=model_name,
            dynamic_batch=cfg.dynamic_batch,
            max_batch_size=cfg.max_batch_size,
            opset=cfg.opset,
            extra_artifacts={
                **({"fp32": fp32_path.name} if artifact != fp32_path and fp32_path.is_file() else {}),
                **(mixed_precision_artifacts(mixed) if mixed is not None else {}),
            },
            extra_info=job.info,
        )


def upstream_qdq_graph(ctx: Any) -> tuple[str, Path] | None:
    """(stage, path) of the signed QDQ graph a stage this one directly needs recorded (a qad stage's), if any."""
    for record in ctx.upstream:
        if record.name in ctx.needs and "export" in STAGES.get(record.type).provides:
            key = record.output(ExportOutput).qdq_graph
            if key is not None:
                return record.name, record.artifact(key)
    return None


CALIBRATION = "calibration"
"""The ``sample_indices`` purpose of int8 calibration images (drawn from the train split)."""


def calibration_images(splits: Any, n: int, seed: int) -> torch.Tensor:
    """``n`` normalised training images for int8 calibration, drawn at random (seeded) from the whole train split, so
    they cover its classes even where its files are in class order (an ImageFolder)."""
    idx = sample_indices(len(splits.train), n, seed, CALIBRATION)
    return normalize(splits.train.load(idx), splits.mean, splits.std)


def heldout_images(splits: Any, calibration_samples: int, n: int, seed: int) -> torch.Tensor:
    """Up to ``n`` normalised images neither calibrated on nor tested on, drawn at random (seeded): from the validation
    split, else from the training images the calibration's draw left out (all training images when none are left:
    tiny datasets)."""
    if splits.val is not None and len(splits.val) > 0:
        idx = sample_indices(len(splits.val), n, seed, "heldout")
        return normalize(splits.val.load(idx), splits.mean, splits.std)
    order = sample_indices(len(splits.train), len(splits.train), seed, CALIBRATION)  # the calibration draw, whole
    idx = order[calibration_samples : calibration_samples + n]
    if len(idx) == 0:
        idx = order[:n]
    return normalize(splits.train.load(idx), splits.mean, splits.std)


def record_mixed_precision(
    out_dir: Path, artifact: Path, record: dict[str, Any], input_shape: tuple[int, int, int]
) -> None:
    """Finish a mixed-precision record (``kdpipe.exports.mixed_precision``): when layers were kept in float, the
    latency cost, measured by the benchmark machinery on onnxruntime at batch 1 (p50 of the all-int8 graph and of the
    mixed one, torch's thread count); then write it to ``mixed_precision.json``."""
    if record.get("float_layers"):
        from kdpipe.bench import BenchTarget, run_benchmark

        graphs = {"int8": out_dir / record["all_int8"], "mixed": artifact}
        targets = [BenchTarget(label, "onnxruntime", path) for label, path in graphs.items()]
        cells = run_benchmark(targets, [1], input_shape, warmup=10, min_iterations=50, min_time_s=0.5, device="cpu")
        record["p50_ms_batch1"] = {c.model: c.p50_ms for c in cells}
    atomic_write_json(out_dir / "mixed_precision.json", record)


def mixed_precision_artifacts(record: dict[str, Any]) -> dict[str, str]:
    """The files a mixed-precision search leaves in the stage folder, by artifact key."""
    files = {"mixed_precision": "mixed_precision.json"}
    if "all_int8" in record:
        files["all_int8"] = record["all_int8"]
    return files


def check_opset_field(name: str, opset: int, loaded: LoadedConfig) -> None:
    """``stages.<name>.opset`` within the installed exporter's range, else a ConfigError at its file:line."""
    from kdpipe.exports import check_opset

    try:
        check_opset(opset)
    except ConfigError as exc:
        raise ConfigError(f"{loaded.where(('stages', name, 'opset'))}: stages.{name}.opset: {exc.message}") from None


def export_preprocessing(splits: Any) -> Any:
    """What a client applies before sending pixels, as the ONNX metadata and the Triton config record it."""
    from kdpipe.exports import Preprocessing

    return Preprocessing(
        mean=tuple(splits.mean),
        std=tuple(splits.std),
        image_size=splits.image_size,
        in_chans=splits.in_chans,
        channel_order="RGB" if splits.in_chans == 3 else "L",
        classes=tuple(splits.classes),
        crop_pct=splits.crop_pct,
        interpolation=splits.interpolation,
    )


def gate_and_record(
    ctx: Any,
    *,
    model: torch.nn.Module,
    run_exported: Any,
    batch_size: int,
    artifact: Path,
    onnx_info: Any,
    fmt_name: str,
    parity_cfg: ParityConfig,
    defaults: dict[str, float | None],
    source: str,
    model_name: str,
    dynamic_batch: bool,
    max_batch_size: int,
    opset: int,
    extra_artifacts: dict[str, str] | None = None,
    extra_info: dict[str, Any] | None = None,
    extra_metrics: dict[str, Any] | None = None,
    extra_gates: Callable[[Any], list[Gate]] | None = None,
) -> StageResult:
    """Parity of an exported artifact on real test images (never dummies) against the PyTorch ``model``, its gates
    (``parity_cfg`` over the format's ``defaults``; a miss raises GateFailed after parity.json is written), and the
    stage result every export records (an ``ExportOutput``). Shared by the export and qad stages; ``extra_gates``
    makes a stage's own gates from the parity report (the qad stage's drop against the fp32 student)."""
    from kdpipe.exports import ParityTolerance, measure_parity, parity_gates

    splits = ctx.data()
    if parity_cfg.samples is not None and parity_cfg.samples < len(splits.test):  # a sample over every class
        idx = sample_indices(len(splits.test), parity_cfg.samples, ctx.seed, "parity")
    else:
        idx = torch.arange(len(splits.test))
    images = normalize(splits.test.load(idx), splits.mean, splits.std)
    labels = splits.test.labels[idx]
    report = measure_parity(model, run_exported, images, labels, batch_size=batch_size)
    gates = {k: getattr(parity_cfg, k) if getattr(parity_cfg, k) is not None else v for k, v in defaults.items()}
    outcomes = parity_gates(report, ParityTolerance(**gates), label=f"{ctx.name} ({fmt_name})")
    if extra_gates is not None:
        outcomes += extra_gates(report)
    failures = [g.message for g in outcomes if not g.passed]
    parity = {
        **report.to_dict(),
        "tolerances": gates,
        "passed": not failures,
        "failures": failures,
        "gates": [g.to_dict() for g in outcomes],
    }
    atomic_write_json(ctx.dir / "parity.json", parity)
    if failures:
        raise GateFailed("; ".join(failures), hint=f"the parity report is in {ctx.dir / 'parity.json'}", gates=outcomes)
    artifacts = {"model": artifact.name, "parity": "parity.json", **(extra_artifacts or {})}
    size = artifact.stat().st_size
    metrics = {
        "top1": report.export_top1,
        "torch_top1": report.torch_top1,
        "top1_agreement": report.top1_agreement,
        "max_abs_diff": report.max_abs_diff,
        "size_bytes": size,
        **(extra_metrics or {}),
    }
    return StageResult(
        metrics=metrics,
        artifacts=artifacts,
        summary=(
            f"{artifact.name} ({fmt_name}, {size / 1e6:.2f} MB): top-1 {report.export_top1:.4f} "
            f"(torch {report.torch_top1:.4f}), agreement {report.top1_agreement:.4f}, "
            f"max |diff| {report.max_abs_diff:.2e}"
        ),
        info={
            "model_name": model_name,
            "format": fmt_name,
            "source_stage": source,
            "input_name": onnx_info.input_name,
            "output_name": onnx_info.output_name,
            "input_shape": [splits.in_chans, splits.image_size, splits.image_size],
            "num_classes": splits.num_classes,
            "dynamic_batch": dynamic_batch,
            "max_batch_size": max_batch_size if dynamic_batch else 1,
            "opset": opset,
            "simplified": onnx_info.simplified,
            "parity": parity,
            "gates": parity["gates"],
            **(extra_info or {}),
        },
    )
