"""Quantization-aware distillation (QAD): the pieces the ``qad`` stage puts together, on NVIDIA ModelOpt.

1. ``fold_batchnorm``: BatchNorm folded into the preceding convolutions (``torch.fx``'s conv-bn fusion), so the
   weights that are fake-quantized during fine-tuning are the weights the deployed int8 convolutions use; an
   unfolded BN would stay a float op after every int8 conv in onnxruntime's graph.
2. ``quantize_model``: ModelOpt's ``mtq.quantize`` with its INT8 default configuration (8-bit per-output-channel
   weights, 8-bit per-tensor activations, max calibration), calibrated on training images. Fake quantization is
   ModelOpt's (its ``TensorQuantizer`` with a straight-through gradient); kdpipe writes no quantization kernel.
3. The fake-quantized student is fine-tuned by the kdpipe trainer with a distillation loss from the teacher.
4. ``export_qdq_onnx``: the TorchScript ONNX exporter turns ModelOpt's quantizers into QuantizeLinear /
   DequantizeLinear pairs (signed, symmetric: what TensorRT builds int8 engines from and onnxruntime runs).

``nvidia-modelopt`` is part of the ``export`` extra and is imported inside these functions.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from kdpipe.errors import ConfigError, ExportError
from kdpipe.exports.formats import ExportFormat, ExportJob, register_format
from kdpipe.exports.onnx import OnnxExport, Preprocessing, export_onnx
from kdpipe.exports.runtime import require_module
from kdpipe.fileio import atomic_write_with

log = logging.getLogger(__name__)

QDQ_CHECK_RTOL = 0.05
"""The ONNX export check's tolerance for a QDQ graph, relative to the logit scale: onnxruntime's integer kernels
round differently from the float emulation that was traced. Accuracy is gated by the parity check on real images."""


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with every Conv-BatchNorm pair folded into one convolution (``torch.fx``).
    A model ``torch.fx`` cannot trace is returned unfolded, with a warning: its BatchNorms stay float ops."""
    from torch.fx.experimental.optimization import fuse

    net = copy.deepcopy(model).eval()
    try:
        folded: nn.Module = fuse(net)
    except Exception as exc:  # fx tracing fails on data-dependent control flow
        log.warning("qad: BatchNorm not folded (%s: %s); it stays a float op after each conv", type(exc).__name__, exc)
        return net
    return folded


def _batches(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size]


def quantize_model(model: nn.Module, calibration: torch.Tensor, *, batch_size: int = 64) -> nn.Module:
    """``model`` with ModelOpt INT8 fake quantization inserted (in place) and calibrated on ``calibration``
    (normalised images, on the model's device). Raises ConfigError when ModelOpt finds nothing to quantize."""
    mtq: Any = require_module("modelopt.torch.quantization", purpose="quantization-aware distillation")
    if len(calibration) == 0:
        raise ConfigError("qad: no calibration images (the train split is empty)")

    def forward_loop(net: nn.Module) -> None:
        with torch.no_grad():
            for batch in _batches(calibration, batch_size):
                net(batch)

    model.eval()
    quantized: nn.Module = mtq.quantize(model, mtq.INT8_DEFAULT_CFG, forward_loop=forward_loop)
    if not quantizers(quantized):
        raise ConfigError(
            f"qad: ModelOpt inserted no quantizer into {type(model).__name__}: it has no Conv/Linear layer it knows",
            hint="export this student with format onnx-int8 (post-training quantization) instead",
        )
    return quantized


def unquantized_layers(model: nn.Module) -> dict[str, str]:
    """Layers with a weight matrix or kernel (a parameter of two or more dimensions) that ModelOpt did not wrap with a
    weight quantizer, by name -> type: they would stay float in the int8 graph."""
    out = {}
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.ndim >= 2]
        if own and not hasattr(module, "weight_quantizer"):
            out[name] = type(module).__name__
    return out


def without_quantizers(model: nn.Module) -> nn.Module:
    """A copy of a fake-quantized ``model`` with every ModelOpt quantizer disabled: the float network with the
    weights QAD fine-tuned (for re-quantization in onnxruntime's own QDQ layout)."""
    mtq: Any = require_module("modelopt.torch.quantization", purpose="quantization-aware distillation")
    plain = copy.deepcopy(model)
    mtq.disable_quantizer(plain, "*")
    return plain


def quantizers(model: nn.Module) -> dict[str, Any]:
    """The enabled ModelOpt quantizers of ``model``, by module name."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {n: m for n, m in model.named_modules() if isinstance(m, TensorQuantizer) and m.is_enabled}


def fold_weight_quantizers(model: Any) -> int:
    """Replace every ``QuantizeLinear`` of a constant (a weight) by the int8 tensor it computes, so the graph stores
    int8 weights behind their ``DequantizeLinear`` (the QDQ layout onnxruntime fuses into integer convolutions and
    TensorRT builds from) instead of float weights quantized at every run; the float copies are dropped. Returns how
    many weights were folded. ``model`` is an ``onnx.ModelProto``, changed in place."""
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    folded: dict[str, Any] = {}
    keep = []
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and all(name in consts for name in node.input[:3]) and len(node.input) >= 3:
            w, scale, zero = (consts[name] for name in node.input[:3])
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if scale.ndim == 1 and w.ndim > 1:  # per-channel: broadcast along ``axis``
                shape = [1] * w.ndim
                shape[axis] = -1
                scale, zero = scale.reshape(shape), zero.reshape(shape)
            info = np.iinfo(zero.dtype)
            q = np.clip(np.rint(w / scale) + zero.astype(np.int32), info.min, info.max).astype(zero.dtype)
            folded[node.output[0]] = numpy_helper.from_array(q, name=node.output[0])
        else:
            keep.append(node)
    if not folded:
        return 0
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(folded.values())
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    unused = [i for i in graph.initializer if i.name not in used]
    for init in unused:
        graph.initializer.remove(init)
    dead = [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]
    for node in dead:
        graph.node.remove(node)
    return len(folded)


def export_qdq_onnx(
    model: nn.Module,
    path: Path,
    *,
    preprocessing: Preprocessing,
    opset: int = 18,
    dynamic_batch: bool = True,
    simplify: bool = False,
    metadata: dict[str, str] | None = None,
) -> OnnxExport:
    """Export a fake-quantized ``model`` as a QDQ ONNX graph (``export_onnx`` with ``precision="int8-qdq"``) and
    check that it holds Q/DQ pairs. onnxslim is off by default: it may fold the DequantizeLinear of a weight into a
    float constant, which would turn the int8 graph back into a float one."""
    out = export_onnx(
        model,
        path,
        preprocessing=preprocessing,
        opset=opset,
        dynamic_batch=dynamic_batch,
        simplify=simplify,
        metadata=metadata,
        precision="int8-qdq",
        check_rtol=QDQ_CHECK_RTOL,
    )
    from kdpipe.exports.quantize import count_qdq_nodes

    onnx_mod: Any = require_module("onnx")
    graph = onnx_mod.load(str(path))
    if fold_weight_quantizers(graph):
        onnx_mod.checker.check_model(graph, full_check=True)
        atomic_write_with(path, lambda tmp: onnx_mod.save_model(graph, str(tmp)))
    counts = count_qdq_nodes(path)
    if not counts.get("QuantizeLinear") or not counts.get("DequantizeLinear"):
        raise ExportError(f"{path}: the QAD export holds no QuantizeLinear/DequantizeLinear pair ({counts})")
    return out


class QADInt8Format(ExportFormat):
    """The QDQ int8 ONNX of a quantization-aware distilled student: made by a ``type: qad`` stage."""

    name = "onnx-int8-qad"
    summary = "QDQ int8 ONNX fine-tuned under fake quantization with the teacher (type: qad stage)"
    requires = ("onnx", "onnxruntime", "modelopt")
    parity: ClassVar[dict[str, float | None]] = {"max_abs_diff": None, "min_agreement": 0.95, "max_top1_drop": 0.01}
    made_by = "qad"

    def export(self, job: ExportJob) -> Path:
        raise ConfigError("format onnx-int8-qad is made by a qad stage, not an export stage", hint="use type: qad")


register_format(QADInt8Format())
