"""Post-training conversions of an exported fp32 ONNX model: static int8 (QDQ) and float16.

int8 settings, and why. Measured with onnxruntime 1.31 (CPU EP, all graph optimisations) on a 2-vCPU AMD EPYC with
AVX-512 VNNI, batch 64, resnet8 trained on digits (1x16x16) and on a CIFAR-10 subset (3x32x32), calibrated on 512
training images. Figures are int8 p50 latency as a fraction of fp32, the two timed in alternating rounds:

    variant (weights: symmetric int8)         digits, 1 thread   CIFAR, 1 thread   top-1 change
    QUInt8 act., per-channel (the default)    0.44-0.53          0.50-0.59         within 0.3 points
    QUInt8 act., per-tensor                   0.52               0.50              within 0.3 points
    QUInt8 act., per-channel, reduce_range    0.53               0.50              within 0.3 points
    QInt8 act. (symmetric)                    1.44               1.32              within 0.3 points

With 2 threads the default measured 0.29-0.83 (digits) and 0.54-0.63 (CIFAR) over seven runs and QInt8
activations 1.1-1.7: the ordering held in every run, the spread came from other jobs on the shared machine.

Why QInt8 activations are slower than fp32 on x86: onnxruntime only fuses DequantizeLinear -> Conv ->
QuantizeLinear into a QLinearConv for uint8 activations there (its ``session.qdqisint8allowed`` is off on x86, on
for ARM), and symmetric activations also keep every Relu as a separate float op between Q/DQ pairs. The QInt8 graph
ends up with 4 of resnet8's 9 convolutions as QLinearConv and 5 as DQ -> fp32 Conv -> Q with 8 transposes: more
work than fp32. Forcing ``qdqisint8allowed`` fuses all 9, but the s8 x s8 kernel then ran 5x slower than fp32
(75 ms vs 16 ms). With QUInt8 activations the quantizer folds each Relu into the activation range, and all 9
convolutions become QLinearConv with QLinearAdd, QLinearGlobalAveragePool and QGemm, in NHWC with one transpose
at each end. Per-channel weights cost nothing measurable and are the safer choice for ResNets' accuracy.

7-bit weights (``reduce_range``) are on by default for uint8 activations. Without AVX-512 VNNI (AVX2-only x86:
older Xeons, many AMD EPYCs) onnxruntime's u8 x s8 kernels sum pairs of products in a saturating 16-bit
intermediate (``vpmaddubsw``): with full 8-bit weights, 255 x 127 x 2 overflows it. On a 2-vCPU AMD EPYC with AVX2
only, the digits resnet8 above, quantized with 8-bit weights and the stem left at one channel, agreed with
PyTorch on 95.7% of 397 validation images (top-1 97.98% -> 94.21%); its logits were 7.5 (of a largest 11.0) from
what the same QDQ graph computes with every op in float (onnxruntime with graph optimisations off), 0.83 with the
padded stem. With 7-bit weights the kernels came within 0.07 of the float QDQ graph with either stem, and the model
agreed with PyTorch on every image. A pipeline's weak int8 digits student (65% top-1) went from 76 to 95 of 100
test images agreeing with PyTorch. On the VNNI machine 7-bit weights had changed neither speed nor accuracy.
The machine that runs a model is often not the one that exported it, so the artifact is made to be exact on
both; ``reduce_range=False`` restores 8-bit weights for a fleet known to have VNNI. TensorRT's int8 graph keeps
8-bit weights (GPUs accumulate in 32 bits).

Single-channel stems. onnxruntime's QLinearConv is slow on a 1-channel input: resnet8's 1->16 stem on digits took
0.68 ms of the int8 model's 2.1 ms at batch 64 (fp32 NCHWc: under 0.1 ms), and it barely uses the second thread.
For ``activation_type="uint8"`` the stem is therefore fed a zero-padded 4-channel input (a ``Pad`` on the channel
axis, the extra weight channels zero, so the result is unchanged): the stem then took 0.22 ms, and the whole model
went from 0.84 to 0.73 of fp32's p50 (median of 7 alternating rounds, 2 threads, a busy machine); in
``benchmarks/export_latency.py`` (11 rounds) the int8/fp32 ratio moved from 0.744 to 0.727: the padded input
costs a Transpose into NHWC that the 1-channel one did not need. Later paired runs put the whole-model gain within
this shared VM's run-to-run noise (0.1-0.15 of the ratio); the per-op profile gain is not. Tried and dropped: the
pad on the NHWC innermost axis in uint8 (no Transpose, but onnxruntime's Pad takes 0.37 ms there) and an fp32 stem
left out of quantization (its NCHWc reorder, a QuantizeLinear and two Transposes of the 16-channel output: slower
end to end). It is applied only where measured: a graph input of one channel feeding a group-1 Conv.
``pad_stem_channels=None`` turns it off.

So the default is QUInt8 (asymmetric) activations, for onnxruntime's CPU EP. TensorRT accepts only symmetric
signed int8 Q/DQ (zero point 0): an int8 graph meant for TensorRT is made with ``activation_type="int8"``.
``quant_pre_process`` (shape inference and onnxruntime's basic graph optimisations) runs first, as onnxruntime
recommends: it folds any BatchNorm or constant subgraph a non-kdpipe export may still hold into the convolution
before ranges are calibrated; if it fails, quantization goes ahead on the graph as exported.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdpipe.errors import ConfigError, DataError, ExportError
from kdpipe.exports.onnx import set_metadata
from kdpipe.exports.runtime import require_module
from kdpipe.fileio import atomic_write_with

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
ACTIVATION_TYPES = ("uint8", "int8")
# Images per calibration batch: the calibrator keeps every intermediate output of every batch until the end.
_CALIBRATION_BATCH = 32


class _TensorReader:
    """onnxruntime ``CalibrationDataReader`` over an in-memory tensor: one feed dict per batch, then None."""

    def __init__(self, images: np.ndarray, input_name: str, batch_size: int) -> None:
        self._feeds: Iterator[dict[str, np.ndarray]] = (
            {input_name: images[i : i + batch_size]} for i in range(0, len(images), batch_size)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _load(path: Path) -> Any:
    onnx = require_module("onnx")
    if not Path(path).is_file():
        raise ExportError(f"ONNX model {path} does not exist", hint="export the fp32 model first")
    try:
        return onnx.load(str(path))
    except Exception as exc:
        raise ExportError(f"cannot read ONNX model {path}: {exc}", hint="re-export the fp32 model") from exc


def _save_checked(model: Any, out_path: Path, meta: dict[str, str], what: str) -> Path:
    """Attach ``meta``, run the ONNX checker, then write atomically."""
    onnx = require_module("onnx")
    set_metadata(model, meta)
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise ExportError(
            f"the {what} model fails the ONNX checker: {exc}", hint="report the fp32 model and settings"
        ) from exc
    atomic_write_with(out_path, lambda tmp: onnx.save_model(model, str(tmp)))
    return Path(out_path)


def _pad_stem_channels(model: Any, input_name: str, channels: int) -> bool:
    """Feed the Conv that reads the 1-channel graph input a zero-padded ``channels``-channel copy (same result).

    Returns whether the graph was changed: only a single consumer that is a group-1 Conv with a 1-input-channel
    weight initializer qualifies (see the module docstring for why).
    """
    onnx = require_module("onnx")
    from onnx import helper, numpy_helper

    graph = model.graph
    consumers = [n for n in graph.node if input_name in n.input]
    if len(consumers) != 1 or consumers[0].op_type != "Conv" or consumers[0].input[0] != input_name:
        return False
    conv = consumers[0]
    if any(a.name == "group" and helper.get_attribute_value(a) != 1 for a in conv.attribute):
        return False
    weights = {init.name: init for init in graph.initializer}
    if len(conv.input) < 2 or conv.input[1] not in weights:
        return False
    weight = numpy_helper.to_array(weights[conv.input[1]])
    if weight.ndim != 4 or weight.shape[1] != 1:
        return False
    padded = np.zeros((weight.shape[0], channels, *weight.shape[2:]), dtype=weight.dtype)
    padded[:, :1] = weight
    weights[conv.input[1]].CopyFrom(numpy_helper.from_array(padded, conv.input[1]))
    pads_name, out_name = f"{input_name}_stem_pads", f"{input_name}_stem_padded"
    graph.initializer.append(
        numpy_helper.from_array(np.array([0, 0, 0, 0, 0, channels - 1, 0, 0], dtype=np.int64), pads_name)
    )
    conv.input[0] = out_name
    pad = helper.make_node("Pad", [input_name, pads_name], [out_name], name="kdpipe_stem_channel_pad")
    graph.node.insert(list(graph.node).index(conv), pad)
    onnx.checker.check_model(model)
    return True


def _calibration_array(calibration: torch.Tensor | np.ndarray) -> np.ndarray:
    array = calibration.detach().cpu().numpy() if isinstance(calibration, torch.Tensor) else np.asarray(calibration)
    if array.ndim != 4 or len(array) == 0:
        raise DataError(f"int8 calibration needs a non-empty (N, C, H, W) image batch, got shape {array.shape}")
    return np.ascontiguousarray(array, dtype=np.float32)


def quantize_int8(
    fp32_path: Path,
    out_path: Path,
    calibration: torch.Tensor,
    *,
    per_channel: bool = True,
    method: str = "minmax",
    input_name: str = "input",
    activation_type: str = "uint8",
    reduce_range: bool | None = None,
    pad_stem_channels: int | None = 4,
    nodes_to_exclude: Sequence[str] = (),
    tensor_overrides: Callable[[Any], dict[str, list[dict[str, Any]]]] | None = None,
) -> Path:
    """Static int8 quantization of ``fp32_path`` into a QDQ graph at ``out_path``, calibrated on ``calibration``.

    ``calibration``: normalised float (N, C, H, W) training images, as the model sees them (a few hundred suffice
    for min/max ranges). ``method``: "minmax", "entropy" or "percentile" (onnxruntime's calibrators).
    Weights are always symmetric int8, per output channel unless ``per_channel=False``. ``activation_type``:
    "uint8" (default: fastest on onnxruntime's CPU EP, see the module docstring) or "int8" (symmetric, for
    TensorRT). ``reduce_range``: 7-bit weights, exact on x86 CPUs without VNNI (see the module docstring);
    None (default) means on for uint8 activations, off for int8. ``pad_stem_channels``: for uint8 activations, a
    1-channel stem convolution reads a zero-padded copy of the input with this many channels (faster on
    onnxruntime's CPU EP, same result; None leaves it as is).
    ``nodes_to_exclude``: names of nodes (as ``quantizable_nodes`` lists them) left in float: mixed precision.
    ``tensor_overrides``: called with the graph about to be quantized (an ``onnx.ModelProto``, after pre-processing),
    returns onnxruntime ``TensorQuantOverrides`` (scales and zero points by tensor name) that replace calibration for
    those tensors: how a quantization-aware fine-tuned network keeps the grids it was trained on.
    The fp32 model's ``metadata_props`` are carried over, ``kdpipe.precision`` becomes "int8" and
    ``kdpipe.quantization`` records the settings as JSON. Failures are ``ExportError``; bad settings ``ConfigError``.
    """
    if method not in CALIBRATION_METHODS:
        raise ConfigError(f"unknown calibration method {method!r}; choose one of {', '.join(CALIBRATION_METHODS)}")
    if activation_type not in ACTIVATION_TYPES:
        raise ConfigError(
            f"unknown activation_type {activation_type!r}; choose 'uint8' (onnxruntime CPU) or 'int8' (TensorRT)"
        )
    if reduce_range is None:
        reduce_range = activation_type == "uint8"
    images = _calibration_array(calibration)
    fp32 = _load(fp32_path)
    inputs = [i.name for i in fp32.graph.input]
    if input_name not in inputs:
        raise ConfigError(f"input_name {input_name!r} is not an input of {fp32_path}; its inputs are {inputs}")
    opset = next((o.version for o in fp32.opset_import if o.domain in ("", "ai.onnx")), 0)
    # QuantizeLinear/DequantizeLinear gained the per-channel ``axis`` attribute in opset 13; below 11 onnxruntime
    # rewrites the model to another opset behind our back.
    needed = 13 if per_channel else 11
    if opset < needed:
        raise ConfigError(
            f"int8 quantization{' per channel' if per_channel else ''} needs an ONNX opset >= {needed}; "
            f"{fp32_path} has opset {opset}",
            hint=f"export with opset >= {needed} (18 is the default)"
            + ("" if not per_channel else " or set per_channel=False"),
        )
    meta = {p.key: p.value for p in fp32.metadata_props}

    quant = require_module("onnxruntime.quantization", purpose="int8 quantization")

    settings = {
        "format": "QDQ",
        "weights": "int8 symmetric " + ("per-channel" if per_channel else "per-tensor"),
        "activations": activation_type + (" symmetric" if activation_type == "int8" else " asymmetric"),
        "method": method,
        "reduce_range": reduce_range,
        "calibration_images": len(images),
    }
    if nodes_to_exclude:
        settings["float_nodes"] = sorted(nodes_to_exclude)
    with tempfile.TemporaryDirectory(prefix="kdpipe-int8-") as tmp:
        source = _prepared(fp32_path, Path(tmp))
        if activation_type == "uint8" and pad_stem_channels is not None and pad_stem_channels > 1:
            graph = _load(source)
            if _pad_stem_channels(graph, input_name, pad_stem_channels):
                settings["stem_channel_pad"] = pad_stem_channels
                source = Path(tmp) / "stem-padded.onnx"
                require_module("onnx").save_model(graph, str(source))
        extra: dict[str, Any] = {"ActivationSymmetric": activation_type == "int8", "WeightSymmetric": True}
        if tensor_overrides is not None:
            overrides = tensor_overrides(_load(source))
            if overrides:
                extra["TensorQuantOverrides"] = overrides
            settings["fixed_scales"] = len(overrides)
        quantized = Path(tmp) / "int8.onnx"
        try:
            quant.quantize_static(
                str(source),
                str(quantized),
                _TensorReader(images, input_name, _CALIBRATION_BATCH),
                quant_format=quant.QuantFormat.QDQ,
                per_channel=per_channel,
                reduce_range=reduce_range,
                activation_type=quant.QuantType.QUInt8 if activation_type == "uint8" else quant.QuantType.QInt8,
                weight_type=quant.QuantType.QInt8,
                calibrate_method={
                    "minmax": quant.CalibrationMethod.MinMax,
                    "entropy": quant.CalibrationMethod.Entropy,
                    "percentile": quant.CalibrationMethod.Percentile,
                }[method],
                extra_options=extra,
                nodes_to_exclude=list(nodes_to_exclude),
            )
        except Exception as exc:
            raise ExportError(
                f"onnxruntime int8 quantization of {fp32_path} failed: {type(exc).__name__}: {exc}",
                hint="check the calibration images match the model input; try method='minmax'",
            ) from exc
        model = _load(quantized)

    meta.update({"kdpipe.precision": "int8", "kdpipe.quantization": json.dumps(settings, sort_keys=True)})
    path = _save_checked(model, out_path, meta, "int8")
    log.info("int8 QDQ model %s (%s)", path, settings)
    return path


def _prepared(fp32_path: Path, tmp: Path) -> Path:
    """A copy of ``fp32_path`` in ``tmp`` after onnxruntime's quantization pre-processing (shape inference and
    graph optimisation), or the plain copy when that fails (an optimisation step: the raw export still quantizes).
    A copy, because onnxruntime writes scratch files ("-inferred") next to the model it is given."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source = tmp / "fp32.onnx"
    shutil.copyfile(fp32_path, source)
    prepared = tmp / "prepared.onnx"
    try:
        quant_pre_process(str(source), str(prepared))
    except Exception as exc:
        log.warning("onnxruntime quant_pre_process failed, quantizing the export as is: %s", exc)
        return source
    return prepared


QUANTIZED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
"""The ops whose int8 versions carry the compute, and so the candidates for staying in float."""


def quantizable_nodes(fp32_path: Path) -> list[str]:
    """Names of the Conv/Gemm/MatMul nodes of ``fp32_path`` after onnxruntime's quantization pre-processing (the
    graph ``quantize_int8`` quantizes), in graph order: what ``nodes_to_exclude`` may name."""
    with tempfile.TemporaryDirectory(prefix="kdpipe-int8-") as tmp:
        graph = _load(_prepared(fp32_path, Path(tmp)))
    return [n.name for n in graph.graph.node if n.op_type in QUANTIZED_OPS and n.name]


def convert_fp16(fp32_path: Path, out_path: Path) -> Path:
    """Convert weights and compute of ``fp32_path`` to float16; inputs and outputs stay float32.

    Uses onnxruntime's ``convert_float_to_float16(keep_io_types=True)``, so a server feeds the same float32 tensor
    as for the fp32 model (Cast nodes at the edges do the conversion). Metadata is carried over with
    ``kdpipe.precision`` = "fp16". This is the graph TensorRT 11 builds an fp16 engine from (no precision flags).
    """
    model = _load(fp32_path)
    meta = {p.key: p.value for p in model.metadata_props}
    require_module("onnxruntime", purpose="float16 conversion")
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        fp16 = convert_float_to_float16(model, keep_io_types=True)
    except Exception as exc:
        raise ExportError(
            f"float16 conversion of {fp32_path} failed: {type(exc).__name__}: {exc}", hint="report the model"
        ) from exc
    # The converter appends its input Casts after the nodes that read them; onnxruntime does not mind, the ONNX
    # checker (and TensorRT's parser) require topological order.
    _sort_nodes(fp16.graph)
    meta["kdpipe.precision"] = "fp16"
    path = _save_checked(fp16, out_path, meta, "fp16")
    log.info("fp16 model %s", path)
    return path


def _sort_nodes(graph: Any) -> None:
    """Reorder ``graph.node`` topologically in place (stable: independent nodes keep their relative order)."""
    nodes = list(graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    # Edges only between nodes of this graph: graph inputs, initializers and outer-scope names are always ready.
    deps = [{producer[name] for name in node.input if name in producer} for node in nodes]
    users: dict[int, list[int]] = {i: [] for i in range(len(nodes))}
    for i, before in enumerate(deps):
        for j in before:
            users[j].append(i)
    waiting = [len(d) for d in deps]
    ready = [i for i, n in enumerate(waiting) if n == 0]
    order: list[int] = []
    while ready:
        i = min(ready)  # smallest index first keeps the original order wherever it was already valid
        ready.remove(i)
        order.append(i)
        for k in users[i]:
            waiting[k] -= 1
            if waiting[k] == 0:
                ready.append(k)
    if len(order) != len(nodes):
        raise ExportError("the converted graph has a cycle and cannot be ordered", hint="report the model")
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


def count_qdq_nodes(path: Path) -> dict[str, int]:
    """How many QuantizeLinear and DequantizeLinear nodes an ONNX file has (0 and 0 for a float model)."""
    model = _load(path)
    ops = [n.op_type for n in model.graph.node]
    return {op: ops.count(op) for op in ("QuantizeLinear", "DequantizeLinear")}
