"""``qad`` stage: quantization-aware distillation. The distilled student is fake-quantized to int8 with NVIDIA
ModelOpt (BatchNorm folded into its convolutions first), calibrated on training images, fine-tuned with a
distillation loss from the teacher, and exported as a QDQ int8 ONNX (format ``onnx-int8-qad``), which gets the
export stage's parity gates on real test images (against the fp32 student: top-1 agreement and top-1 drop) and is
benchmarked and served like any other export.

Training runs in the kdpipe trainer, so a QAD run stopped mid-epoch resumes from its checkpoint like every other
training stage (the quantizers are re-inserted and re-calibrated deterministically, then the checkpoint's weights
and ranges are loaded over them).
"""

from __future__ import annotations

import logging
from fnmatch import fnmatch
from typing import Any, Literal

import torch
from pydantic import Field, PositiveInt

from kdpipe.config import LoadedConfig, StageConfig, TrainConfig
from kdpipe.data import normalize
from kdpipe.distill.evaluate import evaluate
from kdpipe.distill.methods import create_method
from kdpipe.distill.methods.base import MethodContext
from kdpipe.distill.methods.kd import KDParams
from kdpipe.errors import ConfigError, Gate
from kdpipe.exports import export_onnx, quantize_int8
from kdpipe.exports.formats import onnx_runner
from kdpipe.exports.qad import (
    QADInt8Format,
    export_qdq_onnx,
    fold_batchnorm,
    quantize_model,
    quantizers,
    unquantized_layers,
    without_quantizers,
)
from kdpipe.registry import STAGES
from kdpipe.requirements import EXPORT_HINT, Requirement, needs_module
from kdpipe.stages.base import Stage, StageResult
from kdpipe.stages.common import load_stage_model, test_loader, train_method
from kdpipe.stages.export import ParityConfig, check_opset_field, export_preprocessing, gate_and_record
from kdpipe.stages.outputs import ExportOutput, ModelOutput

log = logging.getLogger(__name__)


def _default_train() -> TrainConfig:
    return TrainConfig(epochs=3, lr=0.01)


class QADConfig(StageConfig):
    """Fine-tune the distilled student under int8 fake quantization with the teacher, then export it as QDQ ONNX."""

    type: Literal["qad"]
    method: KDParams = Field(default_factory=KDParams)
    """The distillation loss of the fine-tuning: Hinton KD (temperature, ce_weight, kd_weight)."""
    train: TrainConfig = Field(default_factory=_default_train)
    """Fine-tuning schedule; a short one at a small lr (default 3 epochs at 0.01, cosine)."""
    calibration_samples: PositiveInt = 512
    """Training images used to calibrate the activation ranges before fine-tuning."""
    fold_batchnorm: bool = True
    """Fold BatchNorm into the preceding convolutions first (what int8 kernels run); off keeps BN as float ops."""
    int8_layout: Literal["onnxruntime", "tensorrt"] = "onnxruntime"
    """The QDQ graph written. ``onnxruntime``: the fine-tuned weights re-quantized by onnxruntime's static quantizer
    (uint8 activations with a quantized output after every conv), which its CPU kernels fuse into integer
    convolutions, at post-training quantization's latency; ModelOpt's own graph quantizes only layer inputs, which
    onnxruntime leaves as float convolutions (measured 2.7-4x slower on digits' resnet8). ``tensorrt``: ModelOpt's
    signed symmetric QDQ graph as trained, what TensorRT builds int8 engines from."""
    float_layers: list[str] = Field(default_factory=list)
    """Layers (fnmatch patterns of module names) allowed to stay float because ModelOpt cannot quantize them; any
    other such layer is an error that names it."""
    reduce_range: bool | None = None
    """``onnxruntime`` layout: 7-bit weights (default: as onnx-int8, on unless the CPU has VNNI-exact kernels)."""
    opset: int = 18
    dynamic_batch: bool = True
    max_batch_size: PositiveInt = 64
    parity: ParityConfig = Field(default_factory=ParityConfig)
    """Gates of the QDQ graph against the fine-tuned fake-quantized student it was exported from (onnxruntime's int8
    kernels vs ModelOpt's emulation; default: agreement >= 0.95, top-1 drop <= 0.01) on the test split."""
    max_drop_vs_fp32: float = Field(0.01, ge=0.0, le=1.0)
    """The gate that QAD exists for: the fp32 student's test top-1 minus the int8 export's (0.01 = one point)."""


@STAGES.register("qad", summary="quantization-aware distillation: int8 fake-quant fine-tuning with the teacher")
class QADStage(Stage):
    Config = QADConfig
    Output = ExportOutput
    provides = frozenset({"export"})
    config: QADConfig

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

    def run(self) -> StageResult:
        ctx, cfg = self.ctx, self.config
        splits = ctx.data()
        student_rec, teacher_rec = ctx.require("student"), ctx.require("teacher")
        model_name = student_rec.output(ModelOutput).model_name
        fp32 = load_stage_model(student_rec, splits, ctx.device).eval()
        teacher = load_stage_model(teacher_rec, splits, ctx.device)
        torch.manual_seed(ctx.seed)
        student = fold_batchnorm(fp32) if cfg.fold_batchnorm else fp32
        first = torch.arange(min(cfg.calibration_samples, len(splits.train)))
        calibration = normalize(splits.train.load(first), splits.mean, splits.std).to(ctx.device)
        quantized = quantize_model(student, calibration)
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
        before = evaluate(quantized, test_loader(ctx), splits.num_classes).top1  # post-training quantization
        context = MethodContext.from_splits(
            splits,
            batch_size=cfg.train.batch_size,
            seed=ctx.seed,
            device=ctx.device,
            student_name=model_name,
            teacher_name=teacher_rec.output(ModelOutput).model_name,
            workers=ctx.pipeline.data.workers,
        )
        method = create_method(cfg.method, quantized, teacher, context)
        label = f"{ctx.name} (qad {cfg.method.name}: {model_name})"
        result = train_method(ctx, method, cfg.train, "fp32", label)
        deployed = method.deployable().eval()
        after = evaluate(deployed, test_loader(ctx), splits.num_classes).top1

        artifact = ctx.dir / "model.onnx"
        deployed = deployed.cpu()
        meta = {"run": ctx.pipeline.name, "stage": ctx.name, "model": model_name}
        pre = export_preprocessing(splits)
        extra_artifacts: dict[str, str] = {}
        if cfg.int8_layout == "tensorrt":
            onnx_info = export_qdq_onnx(
                deployed, artifact, preprocessing=pre, opset=cfg.opset, dynamic_batch=cfg.dynamic_batch, metadata=meta
            )
        else:
            fp32_path = ctx.dir / "model.fp32.onnx"
            onnx_info = export_onnx(
                without_quantizers(deployed),
                fp32_path,
                preprocessing=pre,
                opset=cfg.opset,
                dynamic_batch=cfg.dynamic_batch,
                metadata=meta,
            )
            quantize_int8(fp32_path, artifact, calibration.cpu(), per_channel=True, reduce_range=cfg.reduce_range)
            extra_artifacts["fp32"] = fp32_path.name
        run_exported = onnx_runner(artifact, cfg.dynamic_batch, cfg.max_batch_size)
        fp32_top1 = evaluate(fp32, test_loader(ctx), splits.num_classes).top1

        def versus_fp32(report: Any) -> list[Gate]:
            drop = fp32_top1 - report.export_top1
            ok = drop <= cfg.max_drop_vs_fp32 + 1e-9
            message = (
                f"{ctx.name}: int8 top-1 {report.export_top1:.4f} vs fp32 student {fp32_top1:.4f}: drop {drop:.4f} "
                f"{'<=' if ok else '>'} max_drop_vs_fp32 {cfg.max_drop_vs_fp32:.4f}"
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
            extra_artifacts=extra_artifacts,
            extra_metrics={"fp32_top1": fp32_top1, "ptq_fake_quant_top1": before, "fake_quant_top1": after},
            extra_gates=versus_fp32,
            extra_info={
                "qad": {
                    "quantizers": n_quantizers,
                    "batchnorm_folded": cfg.fold_batchnorm,
                    "int8_layout": cfg.int8_layout,
                    "calibration_samples": len(first),
                    "method": cfg.method.model_dump(mode="json"),
                    "history": result.history,
                    "train_seconds": result.seconds,
                    "resumed_from": result.resumed_from,
                }
            },
        )
