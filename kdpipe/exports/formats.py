"""Export formats: one object per format, registered in ``kdpipe.registry.FORMATS``.

A format says everything the pipeline needs to know about it, so that validation, the export stage, its parity
gate, the benchmark stage, stand-alone ``kdpipe bench``, the Triton ``serve`` stage and the model card all ask the
registry instead of branching on format names:

- ``name``, ``summary`` and ``suffix`` (the artifact's file suffix, ``.onnx``, ``.plan``);
- ``requires`` (import names) with an install ``hint``, and ``needs_cuda``;
- ``parity``: the default gates of its parity check against the PyTorch student;
- ``Params``: a pydantic model of its own settings, given under ``options:`` in the export stage;
- ``export(job)``: write the artifact from the job (the student, its fp32 ONNX, the stage's settings);
- ``open_runner(path, job)``: a callable running the artifact on a numpy batch, for the parity check;
- ``triton_platform``: the Triton platform that serves the artifact (``None``: the format cannot be served).

Adding a format is one subclass in one file, registered with ``FORMATS.register(name)(MyFormat())``; see
CONTRIBUTING.md. Heavy libraries (onnxruntime, tensorrt) are imported inside the methods that use them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from kdpipe.exports.onnx import OnnxExport
from kdpipe.registry import FORMATS
from kdpipe.requirements import EXPORT_HINT, TENSORRT_HINT

log = logging.getLogger(__name__)

Runner = Callable[[np.ndarray], np.ndarray]
"""Runs the exported model on a float32 ``(N, C, H, W)`` batch and returns ``(N, num_classes)`` logits."""

TRITON_PLATFORMS = ("onnxruntime_onnx", "tensorrt_plan")


class NoParams(BaseModel):
    """A format without settings of its own: ``options:`` must be empty."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class ExportJob:
    """What a format's ``export`` gets: the student, its fp32 ONNX (always written first: the interchange every
    built-in format starts from), where to write, the export stage's settings and a source of calibration images."""

    model: nn.Module
    """The PyTorch student on the CPU, in eval mode."""
    fp32_path: Path
    onnx: OnnxExport
    """What ``export_onnx`` wrote to ``fp32_path`` (input/output names, simplification)."""
    out_dir: Path
    input_shape: tuple[int, int, int]
    """``(C, H, W)`` of one input image."""
    settings: Any
    """The export stage's validated config (``ExportConfig``)."""
    options: BaseModel
    """The format's own settings: ``settings.options`` validated against the format's ``Params``."""
    calibration: Callable[[int], torch.Tensor]
    """``calibration(n)``: ``n`` normalised training images drawn at random (seeded) from the whole train split, for
    int8 range calibration."""
    heldout: Callable[[int], torch.Tensor] | None = None
    """``heldout(n)``: up to ``n`` normalised images neither calibrated on nor tested on (the validation split, else
    training images the calibration's draw left out), for choices such as which layers stay in float."""
    info: dict[str, Any] = field(default_factory=dict)
    """Extra facts for the stage result (``info``), filled by the format (a TensorRT engine's stamp)."""
    qdq_source: Path | None = None
    """A signed symmetric QDQ graph made upstream (a ``qad`` stage's, fine-tuned under fake quantization) that an
    int8 format builds from instead of calibrating the fp32 graph itself."""


class ExportFormat:
    """Base class of an export format. Subclasses set the class attributes and implement ``export``; the default
    ``open_runner`` runs an ONNX artifact on onnxruntime's CPU provider."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    suffix: ClassVar[str] = ".onnx"
    requires: ClassVar[tuple[str, ...]] = ("onnx", "onnxruntime")
    hint: ClassVar[str] = EXPORT_HINT
    needs_cuda: ClassVar[bool] = False
    parity: ClassVar[dict[str, float | None]] = {
        "max_abs_diff": 1e-3,
        "min_agreement": 0.999,
        "max_top1_drop": 0.001,
    }
    """Default gates: max |logit diff| (None: not gated), top-1 agreement with PyTorch, top-1 drop."""
    Params: ClassVar[type[BaseModel]] = NoParams
    triton_platform: ClassVar[str | None] = "onnxruntime_onnx"
    made_by: ClassVar[str | None] = None
    """The stage type that produces this format's artifacts when an export stage cannot (``qad`` trains before it
    exports); the export stage refuses such a format and names that stage type."""

    def export(self, job: ExportJob) -> Path:
        """Write the artifact (suffix ``self.suffix``) into ``job.out_dir`` and return its path."""
        raise NotImplementedError

    def parity_defaults(self, settings: Any) -> dict[str, float | None]:
        """The default gates for an export with these stage settings (``parity``, unless the format's precision is
        a setting, as TensorRT's is)."""
        return dict(self.parity)

    def open_runner(self, path: Path, job: ExportJob) -> tuple[Runner, int]:
        """A runner for the artifact at ``path`` and the batch size the parity check feeds it."""
        return onnx_runner(path, job.settings.dynamic_batch, job.settings.max_batch_size), 256

    def artifact_name(self, job: ExportJob) -> str:
        return "model" + self.suffix


def onnx_runner(path: Path, dynamic_batch: bool, max_batch_size: int) -> Runner:
    """Runs the ONNX graph at ``path`` on onnxruntime's CPU provider in chunks of the batch it serves
    (``max_batch_size``, or 1 for a static graph)."""
    from kdpipe.exports.runtime import create_onnx_session, run_onnx

    session = create_onnx_session(path)
    batch = max_batch_size if dynamic_batch else 1

    def run(x: np.ndarray) -> np.ndarray:
        return run_onnx(session, x, batch_size=batch)

    return run


def register_format(fmt: ExportFormat) -> ExportFormat:
    """Register ``fmt`` under its ``name`` (checked for what the pipeline relies on)."""
    if not fmt.name or not fmt.suffix.startswith("."):
        raise ValueError(f"{type(fmt).__name__}: set name and a suffix starting with '.'")
    if fmt.triton_platform is not None and fmt.triton_platform not in TRITON_PLATFORMS:
        raise ValueError(f"{fmt.name}: triton_platform must be one of {TRITON_PLATFORMS} or None")
    missing = {"max_abs_diff", "min_agreement", "max_top1_drop"} - set(fmt.parity)
    if missing:
        raise ValueError(f"{fmt.name}: parity lacks {sorted(missing)}")
    FORMATS.register(fmt.name, summary=fmt.summary)(fmt)
    return fmt


def get_format(name: str) -> ExportFormat:
    """The registered format ``name`` (a ConfigError with did-you-mean for an unknown one)."""
    fmt: ExportFormat = FORMATS.get(name)
    return fmt


# ---------------------------------------------------------------------------------------------------------------------
# The built-in formats
# ---------------------------------------------------------------------------------------------------------------------


class OnnxFormat(ExportFormat):
    name = "onnx"
    summary = "fp32 ONNX with a symbolic batch dimension"

    def export(self, job: ExportJob) -> Path:
        out = job.out_dir / self.artifact_name(job)
        return job.fp32_path.replace(out)  # the fp32 graph is the artifact


class OnnxFp16Format(ExportFormat):
    name = "onnx-fp16"
    summary = "fp16 ONNX, fp32 inputs/outputs kept"
    parity: ClassVar[dict[str, float | None]] = {"max_abs_diff": 0.1, "min_agreement": 0.99, "max_top1_drop": 0.005}

    def export(self, job: ExportJob) -> Path:
        from kdpipe.exports.quantize import convert_fp16

        return convert_fp16(job.fp32_path, job.out_dir / self.artifact_name(job))


def _int8(job: ExportJob, out: Path, *, for_tensorrt: bool, float_nodes: Sequence[str] = ()) -> Path:
    from kdpipe.exports.quantize import quantize_int8

    cfg = job.settings
    # onnxruntime's CPU kernels fuse uint8 activations; TensorRT only accepts signed symmetric int8 Q/DQ
    return quantize_int8(
        job.fp32_path,
        out,
        job.calibration(cfg.calibration_samples),
        per_channel=cfg.per_channel,
        activation_type="int8" if for_tensorrt else "uint8",
        reduce_range=cfg.reduce_range,
        nodes_to_exclude=float_nodes,
    )


def _top1(path: Path, images: np.ndarray) -> np.ndarray:
    from kdpipe.exports.runtime import create_onnx_session, run_onnx

    return run_onnx(create_onnx_session(path), images, batch_size=64).argmax(1)


ALL_INT8 = "model.all_int8.onnx"
"""Where mixed precision keeps the graph with every layer in int8 beside the mixed one, for the latency comparison."""


def mixed_precision(
    fp32_path: Path,
    out: Path,
    quantize: Callable[[Path, Sequence[str]], Path],
    heldout: np.ndarray,
    budget: int,
    min_agreement: float,
) -> dict[str, Any]:
    """Parity-gated mixed precision for an int8 graph ``out`` quantized from ``fp32_path`` by ``quantize(path,
    float_nodes)`` (which writes the int8 graph to ``path`` with ``float_nodes`` left in float): when it agrees with
    the fp32 graph on fewer than ``min_agreement`` of the ``heldout`` images, rank every Conv/Gemm/MatMul by how much
    keeping it alone in float raises that agreement, then keep the best ones in float, one more at a time, until the
    agreement is met or ``budget`` layers are float. ``out`` is rewritten with the result and the all-int8 graph is
    kept beside it as ``ALL_INT8`` (for the latency comparison, which the stage measures). Returns the record (chosen
    layers, the agreements, the ranking) for the stage result and the card."""
    from kdpipe.exports.quantize import quantizable_nodes

    reference = _top1(fp32_path, heldout)

    def agreement(path: Path) -> float:
        return float((_top1(path, heldout) == reference).mean())

    record: dict[str, Any] = {
        "budget": budget,
        "min_agreement": min_agreement,
        "heldout_images": len(heldout),
        "agreement_int8": agreement(out),
        "float_layers": [],
    }
    if record["agreement_int8"] >= min_agreement:
        record["agreement_mixed"] = record["agreement_int8"]
        return record
    trial = out.with_name("mixed.trial.onnx")
    gains = []
    for node in quantizable_nodes(fp32_path):
        quantize(trial, [node])
        gains.append((agreement(trial) - record["agreement_int8"], node))
    gains.sort(key=lambda g: -g[0])
    record["ranking"] = [{"layer": n, "gain": g} for g, n in gains[:10]]
    all_int8 = out.with_name(ALL_INT8)
    out.replace(all_int8)
    # Greedy forward selection in ranked order: a layer stays in float only when it raises the agreement reached so
    # far (two layers that each fix an image alone can undo each other together), so the result never agrees less
    # than a shorter prefix would have; trials stop at the gate, the budget, or the end of the ranking.
    chosen: list[str] = []
    reached = record["agreement_int8"]
    for _, node in gains:
        if len(chosen) >= budget or reached >= min_agreement:
            break
        quantize(trial, [*chosen, node])
        tried = agreement(trial)
        if tried > reached:
            chosen.append(node)
            reached = tried
    trial.unlink(missing_ok=True)
    quantize(out, chosen)  # the graph written is the best set found (with none, the all-int8 graph again)
    record.update(float_layers=chosen, agreement_mixed=reached, all_int8=all_int8.name)
    log.info(
        "mixed precision: %s kept in float, held-out agreement %.4f -> %.4f", chosen, record["agreement_int8"], reached
    )
    return record


class OnnxInt8Format(ExportFormat):
    name = "onnx-int8"
    summary = "static QDQ int8 ONNX calibrated on training images"
    parity: ClassVar[dict[str, float | None]] = {"max_abs_diff": None, "min_agreement": 0.95, "max_top1_drop": 0.01}

    def export(self, job: ExportJob) -> Path:
        out = _int8(job, job.out_dir / self.artifact_name(job), for_tensorrt=False)
        budget = job.settings.mixed_precision
        if budget > 0:
            if job.heldout is None:
                raise ValueError("mixed precision needs held-out images")
            gate = job.settings.parity.min_agreement
            min_agreement = gate if gate is not None else self.parity["min_agreement"]
            assert min_agreement is not None  # onnx-int8 always gates agreement

            def quantize(path: Path, float_nodes: Sequence[str]) -> Path:
                return _int8(job, path, for_tensorrt=False, float_nodes=float_nodes)

            record = mixed_precision(
                job.fp32_path, out, quantize, job.heldout(512).numpy(), budget, float(min_agreement)
            )
            job.info["mixed_precision"] = record
        return out


class TensorRTFormat(ExportFormat):
    name = "tensorrt"
    summary = "TensorRT engine built from the ONNX (fp16/int8 via QDQ on TensorRT 11)"
    suffix = ".plan"
    requires = ("tensorrt", "onnx")
    hint = TENSORRT_HINT
    needs_cuda = True
    parity: ClassVar[dict[str, float | None]] = {"max_abs_diff": 0.1, "min_agreement": 0.99, "max_top1_drop": 0.005}
    triton_platform = "tensorrt_plan"

    def export(self, job: ExportJob) -> Path:
        from kdpipe.exports.quantize import convert_fp16
        from kdpipe.exports.tensorrt import build_engine

        trt = job.settings.tensorrt
        source = job.fp32_path
        if trt.precision == "int8":
            # a qad stage's QDQ graph when the export needs one, else post-training quantization here
            source = job.qdq_source or _int8(job, job.out_dir / "model.int8.onnx", for_tensorrt=True)
            job.info["engine_source"] = str(source.relative_to(job.out_dir.parent))  # relative to the run directory
        elif trt.precision == "fp16":
            source = convert_fp16(job.fp32_path, job.out_dir / "model.fp16.onnx")
        out = job.out_dir / self.artifact_name(job)
        stamp = build_engine(
            source,
            out,
            precision=trt.precision,
            min_batch=trt.min_batch,
            opt_batch=trt.opt_batch,
            max_batch=trt.max_batch,
            workspace_gb=trt.workspace_gb,
        )
        job.info["engine"] = vars(stamp)
        return out

    def parity_defaults(self, settings: Any) -> dict[str, float | None]:
        """An int8 engine is gated as onnx-int8 is (agreement and top-1 drop, no logit bound); fp16/fp32 as fp16."""
        if settings.tensorrt.precision == "int8":
            return dict(OnnxInt8Format.parity)
        return dict(self.parity)

    def open_runner(self, path: Path, job: ExportJob) -> tuple[Runner, int]:
        from kdpipe.exports.tensorrt import load_engine

        return load_engine(path), job.settings.tensorrt.max_batch


for _fmt in (OnnxFormat(), OnnxFp16Format(), OnnxInt8Format(), TensorRTFormat()):
    register_format(_fmt)
