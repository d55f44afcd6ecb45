"""``qad`` stage: quantization-aware distillation. The distilled student is fake-quantized to int8 with NVIDIA
ModelOpt, calibrated on training images, fine-tuned with a distillation loss from the teacher, and exported as a QDQ
int8 ONNX (format ``onnx-int8-qad``), which gets the export stage's parity gates on real test images (against the
fine-tuned fake-quantized network, and the top-1 drop against the fp32 student) and is benchmarked and served like
any other export.

The stage also measures what it is for: post-training quantization of the same student into the same int8 layout
(``model.ptq.onnx``, same calibration images), so its result and the model card show fp32 vs PTQ vs QAD top-1 on
the test split. It always writes ModelOpt's signed symmetric QDQ graph as well, which an export stage with
``format: tensorrt`` and ``tensorrt.precision: int8`` that needs this stage builds its engine from.

Training runs in the kdpipe trainer, so a QAD run stopped mid-epoch resumes from its checkpoint like every other
training stage (the quantizers are re-inserted and re-calibrated deterministically, then the checkpoint's weights
and ranges are loaded over them).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, PositiveInt

from kdpipe.config import LoadedConfig, StageConfig, TrainConfig
from kdpipe.data import normalize
from kdpipe.distill.evaluate import evaluate
from kdpipe.distill.methods import create_method
from kdpipe.distill.methods.base import MethodContext, MethodParams
from kdpipe.distill.methods.kd import KDParams
from kdpipe.errors import ConfigError, Gate
from kdpipe.exports import export_onnx, quantize_int8
from kdpipe.exports.formats import mixed_precision, onnx_runner
from kdpipe.exports.qad import (
    QADInt8Format,
    export_qdq_onnx,
    fold_batchnorm,
    onnxruntime_overrides,
    quantize_model,
    quantizers,
    unquantized_layers,
    without_quantizers,
)
from kdpipe.registry import METHODS, STAGES
from kdpipe.requirements import EXPORT_HINT, Requirement, needs_module
from kdpipe.stages.base import Stage, StageResult
from kdpipe.stages.common import load_stage_model, test_loader, train_method, upstream_stage, with_method_union
from kdpipe.stages.export import (
    ParityConfig,
    calibration_images,
    check_opset_field,
    export_preprocessing,
    gate_and_record,
    heldout_images,
    mixed_precision_artifacts,
    record_mixed_precision,
)
from kdpipe.stages.outputs import ExportOutput, ModelOutput

log = logging.getLogger(__name__)

QDQ_GRAPH = "model.qdq.onnx"
"""ModelOpt's signed symmetric QDQ graph when the stage's own artifact is onnxruntime's layout (TensorRT's source)."""
PTQ_GRAPH = "model.ptq.onnx"
"""Post-training quantization of the fp32 student in the stage's int8 layout: the baseline QAD is measured against."""


def _default_train() -> TrainConfig:
    return TrainConfig(epochs=3, lr=0.01)


_METHOD_DOC = (
    "The distillation loss of the fine-tuning: any method that distils one student from a frozen teacher ({name: kd} "
    "by default; dkd, dpk, iakd, fusion_ratio), or 'distill' for the distill stage's own method and settings."
)


class QADConfig(StageConfig):
    """Fine-tune the distilled student under int8 fake quantization with the teacher, then export it as QDQ ONNX."""

    type: Literal["qad"]
    method: MethodParams | Literal["distill"] = Field(default_factory=KDParams)
    """The distillation loss of the fine-tuning (see ``_METHOD_DOC``)."""
    train: TrainConfig = Field(default_factory=_default_train)
    """Fine-tuning schedule; a short one at a small lr (default 3 epochs at 0.01, cosine)."""
    calibration_samples: PositiveInt = 512
    """Training images used to calibrate the activation ranges before fine-tuning (and the PTQ baseline's)."""
    fold_batchnorm: bool | None = None
    """Fold BatchNorm into the preceding convolutions before fine-tuning. Default (None): off with per-channel weights,
    on with per-tensor ones. Off is NVIDIA's own QAT recipe: BatchNorm keeps normalising with batch statistics while
    the network is fine-tuned, and is folded later, by onnxruntime's quantizer (``onnxruntime`` layout) or by
    TensorRT's engine builder; with per-output-channel weight scales the int8 grid of a convolution is the same folded
    or not (folding scales each output channel). With one scale per weight tensor it is not: the deployed graph
    quantizes the folded weight, whose largest value sets another grid than the unfolded one fine-tuning saw, so
    ``per_channel: false`` folds first unless told otherwise. On, the network fine-tunes without normalisation:
    measured to collapse a digits resnet8 under DKD (5x KD's gradient norm) at an lr that KD survives."""
    int8_layout: Literal["onnxruntime", "tensorrt"] = "onnxruntime"
    """The QDQ graph written. ``onnxruntime``: the fine-tuned network re-quantized by onnxruntime's static quantizer
    (uint8 activations with a quantized output after every conv), which its CPU kernels fuse into integer
    convolutions, at post-training quantization's latency; fine-tuning then fake-quantizes weights with the same bit
    width (7 bits while ``reduce_range``), and every layer's weight and input keep the scales fine-tuning trained
    (``onnxruntime_overrides``; the result's ``trained_scales`` lists any layer left to onnxruntime's calibration).
    ModelOpt's own graph quantizes only layer inputs, which onnxruntime leaves as float convolutions (measured 2.7-4x
    slower on digits' resnet8). ``tensorrt``: ModelOpt's signed symmetric QDQ graph as trained, what TensorRT builds
    int8 engines from (the stage's ``model.onnx`` in this layout; the onnxruntime layout writes it beside its own
    graph as ``model.qdq.onnx``)."""
    float_layers: list[str] = Field(default_factory=list)
    """Layers (fnmatch patterns of module names) allowed to stay float because ModelOpt cannot quantize them; any
    other such layer is an error that names it."""
    per_channel: bool = True
    """Per-output-channel weight scales, in fine-tuning and in the int8 graph; false: one scale per weight tensor (as
    onnx-int8's ``per_channel: false``)."""
    reduce_range: bool | None = None
    """``onnxruntime`` layout: 7-bit weights (default: as onnx-int8, on unless the CPU has VNNI-exact kernels)."""
    mixed_precision: int = Field(0, ge=0)
    """``onnxruntime`` layout: when the int8 graph agrees with the fine-tuned float graph on fewer than
    ``parity.min_agreement`` (default 0.95) of held-out images, keep up to this many of its most sensitive Conv/Gemm
    layers in float until it does (0: off); as the onnx-int8 export's ``mixed_precision``."""
    opset: int = 18
    dynamic_batch: bool = True
    max_batch_size: PositiveInt = 64
    parity: ParityConfig = Field(default_factory=ParityConfig)
    """Gates of the QDQ graph against the fine-tuned fake-quantized student it was exported from (onnxruntime's int8
    kernels vs ModelOpt's emulation; default: agreement >= 0.95, top-1 drop <= 0.01) on the test split."""
    max_drop_vs_fp32: float = Field(0.01, ge=0.0, le=1.0)
    """The gate that QAD exists for: the fp32 student's test top-1 minus the int8 export's (0.01 = one point)."""

    @property
    def folds_batchnorm(self) -> bool:
        """``fold_batchnorm`` resolved: as set, else on exactly when weights are quantized per tensor."""
        return self.fold_batchnorm if self.fold_batchnorm is not None else not self.per_channel


def qad_config_model() -> type[QADConfig]:
    """QADConfig with ``method`` as the union of the registered methods or ``'distill'``; which of them can fine-tune
    a quantized student is checked in preflight, with the reason."""
    return with_method_union(QADConfig, "method", lambda union: union | Literal["distill"], KDParams, _METHOD_DOC)


def _frozen_teacher_methods() -> list[str]:
    return [e.name for e in METHODS if e.obj.teacher_role == "frozen"]


def resolve_qad_method(name: str, config: Any, loaded: LoadedConfig) -> MethodParams:
    """The method params stage ``name`` fine-tunes with (``'distill'`` resolved to the distill stage's method),
    refused with the file:line and the choices when the method cannot fine-tune one quantized student against a
    frozen teacher, or cannot serve this student/teacher pair."""
    where = loaded.where(("stages", name, "method"))
    field = f"stages.{name}.method"
    student_stage = upstream_stage(loaded, name, "student")
    choices = ", ".join(_frozen_teacher_methods())
    params = config.method
    if params == "distill":
        method = getattr(student_stage[1], "method", None) if student_stage is not None else None
        if method is None:
            raise ConfigError(
                f"{where}: {field}: 'distill' reuses the distill stage's method, but the student comes from a stage "
                "without one",
                hint=f"name the method instead (one of {choices})",
            )
        params = method
    method_cls = METHODS.get(params.name)
    if method_cls.teacher_role != "frozen":
        role = "trains its networks together" if method_cls.teacher_role == "joint" else "uses no teacher"
        raise ConfigError(
            f"{where}: {field}: {params.name} {role}; quantization-aware distillation fine-tunes the one quantized "
            "student against the frozen teacher",
            hint=f"use one of {choices} (kd is the default)",
        )
    if method_cls.needs_val_split and loaded.config.data.val_fraction <= 0:
        raise ConfigError(
            f"{where}: {field}: {params.name} learns from a held-out validation split, but data.val_fraction is 0",
            hint="set data.val_fraction (e.g. 0.1)",
        )
    teacher_stage = upstream_stage(loaded, name, "teacher")
    student = getattr(student_stage[1], "student", None) if student_stage is not None else None
    teacher = getattr(teacher_stage[1], "model", None) if teacher_stage is not None else None
    if student is not None:
        try:
            method_cls.check_pair(params, str(student), str(teacher) if teacher is not None else None)
        except ValueError as exc:
            raise ConfigError(f"{where}: {field}: {exc}") from None
    return params


@STAGES.register("qad", summary="quantization-aware distillation: int8 fake-quant fine-tuning with the teacher")
class QADStage(Stage):
    Config = QADConfig
    Output = ExportOutput
    provides = frozenset({"export"})
    config: QADConfig

    @classmethod
    def config_model(cls) -> type[QADConfig]:
        return qad_config_model()

    @classmethod
    def requires(cls, config: Any) -> tuple[str, ...]:
        return ("student", "teacher")

    @classmethod
    def requirements(cls, name: str, config: Any, loaded: LoadedConfig) -> list[Requirement]:
        field, where = f"stages.{name}.type", loaded.where(("stages", name, "type"))
        return [
            needs_module(lib, field=field, where=where, value="qad", hint=EXPORT_HINT) for lib in QADInt8Format.requires
        ]

    @classmethod
    def preflight(cls, name: str, config: Any, loaded: LoadedConfig) -> None:
        check_opset_field(name, config.opset, loaded)
        resolve_qad_method(name, config, loaded)
        if config.mixed_precision and config.int8_layout == "tensorrt":
            raise ConfigError(
                f"{loaded.where(('stages', name, 'mixed_precision'))}: stages.{name}.mixed_precision: mixed precision "
                "re-quantizes onnxruntime's layout; with int8_layout: tensorrt the graph is ModelOpt's as trained",
                hint="set int8_layout: onnxruntime, or remove mixed_precision",
            )

    def _reduce_range(self) -> bool:
        # as quantize_int8 resolves it for onnxruntime's uint8 activations
        return self.config.reduce_range if self.config.reduce_range is not None else True

    def run(self) -> StageResult:
        ctx, cfg = self.ctx, self.config
        splits = ctx.data()
        student_rec, teacher_rec = ctx.require("student"), ctx.require("teacher")
        model_name = student_rec.output(ModelOutput).model_name
        method_params = ctx.pipeline.stages[student_rec.name].method if cfg.method == "distill" else cfg.method
        fp32 = load_stage_model(student_rec, splits, ctx.device).eval()
        teacher = load_stage_model(teacher_rec, splits, ctx.device)
        torch.manual_seed(ctx.seed)
        # a copy either way: quantization happens in place, and fp32 stays the reference
        fold = cfg.folds_batchnorm
        student = fold_batchnorm(fp32) if fold else copy.deepcopy(fp32).eval()
        calibration = calibration_images(splits, cfg.calibration_samples, ctx.seed).to(ctx.device)
        ort_layout = cfg.int8_layout == "onnxruntime"
        input_shape = (splits.in_chans, splits.image_size, splits.image_size)
        weight_bits = 7 if ort_layout and self._reduce_range() else 8
        quantized = quantize_model(student, calibration, weight_bits=weight_bits, per_channel=cfg.per_channel)
        left = {
            n: t for n, t in unquantized_layers(quantized).items() if not any(fnmatch(n, p) for p in cfg.float_layers)
        }
        if left:
            listed = ", ".join(f"{n} ({t})" for n, t in left.items())
            raise ConfigError(
                f"qad: ModelOpt cannot quantize {len(left)} layer(s) of {model_name}: {listed}",
                hint=f"keep them in float with stages.{ctx.name}.float_layers: {sorted(left)}, or export this student "
                "with format onnx-int8 (post-training quantization) instead",
            )
        n_quantizers = len(quantizers(quantized))

        pre = export_preprocessing(splits)
        meta = {"run": ctx.pipeline.name, "stage": ctx.name, "model": model_name}

        def onnx_fp32(model: torch.nn.Module, path: Path) -> Any:
            return export_onnx(
                model, path, preprocessing=pre, opset=cfg.opset, dynamic_batch=cfg.dynamic_batch, metadata=meta
            )

        def int8(fp32_path: Path, out: Path, float_nodes: Sequence[str] = (), trained: Any = None) -> Path:
            return quantize_int8(
                fp32_path,
                out,
                calibration.cpu(),
                per_channel=cfg.per_channel,
                reduce_range=self._reduce_range(),
                nodes_to_exclude=float_nodes,
                tensor_overrides=trained,
            )

        def qdq(model: torch.nn.Module, path: Path) -> Any:
            return export_qdq_onnx(
                model.cpu(), path, preprocessing=pre, opset=cfg.opset, dynamic_batch=cfg.dynamic_batch, metadata=meta
            )

        # Post-training quantization of the same student into the same layout: the baseline this stage must beat.
        ptq_path = ctx.dir / PTQ_GRAPH
        if ort_layout:
            ptq_fp32 = ctx.dir / "model.ptq.fp32.onnx"
            onnx_fp32(fp32.cpu(), ptq_fp32)
            int8(ptq_fp32, ptq_path)
            ptq_fp32.unlink()
        else:
            qdq(quantized, ptq_path)
        quantized.to(ctx.device)
        fp32.to(ctx.device)
        ptq_top1 = _onnx_top1(ctx, ptq_path)

        context = MethodContext.from_splits(
            splits,
            batch_size=cfg.train.batch_size,
            seed=ctx.seed,
            device=ctx.device,
            student_name=model_name,
            teacher_name=teacher_rec.output(ModelOutput).model_name,
            workers=ctx.pipeline.data.workers,
        )
        method = create_method(method_params, quantized, teacher, context)
        label = f"{ctx.name} (qad {method_params.name}: {model_name})"
        result = train_method(ctx, method, cfg.train, "fp32", label)
        deployed = method.deployable().eval()
        fp32_top1 = evaluate(fp32, test_loader(ctx), splits.num_classes).top1

        artifact = ctx.dir / "model.onnx"
        deployed = deployed.cpu()
        artifacts: dict[str, str] = {"ptq": PTQ_GRAPH}
        info: dict[str, Any] = {}
        if ort_layout:
            fp32_path = ctx.dir / "model.fp32.onnx"
            onnx_info = onnx_fp32(without_quantizers(deployed), fp32_path)

            def trained_scales(graph: Any) -> dict[str, list[dict[str, Any]]]:
                # the grids fine-tuning trained on, not onnxruntime's recalibration (see onnxruntime_overrides)
                overrides, skipped = onnxruntime_overrides(deployed, graph, reduce_range=self._reduce_range())
                info["trained_scales"] = {"tensors": len(overrides), "left_to_calibration": skipped}
                return overrides

            int8(fp32_path, artifact, trained=trained_scales)
            artifacts["fp32"] = fp32_path.name
            qdq(deployed, ctx.dir / QDQ_GRAPH)
            artifacts["qdq"] = QDQ_GRAPH
            if cfg.mixed_precision:
                gate = cfg.parity.min_agreement
                min_agreement = gate if gate is not None else QADInt8Format.parity["min_agreement"]
                assert min_agreement is not None

                def requantize(path: Path, float_nodes: Sequence[str]) -> Path:
                    return int8(fp32_path, path, float_nodes, trained_scales)

                held = heldout_images(splits, cfg.calibration_samples, 512, ctx.seed).numpy()
                mixed = mixed_precision(fp32_path, artifact, requantize, held, cfg.mixed_precision, min_agreement)
                record_mixed_precision(ctx.dir, artifact, mixed, input_shape)
                artifacts.update(mixed_precision_artifacts(mixed))
                info["mixed_precision"] = mixed
        else:
            onnx_info = qdq(deployed, artifact)
        run_exported = onnx_runner(artifact, cfg.dynamic_batch, cfg.max_batch_size)

        def versus_fp32(report: Any) -> list[Gate]:
            drop = fp32_top1 - report.export_top1
            ok = drop <= cfg.max_drop_vs_fp32 + 1e-9
            message = (
                f"{ctx.name}: int8 top-1 {report.export_top1:.4f} vs fp32 student {fp32_top1:.4f}: drop {drop:.4f} "
                f"{'<=' if ok else '>'} max_drop_vs_fp32 {cfg.max_drop_vs_fp32:.4f} (post-training quantization: "
                f"{ptq_top1:.4f})"
            )
            return [Gate("max_drop_vs_fp32", cfg.max_drop_vs_fp32, drop, ok, message)]

        fmt = QADInt8Format()
        return gate_and_record(
            ctx,
            model=deployed,  # fidelity of the graph to the fake-quantized network it was exported from
            run_exported=run_exported,
            batch_size=256,
            artifact=artifact,
            onnx_info=onnx_info,
            fmt_name=fmt.name,
            parity_cfg=cfg.parity,
            defaults=fmt.parity,
            source=student_rec.name,
            model_name=model_name,
            dynamic_batch=cfg.dynamic_batch,
            max_batch_size=cfg.max_batch_size,
            opset=cfg.opset,
            extra_artifacts=artifacts,
            extra_metrics={"fp32_top1": fp32_top1, "ptq_top1": ptq_top1},
            extra_gates=versus_fp32,
            extra_info={
                **info,
                "qdq_graph": "qdq" if ort_layout else "model",
                "qad": {
                    "fp32_top1": fp32_top1,
                    "ptq_top1": ptq_top1,
                    "quantizers": n_quantizers,
                    "weight_bits": weight_bits,
                    "per_channel": cfg.per_channel,
                    "batchnorm_folded": fold,
                    "int8_layout": cfg.int8_layout,
                    "calibration_samples": len(calibration),
                    "method": method_params.model_dump(mode="json"),
                    "epochs": cfg.train.epochs,
                    "history": result.history,
                    "train_seconds": result.seconds,
                    "resumed_from": result.resumed_from,
                },
            },
        )


def _onnx_top1(ctx: Any, path: Path) -> float:
    """Test top-1 of the ONNX graph at ``path`` on onnxruntime's CPU provider."""
    import numpy as np

    splits = ctx.data()
    run = onnx_runner(path, True, 256)
    correct = 0
    for start in range(0, len(splits.test), 1024):
        idx = torch.arange(start, min(start + 1024, len(splits.test)))
        images = normalize(splits.test.load(idx), splits.mean, splits.std).numpy()
        correct += int((np.argmax(run(images), 1) == splits.test.labels[idx].numpy()).sum())
    return correct / len(splits.test)
