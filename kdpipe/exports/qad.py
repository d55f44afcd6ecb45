"""Quantization-aware distillation (QAD): the pieces the ``qad`` stage puts together, on NVIDIA ModelOpt.

1. ``fold_batchnorm`` (optional, off in the qad stage by default): BatchNorm folded into the preceding convolutions
   (pairs found with ``torch.fx``), in place, so the network keeps its class and layer names. Per-output-channel
   weight quantization gives a convolution the same int8 grid folded or not, so folding before fine-tuning is a
   choice of training dynamics (no normalisation left), not of fidelity.
2. ``quantize_model``: ModelOpt's ``mtq.quantize`` with an int8 configuration for vision networks (``int8_config``:
   per-output-channel weights, 8-bit per-tensor activations, max calibration), calibrated on training images. Fake
   quantization is ModelOpt's (its ``TensorQuantizer`` with a straight-through gradient); kdpipe writes no
   quantization kernel.
3. The fake-quantized student is fine-tuned by the kdpipe trainer with a distillation loss from the teacher.
4. ``export_qdq_onnx``: the TorchScript ONNX exporter turns ModelOpt's quantizers into QuantizeLinear /
   DequantizeLinear pairs (signed, symmetric: what TensorRT builds int8 engines from and onnxruntime runs).
5. For onnxruntime's CPU layout, the float network (``without_quantizers``) is re-quantized by onnxruntime's static
   quantizer with the scales fine-tuning trained (``onnxruntime_overrides``), so its fused integer kernels compute
   on the same weight and input grids.

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

QDQ_CHECK_RTOL = 1e-2
"""The ONNX export check's tolerance for a QDQ graph, relative to the logit scale. The check runs the graph with
onnxruntime's optimisations off, its QuantizeLinear/DequantizeLinear nodes executed as written: the same arithmetic as
ModelOpt's fake quantization (equal logits on a CIFAR mobilenetv3), so a wrong graph cannot hide. With the fusion into
integer kernels on, requantization rounds differently at every layer (3-6 % of the logit scale on that
mobilenetv3, whose hard-swish and squeeze-excite layers run between Q/DQ pairs); that is a question of accuracy, gated
on real images by the parity check, not of structure."""


def _trace_with_batchnorm_leaves(model: nn.Module) -> Any:
    """A ``torch.fx`` graph of ``model`` that keeps every BatchNorm module (timm's ``BatchNormAct2d`` included) as
    one call, so it shows which convolution feeds which BatchNorm."""
    import torch.fx as fx
    from torch.nn.modules.batchnorm import _BatchNorm

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, _BatchNorm) or super().is_leaf_module(m, qualname)

    return Tracer().trace(model)


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv, batchnorm)`` module names where a ``Conv2d``'s output feeds only a ``BatchNorm2d`` (or a subclass) and
    both are called once per forward: the pairs that fold into one convolution. Raises whatever ``torch.fx`` raises
    on a model it cannot trace."""
    from torch.nn.modules.batchnorm import _BatchNorm

    graph = _trace_with_batchnorm_leaves(model)
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BatchNorm) or not node.args:
            continue
        src = node.args[0]
        if (
            getattr(src, "op", None) == "call_module"
            and isinstance(modules.get(src.target), nn.Conv2d)
            and len(src.users) == 1
            and calls[src.target] == 1
            and calls[node.target] == 1
        ):
            pairs.append((str(src.target), str(node.target)))
    return pairs


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with every Conv-BatchNorm pair folded into the convolution, in place: the
    network keeps its class, module names and ``feature_info`` (so feature-based methods and taps still find their
    layers); each folded BatchNorm becomes ``nn.Identity`` (timm's ``BatchNormAct2d`` keeps its dropout and
    activation). A model ``torch.fx`` cannot trace is returned unfolded, with a warning: its BatchNorms stay float
    ops after the int8 convolutions."""
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    net = copy.deepcopy(model).eval()
    try:
        pairs = conv_bn_pairs(net)
    except Exception as exc:  # fx tracing fails on data-dependent control flow
        log.warning("qad: BatchNorm not folded (%s: %s); it stays a float op after each conv", type(exc).__name__, exc)
        return net
    for conv_name, bn_name in pairs:
        conv, bn = net.get_submodule(conv_name), net.get_submodule(bn_name)
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, _BatchNorm)  # as conv_bn_pairs found them
        _set_submodule(net, conv_name, fuse_conv_bn_eval(conv, bn))
        rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]  # BatchNormAct2d
        _set_submodule(net, bn_name, nn.Sequential(*rest) if rest else nn.Identity())
    log.debug("qad: folded %d BatchNorm layers into their convolutions", len(pairs))
    return net


def _batches(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size]


def int8_config(weight_bits: int = 8, per_channel: bool = True) -> dict[str, Any]:
    """kdpipe's ModelOpt quantization config for a vision network: every Conv/Linear weight per output channel (or
    per tensor) with ``weight_bits`` bits (7 matches onnxruntime's reduced-range CPU weights), every layer input per
    tensor with 8 bits, max calibration; BatchNorm left alone. ModelOpt's ``INT8_DEFAULT_CFG`` is the same plus rules
    that switch quantizers off by language-model module names (``*output_layer*``, ``*router*``, ``output.*``, ...),
    which would silently leave a vision layer of such a name in float."""
    off = [{"quantizer_name": "*", "parent_class": f"nn.BatchNorm{d}d", "enable": False} for d in (1, 2, 3)]
    axis = 0 if per_channel else None  # output channels of Conv/Linear weights
    return {
        "quant_cfg": [
            {"quantizer_name": "*", "enable": False},
            {"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": weight_bits, "axis": axis}},
            {"quantizer_name": "*input_quantizer", "cfg": {"num_bits": 8, "axis": None}},
            *off,
        ],
        "algorithm": "max",
    }


SAME_OP_SUBCLASSES: dict[str, type[nn.Module]] = {
    "timm.layers.linear.Linear": nn.Linear,
    "timm.layers.conv2d_same.Conv2dSame": nn.Conv2d,
}
"""Subclasses of a layer ModelOpt quantizes, by qualified class name, whose forward computes the parent's operation on
``self.weight`` unchanged (timm's ``Linear`` only adds a dtype cast when scripted, ``Conv2dSame`` pads the input
first). ModelOpt's registry matches exact classes, so timm students (``mobilenetv3_*``, ``efficientnet_*``: their
classifier is timm's ``Linear``) would keep these layers in float; ``quantize_model`` registers them with the parent's
quantized module. A subclass that transforms its weight (timm's ``StdConv2d`` standardises it) is not listed: its
int8 graph would not compute what fake quantization trained, so it stays refused by name."""


def register_same_op_layers(model: nn.Module) -> list[str]:
    """Register with ModelOpt every ``SAME_OP_SUBCLASSES`` class used in ``model`` that it does not know yet, with the
    quantized module of its parent class; the class names registered."""
    mtq: Any = require_module("modelopt.torch.quantization", purpose="quantization-aware distillation")
    from modelopt.torch.quantization.nn import QuantModuleRegistry

    registered = []
    for cls in {type(m) for m in model.modules()}:
        parent = SAME_OP_SUBCLASSES.get(f"{cls.__module__}.{cls.__qualname__}")
        if parent is not None and issubclass(cls, parent) and QuantModuleRegistry.get(cls) is None:
            mtq.register(original_cls=cls, quantized_cls=QuantModuleRegistry[parent])
            registered.append(cls.__qualname__)
    return sorted(registered)


def quantize_model(
    model: nn.Module,
    calibration: torch.Tensor,
    *,
    weight_bits: int = 8,
    per_channel: bool = True,
    batch_size: int = 64,
) -> nn.Module:
    """``model`` with ModelOpt int8 fake quantization (``int8_config(weight_bits, per_channel)``) inserted in place
    and calibrated on ``calibration`` (normalised images, on the model's device). Raises ConfigError when ModelOpt
    finds nothing to quantize."""
    mtq: Any = require_module("modelopt.torch.quantization", purpose="quantization-aware distillation")
    if len(calibration) == 0:
        raise ConfigError("qad: no calibration images (the train split is empty)")

    def forward_loop(net: nn.Module) -> None:
        with torch.no_grad():
            for batch in _batches(calibration, batch_size):
                net(batch)

    model.eval()
    register_same_op_layers(model)
    quantized: nn.Module = mtq.quantize(model, int8_config(weight_bits, per_channel), forward_loop=forward_loop)
    if not quantizers(quantized):
        raise ConfigError(
            f"qad: ModelOpt inserted no quantizer into {type(model).__name__}: it has no Conv/Linear layer it knows",
            hint="export this student with format onnx-int8 (post-training quantization) instead",
        )
    return quantized


def unquantized_layers(model: nn.Module) -> dict[str, str]:
    """Layers with a weight matrix or kernel (a parameter of two or more dimensions) whose weight ModelOpt does not
    quantize (no weight quantizer, or a disabled one), by name -> type: they would stay float in the int8 graph."""
    out = {}
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.ndim >= 2]
        quantizer = getattr(module, "weight_quantizer", None)
        if own and not (quantizer is not None and quantizer.is_enabled):
            out[name] = type(module).__name__
    return out


def without_quantizers(model: nn.Module) -> nn.Module:
    """A copy of a fake-quantized ``model`` with every ModelOpt quantizer disabled and each weight replaced by its
    fake-quantized value (ModelOpt's ``fold_weight``): the float network computing with the weights fine-tuning
    computed with, for re-quantization in onnxruntime's own QDQ layout. Not the latent float weights: fine-tuning never
    computes with them, and those beyond the calibrated range (clipped, so without gradient) drift; on a CIFAR-100
    mobilenetv3 the latent network scored 22.8 % where the fake-quantized one scored 36.7 %."""
    mtq: Any = require_module("modelopt.torch.quantization", purpose="quantization-aware distillation")
    plain = copy.deepcopy(model)
    mtq.fold_weight(plain)
    mtq.disable_quantizer(plain, "*")
    return plain


def with_8bit_weights(model: nn.Module) -> nn.Module:
    """``model`` itself when every weight quantizer has 8 bits, else a copy computing exactly the same weights with
    8-bit weight quantizers (ModelOpt exports int8 QDQ only; TensorRT builds from it). Each weight becomes its
    fake-quantized value on the n-bit grid fine-tuning used (steps of amax / (2^(n-1) - 1)), and its 8-bit quantizer
    gets the range whose steps are 2^(8-n) times finer (amax * 127 / 126 for 7 bits), so every trained value is an
    8-bit grid point. Re-quantizing the latent weights at 8 bits instead is a different network: on a CIFAR-100
    mobilenetv3 with per-tensor 7-bit weights, its QDQ graph scored 30.8 % where the fine-tuned network scored
    37.8 %."""
    mtq: Any = require_module("modelopt.torch.quantization", purpose="quantization-aware distillation")
    weight = {n: q for n, q in quantizers(model).items() if n.endswith("weight_quantizer")}
    if all(q.num_bits == 8 for q in weight.values()):
        return model
    copied = copy.deepcopy(model)
    for module in copied.modules():
        quantizer = getattr(module, "weight_quantizer", None)
        if not isinstance(module, mtq.nn.QuantModule) or quantizer is None or not quantizer.is_enabled:
            continue
        bits = quantizer.num_bits
        if bits == 8:
            continue
        if not isinstance(bits, int) or not 2 <= bits < 8 or quantizer.amax is None:
            raise ExportError(f"cannot put {bits}-bit weights on an 8-bit grid (amax {quantizer.amax})")
        with torch.no_grad():
            module.weight.copy_(quantizer(module.weight))
            finer = 2 ** (8 - bits)
            quantizer.amax = quantizer.amax * 127 / ((2 ** (bits - 1) - 1) * finer)
        quantizer.num_bits = 8
    return copied


def onnx_module_name(node_name: str) -> str:
    """The module a node of kdpipe's TorchScript ONNX export was traced in, from its scope-path name:
    ``/blocks/blocks.0/blocks.0.0/conv_dw/Conv`` -> ``blocks.0.0.conv_dw``,
    ``/layer2/layer2.0/downsample/downsample.0/Conv`` -> ``layer2.0.downsample.0``. Each level of the path is a
    module's attribute name, or for a container's child the container's level plus ``.<key>``; the last part is the
    op. Attribute names hold no dot, so the two cannot be confused."""
    name, previous = "", ""
    for part in [p for p in node_name.split("/") if p][:-1]:
        if previous and part.startswith(previous + "."):
            name += part[len(previous) :]
        else:
            name = f"{name}.{part}" if name else part
        previous = part
    return name


def _step(quantizer: Any) -> torch.Tensor:
    """The grid step of a signed symmetric ModelOpt quantizer: amax / (2^(bits-1) - 1)."""
    return quantizer.amax.detach().float().cpu() / (2 ** (quantizer.num_bits - 1) - 1)


def _trained_weight_steps(node: Any, module: nn.Module, weight: Any, qmax: int) -> tuple[Any, int] | str:
    """Per output channel, the step of the grid fine-tuning put ``node``'s weight on, as the exported initializer
    ``weight`` holds it (scaled by whatever the export folded into each channel: a BatchNorm after the convolution),
    and the channel axis of ``weight``; or why there is none that onnxruntime can use."""
    import numpy as np
    from onnx import helper

    quantizer: Any = module.weight_quantizer
    with torch.no_grad():
        trained = quantizer(module.get_parameter("weight").detach()).float().cpu().numpy().astype(np.float64)
    w, axis = weight.astype(np.float64), 0
    transposed = node.op_type == "Gemm" and not any(
        a.name == "transB" and helper.get_attribute_value(a) for a in node.attribute
    )
    if transposed:
        w, axis = w.T, 1
    padded = w.ndim == trained.ndim == 4 and w.shape[0] == trained.shape[0] and w.shape[1] > trained.shape[1]
    if padded and not w[:, trained.shape[1] :].any():  # a stem fed a zero-padded input (quantize_int8's pad_stem)
        w = w[:, : trained.shape[1]]
    if w.shape != trained.shape:
        return f"weight shape {w.shape} is not the module's {trained.shape}"
    flat_w, flat_t = w.reshape(len(w), -1), trained.reshape(len(trained), -1)
    norm = (flat_t * flat_t).sum(1)
    factor = np.where(norm > 0, (flat_w * flat_t).sum(1) / np.where(norm > 0, norm, 1.0), 1.0)
    steps = np.broadcast_to(_step(quantizer).numpy().astype(np.float64).reshape(-1), (len(w),)) * np.abs(factor)
    if quantizer.axis is None:  # one scale for the tensor: only if the export folded the same factor everywhere
        if not np.allclose(steps, steps[0], rtol=1e-5):
            return "per-tensor weight with a different factor per channel (a BatchNorm left unfolded in fine-tuning)"
        steps = np.full_like(steps, steps[0])
    steps = np.where(steps > 0, steps, 1.0)  # an all-zero channel: any scale
    k = flat_w / steps[:, None]
    if np.abs(k - np.rint(k)).max(initial=0.0) > 1e-2 or np.abs(np.rint(k)).max(initial=0.0) > qmax:
        return f"weight is not on the trained grid within +-{qmax} steps"
    return steps, axis


_SAME_GRID_OPS = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "MaxPool", "Identity", "Pad")
"""Ops whose output values are some of their input's (and zeros, for a Pad): onnxruntime quantizes their output on
their input's grid."""


def onnxruntime_overrides(
    model: nn.Module, graph: Any, *, activation_type: str = "uint8", reduce_range: bool = True
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, str]]:
    """onnxruntime ``TensorQuantOverrides`` that put the int8 graph of ``model``'s float export on the grids
    fine-tuning trained with, instead of ranges onnxruntime would calibrate afresh.

    ``model`` is the fake-quantized network, ``graph`` (an ``onnx.ModelProto``) the export of
    ``without_quantizers(model)`` after onnxruntime's pre-processing: every Conv/Gemm node is matched to its module by
    name (``onnx_module_name``). For that node:

    - its input tensor gets scale ``amax / 127`` of the layer's input quantizer (ModelOpt's signed 8-bit grid) and, in
      uint8, zero point 128, so the uint8 grid is the same set of values; a tensor made by a Relu gets zero point 0
      (onnxruntime folds the Relu into the quantization, which then clips at 0; same grid on [0, amax]). Two layers
      reading one tensor: the wider of their ranges, so neither clips. Through ops that only move values
      (``_SAME_GRID_OPS``: a Flatten before the classifier) the grid is set on their input too, where onnxruntime
      takes it from. A tensor made by a Clip (ReLU6) keeps onnxruntime's range: onnxruntime drops the Clip and the
      range does its clipping (a grid of the trained step there cost a timm mobilenetv2 a third of its agreement);
    - its weight gets the step of the layer's weight quantizer (amax / 63 for 7 bits), per channel or per tensor as
      trained, times the per-channel factor the export folded in (a BatchNorm after the convolution), found by
      comparing the initializer with the fake-quantized weight. Every weight value is then a point of onnxruntime's
      grid (+-64 with ``reduce_range``, else +-127), checked before the override is used.

    Measured on CIFAR-100 mobilenetv3_small_100 students (per-tensor 7-bit weights, seeds 0 and 1), the deployed graph
    then agreed with ModelOpt's fake-quantized network on 0.82 and 0.83 of test images (0.72 and 0.79 recalibrated).
    onnxruntime's own calibration still sets the tensors fine-tuning did not quantize (each convolution's output, the
    squeeze-excite gates, residual sums). Returns the overrides and ``{node: reason}`` for every Conv/Gemm whose input
    or weight is left to onnxruntime's calibration (a layer that is not quantized, an input made by a Clip, a weight
    that does not fit; logged)."""
    import numpy as np
    from onnx import numpy_helper

    if activation_type not in ("uint8", "int8"):
        raise ConfigError(f"unknown activation_type {activation_type!r}; choose 'uint8' or 'int8'")
    modules = dict(model.named_modules())
    initializers = {i.name: i for i in graph.graph.initializer}
    producers = {out: node for node in graph.graph.node for out in node.output}
    overrides: dict[str, list[dict[str, Any]]] = {}
    skipped: dict[str, str] = {}
    for node in graph.graph.node:
        if node.op_type not in ("Conv", "Gemm"):
            continue
        name = onnx_module_name(node.name)
        module = modules.get(name)
        inq, wq = getattr(module, "input_quantizer", None), getattr(module, "weight_quantizer", None)
        if module is None or inq is None or wq is None:
            skipped[node.name] = f"no quantized module {name!r}"
            continue
        if not (inq.is_enabled and wq.is_enabled) or inq.amax is None or wq.amax is None:
            skipped[node.name] = f"{name}: quantizers disabled or uncalibrated"
            continue
        step = float(_step(inq).max())
        # onnxruntime quantizes a Flatten/Reshape/MaxPool's output on its input's grid: set the grid where it starts
        tensors = [node.input[0]]
        while (producer := producers.get(tensors[-1])) is not None and producer.op_type in _SAME_GRID_OPS:
            tensors.append(producer.input[0])
        if activation_type == "uint8" and producer is not None and producer.op_type == "Clip":
            # onnxruntime drops the Clip (ReLU6) and clips by the quantization range instead, which must then end at
            # the Clip's bounds: a grid of the trained step cannot, so this range stays onnxruntime's calibration
            skipped[node.name] = f"{name}: input made by a Clip, its range calibrated by onnxruntime"
            tensors = []
        zero = 0 if activation_type == "int8" or (producer is not None and producer.op_type == "Relu") else 128
        zero_type = np.uint8 if activation_type == "uint8" else np.int8
        for tensor in tensors:
            previous = overrides.get(tensor)
            if previous is None or float(previous[0]["scale"]) < step:
                overrides[tensor] = [{"scale": np.array(step, np.float32), "zero_point": np.array(zero, zero_type)}]
        if len(node.input) < 2 or node.input[1] not in initializers:
            skipped[node.name] = f"{name}: weight is not an initializer"
            continue
        weight = numpy_helper.to_array(initializers[node.input[1]])
        found = _trained_weight_steps(node, module, weight, 64 if reduce_range else 127)
        if isinstance(found, str):
            skipped[node.name] = f"{name}: {found}"
            continue
        steps, axis = found
        channels = [{"scale": np.array(s, np.float32), "zero_point": np.array(0, np.int8)} for s in steps]
        if wq.axis is None:
            overrides[node.input[1]] = channels[:1]
        else:
            channels[0]["axis"] = axis
            overrides[node.input[1]] = channels
    if skipped:
        listed = "; ".join(f"{node}: {reason}" for node, reason in list(skipped.items())[:3])
        more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        log.warning("int8 scales of %d layer(s) left to onnxruntime's calibration (%s%s)", len(skipped), listed, more)
    return overrides, skipped


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
    """Export a fake-quantized ``model`` as a QDQ ONNX graph (``export_onnx`` with ``precision="int8-qdq"``; weights
    in 8 bits, see ``with_8bit_weights``) and check that it holds Q/DQ pairs. onnxslim is off by default: it may fold
    the DequantizeLinear of a weight into a float constant, which would turn the int8 graph back into a float one."""
    out = export_onnx(
        with_8bit_weights(model),
        path,
        preprocessing=preprocessing,
        opset=opset,
        dynamic_batch=dynamic_batch,
        simplify=simplify,
        metadata=metadata,
        precision="int8-qdq",
        check_rtol=QDQ_CHECK_RTOL,
        check_optimized=False,
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
