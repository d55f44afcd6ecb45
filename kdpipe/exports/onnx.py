"""Export a trained model to ONNX with a symbolic batch dimension that is proven to work, not only declared.

Exporter: the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``). On the torch this project pins
(2.14) it is the one that gives a correct, stable graph for timm CNNs:

- it needs nothing beyond torch, while the dynamo exporter (torch's default since 2.9) needs ``onnxscript``, which
  kdpipe does not depend on (it is absent from this install; ``dynamo=True`` fails before tracing);
- it names the batch axis exactly as ``dynamic_axes`` says, folds BatchNorm into the convolutions (constant
  folding is always on) and emits plain Conv/Relu/Add/GlobalAveragePool/Gemm nodes that onnxruntime's int8 fusions
  and TensorRT's parser both handle;
- it supports opsets 9..20 (``supported_opsets``), covering what TensorRT 10/11 and onnxruntime >= 1.18 read; the
  dynamo exporter only emits opset >= 18, and torch.export specialises an example batch of 1 to a constant.

The cost is a DeprecationWarning from torch, which is caught and logged at debug level. The example input has
batch 2 for a dynamic export so that no size-1 broadcasting can be baked in by the trace, and whatever was
declared, the batch dimension is then checked for real by running onnxruntime at batch 1 and ``check_batch``.

Metadata (``metadata_props``, flat string keys; values that are lists are JSON arrays):
``kdpipe.version``, ``kdpipe.precision`` (fp32 here; int8/fp16 after conversion), ``kdpipe.input_name``,
``kdpipe.output_name``, ``kdpipe.dynamic_batch`` ("true"/"false") and ``kdpipe.preprocessing.<field>`` for each
``Preprocessing`` field, plus the caller's own keys unchanged. ``read_preprocessing`` rebuilds the dataclass.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from kdpipe.errors import ConfigError, ExportError
from kdpipe.exports.runtime import create_onnx_session, require_module, run_onnx
from kdpipe.fileio import atomic_write_with

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

META_PREFIX = "kdpipe."
_PRE_PREFIX = "kdpipe.preprocessing."
# The TorchScript exporter's own range (torch.onnx._constants) is 7..20, but below opset 9 it keeps the weights as
# graph inputs (ONNX IR v3), which servers and quantizers mis-handle; kdpipe starts at 9.
_FALLBACK_OPSETS = (9, 20)
# Export check: ONNX Runtime and torch agree to ~1e-6 of the logit scale in fp32; 1e-3 of it leaves room for
# reordered sums in deeper nets while still catching a wrong graph (a baked-in batch is off by O(1)).
_CHECK_RTOL = 1e-3
_CHECK_ATOL = 1e-5


@dataclass(frozen=True)
class Preprocessing:
    """What a server must do to an image before feeding the model: convert it to ``channel_order`` ("RGB" for 3
    channels, "L" for 1), resize its short side to ``floor(image_size / crop_pct)`` with ``interpolation`` and keep
    the centre ``image_size`` square (timm's eval transform; crop_pct 1: the short side fitted), then
    ``((pixel * scale) - mean) / std`` per channel."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    in_chans: int
    channel_order: str
    classes: tuple[str, ...]
    layout: str = "NCHW"
    scale: float = 1 / 255
    crop_pct: float = 1.0
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.in_chans < 1 or self.image_size < 1:
            raise ConfigError(
                f"preprocessing needs in_chans >= 1 and image_size >= 1, got {self.in_chans}, {self.image_size}"
            )
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ConfigError(
                f"preprocessing mean {self.mean} and std {self.std} must have one value per channel ({self.in_chans})"
            )
        if not 0.0 < self.crop_pct <= 1.0:
            raise ConfigError(f"preprocessing crop_pct must be in (0, 1], got {self.crop_pct}")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"preprocessing std must be > 0 for every channel, got {self.std}")
        expected = {1: "L", 3: "RGB"}.get(self.in_chans)
        if expected is not None and self.channel_order != expected:
            raise ConfigError(
                f"channel_order for {self.in_chans} channel(s) must be {expected!r}, got {self.channel_order!r}"
            )
        if self.layout != "NCHW":
            raise ConfigError(f"layout must be 'NCHW' (the layout torch exports), got {self.layout!r}")

    def to_metadata(self) -> dict[str, str]:
        """Flat ``kdpipe.preprocessing.<field>`` keys; tuples as JSON arrays, numbers as JSON numbers."""
        return {f"{_PRE_PREFIX}{k}": v if isinstance(v, str) else json.dumps(v) for k, v in asdict(self).items()}

    @classmethod
    def from_metadata(cls, meta: dict[str, str]) -> Preprocessing:
        """Inverse of ``to_metadata``; ``ExportError`` when a key is missing or unreadable. Keys added after 0.1.0's
        first exports (``crop_pct``, ``interpolation``) default to what those exports did."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            key = f"{_PRE_PREFIX}{f.name}"
            if key not in meta:
                if f.name in ("crop_pct", "interpolation"):
                    continue
                raise ExportError(
                    f"ONNX metadata lacks {key}", hint="the model was not exported by kdpipe; re-export it"
                )
            raw = meta[key]
            values[f.name] = raw if f.name in ("channel_order", "layout", "interpolation") else json.loads(raw)
        for name in ("mean", "std", "classes"):
            values[name] = tuple(values[name])
        return cls(**values)


@dataclass
class OnnxExport:
    """The result of ``export_onnx``: where the file is and what was verified about it."""

    path: Path
    opset: int
    input_name: str
    output_name: str
    dynamic_batch: bool
    simplified: bool
    size_bytes: int
    checked_batches: tuple[int, ...]  # batch sizes actually run through onnxruntime and compared with torch

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path), "checked_batches": list(self.checked_batches)}


def supported_opsets() -> tuple[int, int]:
    """(min, max) ONNX opset the installed torch.onnx TorchScript exporter can target, as kdpipe uses it."""
    try:
        from torch.onnx import _constants  # private, but the only place torch states its range
    except ImportError:
        return _FALLBACK_OPSETS
    low = max(int(getattr(_constants, "ONNX_BASE_OPSET", _FALLBACK_OPSETS[0])), _FALLBACK_OPSETS[0])
    high = int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", _FALLBACK_OPSETS[1]))
    return low, high


def check_opset(opset: int) -> None:
    """``ConfigError`` naming the supported range when ``opset`` is outside it."""
    low, high = supported_opsets()
    if not isinstance(opset, int) or isinstance(opset, bool) or not low <= opset <= high:
        raise ConfigError(
            f"ONNX opset {opset!r} is not supported: torch {torch.__version__} exports opsets {low}..{high}",
            hint=f"set opset to a value in {low}..{high} (18 is a safe default for onnxruntime and TensorRT)",
        )


def read_metadata(path: Path | str) -> dict[str, str]:
    """The ``metadata_props`` of an .onnx file as a dict (weights are not loaded)."""
    onnx_mod = require_module("onnx")
    try:
        model = onnx_mod.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ExportError(f"cannot read ONNX model {path}: {exc}", hint="check the path; re-export the model") from exc
    return {p.key: p.value for p in model.metadata_props}


def read_preprocessing(path: Path | str) -> Preprocessing:
    """The ``Preprocessing`` stored in an .onnx exported by kdpipe."""
    return Preprocessing.from_metadata(read_metadata(path))


def set_metadata(model: onnx.ModelProto, meta: dict[str, str]) -> None:
    """Replace the model's ``metadata_props`` by ``meta`` (ONNX allows each key once)."""
    del model.metadata_props[:]
    for key, value in sorted(meta.items()):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def _example_input(preprocessing: Preprocessing, batch: int) -> torch.Tensor:
    # Fixed seed: exports of the same weights are byte-identical and the checks see the same numbers every run.
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, preprocessing.in_chans, preprocessing.image_size, preprocessing.image_size, generator=gen)


def _torch_export(
    model: nn.Module, example: torch.Tensor, opset: int, input_name: str, output_name: str, dynamic: bool
) -> onnx.ModelProto:
    onnx_mod = require_module("onnx")
    buffer = io.BytesIO()
    axes = {input_name: {0: "batch"}, output_name: {0: "batch"}} if dynamic else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.onnx.export(
                model,
                (example,),
                buffer,  # type: ignore[arg-type]  # the TorchScript exporter writes to file objects too
                dynamo=False,
                opset_version=opset,
                input_names=[input_name],
                output_names=[output_name],
                dynamic_axes=axes,
            )
        except Exception as exc:
            raise ExportError(
                f"torch.onnx.export of {type(model).__name__} at opset {opset} failed: {type(exc).__name__}: {exc}",
                hint="the model may use an operator this opset lacks: try a newer opset, or check its forward() "
                "returns a single logits tensor",
            ) from exc
    for w in caught:
        log.debug("torch.onnx.export: %s", w.message)
    return onnx_mod.load_from_string(buffer.getvalue())


def _validate(model: onnx.ModelProto, what: str) -> onnx.ModelProto:
    """Full checker, then strict shape inference; returns the model with inferred value_info."""
    onnx_mod = require_module("onnx")
    try:
        onnx_mod.checker.check_model(model, full_check=True)
        return onnx_mod.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as exc:
        raise ExportError(
            f"{what} failed the ONNX checker / shape inference: {exc}", hint="report the model and opset"
        ) from exc


def _check_io(model: onnx.ModelProto, input_name: str, output_name: str, dynamic: bool) -> None:
    """The graph has exactly our input and output, with a symbolic ``batch`` (or a fixed 1) as dimension 0."""
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    if inputs != [input_name] or outputs != [output_name]:
        raise ExportError(
            f"exported graph has inputs {inputs} and outputs {outputs}, "
            f"expected [{input_name!r}] and [{output_name!r}]",
            hint="the model's forward() must take one image tensor and return one logits tensor",
        )
    for value in (model.graph.input[0], model.graph.output[0]):
        dim = value.type.tensor_type.shape.dim[0]
        ok = dim.dim_param == "batch" if dynamic else dim.dim_value == 1
        if not ok:
            raise ExportError(
                f"{value.name} dimension 0 is {dim.dim_param or dim.dim_value!r}, expected {'batch' if dynamic else 1}",
                hint="the model reshapes with a constant batch size; use x.flatten(1) rather than x.view(N, -1)",
            )


def _ort_logits(serialized: bytes, x: np.ndarray) -> np.ndarray:
    session = create_onnx_session(serialized, providers=["CPUExecutionProvider"])
    return run_onnx(session, x, batch_size=len(x))


def _close(a: np.ndarray, b: np.ndarray, rtol: float = _CHECK_RTOL) -> tuple[bool, float, float]:
    """Whether two logit arrays agree within the export tolerance, the max |diff| and the allowed |diff|."""
    diff = float(np.max(np.abs(a - b))) if a.shape == b.shape else float("inf")
    allowed = _CHECK_ATOL + rtol * float(np.max(np.abs(b)))
    return diff <= allowed, diff, allowed


def _simplify(model: onnx.ModelProto, probe: np.ndarray) -> onnx.ModelProto | None:
    """onnxslim's version of ``model`` when it loads, validates and gives the same logits; else None (logged)."""
    try:
        onnxslim = require_module("onnxslim", purpose="simplifying ONNX")
        slim = onnxslim.slim(copy.deepcopy(model))
        if slim is None:
            raise RuntimeError("onnxslim returned no model")
        slim = _validate(slim, "the simplified graph")
        ok, diff, allowed = _close(
            _ort_logits(slim.SerializeToString(), probe), _ort_logits(model.SerializeToString(), probe)
        )
        if not ok:
            log.warning(
                "onnxslim changed the outputs (max |diff| %.3g > %.3g); keeping the unsimplified graph", diff, allowed
            )
            return None
        return slim
    except Exception as exc:  # simplification is an optimisation: any failure keeps the verified original
        log.warning("onnxslim simplification failed, keeping the unsimplified graph: %s", exc)
        return None


def export_onnx(
    model: nn.Module,
    path: Path,
    *,
    preprocessing: Preprocessing,
    opset: int = 18,
    dynamic_batch: bool = True,
    simplify: bool = True,
    check_batch: int = 8,
    input_name: str = "input",
    output_name: str = "logits",
    metadata: dict[str, str] | None = None,
    precision: str = "fp32",
    check_rtol: float | None = None,
    check_optimized: bool = True,
) -> OnnxExport:
    """Export ``model`` (a copy, in eval mode, on CPU, in fp32) to ``path`` and prove the file works.

    Steps: TorchScript export (see the module docstring for why) with dimension 0 named ``batch`` when
    ``dynamic_batch``; the full ONNX checker and strict shape inference; optional onnxslim simplification, kept only
    if it validates and gives the same logits; metadata (module docstring); then onnxruntime runs the final bytes at
    batch 1 and ``check_batch`` (dynamic) and compares with torch on the same random input, within 1e-3 of the
    logit scale. A static export must run batch 1 and reject batch ``max(check_batch, 2)``. Only then is the file
    written, atomically, so a failed export never leaves a file behind. Every failure is an ``ExportError``.

    ``precision`` is recorded in the metadata (``int8-qdq`` for a fake-quantized model, whose Q/DQ nodes export as
    QuantizeLinear/DequantizeLinear); ``check_rtol`` replaces the 1e-3 check tolerance (relative to the logit scale)
    where integer kernels round differently from the float emulation that was traced; ``check_optimized=False`` runs
    the check with onnxruntime's graph optimisations off (a QDQ graph's nodes executed as written, not fused into
    integer kernels), which checks the graph's structure against the emulation without kernel rounding.
    """
    check_opset(opset)
    if dynamic_batch and check_batch < 2:
        raise ConfigError(f"check_batch must be >= 2 to prove a dynamic batch dimension, got {check_batch}")
    if not input_name or not output_name or input_name == output_name:
        raise ConfigError(f"input and output names must be distinct and non-empty, got {input_name!r}, {output_name!r}")
    extra = dict(metadata or {})
    clashes = sorted(k for k in extra if k.startswith(META_PREFIX))
    if clashes or not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise ConfigError(
            f"export metadata must map str to str without the reserved {META_PREFIX!r} prefix (got {clashes or extra})"
        )

    # A copy: the caller's model keeps its device, dtype and train/eval mode.
    net = copy.deepcopy(model).to("cpu", torch.float32).eval()
    onnx_model = _torch_export(
        net, _example_input(preprocessing, 2 if dynamic_batch else 1), opset, input_name, output_name, dynamic_batch
    )
    onnx_model = _validate(onnx_model, f"the export of {type(model).__name__}")
    _check_io(onnx_model, input_name, output_name, dynamic_batch)

    probe = _example_input(preprocessing, check_batch if dynamic_batch else 1)
    simplified = False
    if simplify:
        slim = _simplify(onnx_model, probe.numpy())
        if slim is not None:
            _check_io(slim, input_name, output_name, dynamic_batch)
            onnx_model, simplified = slim, True

    from kdpipe import __version__

    set_metadata(
        onnx_model,
        {
            "kdpipe.version": __version__,
            "kdpipe.precision": precision,
            "kdpipe.input_name": input_name,
            "kdpipe.output_name": output_name,
            "kdpipe.dynamic_batch": "true" if dynamic_batch else "false",
            **preprocessing.to_metadata(),
            **extra,
        },
    )
    serialized = onnx_model.SerializeToString()
    rtol = _CHECK_RTOL if check_rtol is None else check_rtol
    checked = _check_batches(net, serialized, preprocessing, dynamic_batch, check_batch, rtol, check_optimized)

    onnx_mod = require_module("onnx")
    atomic_write_with(path, lambda tmp: onnx_mod.save_model(onnx_model, str(tmp)))
    result = OnnxExport(
        path=Path(path),
        opset=opset,
        input_name=input_name,
        output_name=output_name,
        dynamic_batch=dynamic_batch,
        simplified=simplified,
        size_bytes=Path(path).stat().st_size,
        checked_batches=checked,
    )
    log.info("exported %s (opset %d, %d bytes, batches %s checked)", path, opset, result.size_bytes, checked)
    return result


_FP32_ERROR_FACTOR = 4.0
"""onnxruntime's float32 error may be this many times torch's own (both measured against a float64 forward)."""


def _within_float32_error(
    net: nn.Module, x: torch.Tensor, got: np.ndarray, expected: np.ndarray, diff: float, allowed: float
) -> bool:
    """Whether a disagreement beyond the tolerance is float32 rounding of an ill-conditioned network rather than a
    wrong graph: a nearly untrained net in eval mode (BatchNorm statistics far from the activations') can amplify
    rounding until torch's own float32 logits are 0.1 away from the exact ones, and onnxruntime's kernels, which
    round in another order, land as far away on the other side. Both are measured against a float64 forward of a
    copy of the network; the export is accepted when onnxruntime is no more than ``_FP32_ERROR_FACTOR`` times as far
    from it as torch, which a wrong graph (a dropped op, a swapped axis) never is."""
    try:
        with torch.inference_mode():
            exact = copy.deepcopy(net).double()(x.double()).numpy()
    except Exception as exc:  # a module that cannot run in float64: no second opinion
        log.debug("float64 reference failed: %s", exc)
        return False
    torch_err = float(np.max(np.abs(expected - exact)))
    ort_err = float(np.max(np.abs(got - exact)))
    if ort_err <= max(allowed, _FP32_ERROR_FACTOR * torch_err):
        log.warning(
            "onnxruntime and torch differ by %.3g (> %.3g), but the network is ill-conditioned in float32: torch's "
            "own logits are %.3g from a float64 forward and onnxruntime's %.3g; accepted as rounding",
            diff,
            allowed,
            torch_err,
            ort_err,
        )
        return True
    return False


def _check_batches(
    net: nn.Module,
    serialized: bytes,
    preprocessing: Preprocessing,
    dynamic: bool,
    check_batch: int,
    rtol: float,
    optimized: bool = True,
) -> tuple[int, ...]:
    """Run the serialized model in onnxruntime and compare with torch; returns the batch sizes that passed."""
    session = create_onnx_session(serialized, providers=["CPUExecutionProvider"], optimize=optimized)
    inp = session.get_inputs()[0].name
    batches = (1, check_batch) if dynamic else (1,)
    for batch in batches:
        x = _example_input(preprocessing, batch)
        with torch.inference_mode():
            expected = net(x).float().numpy()
        try:
            got = run_onnx(session, x, batch_size=batch)
        except ExportError as exc:
            raise ExportError(
                f"the exported graph does not run at batch {batch}: {exc.message}",
                hint="the model probably fixes the batch size (x.view(N, -1), int(x.shape[0])); use x.flatten(1)",
            ) from exc
        ok, diff, allowed = _close(got, expected, rtol)
        if not ok and not _within_float32_error(net, x, got, expected, diff, allowed):
            raise ExportError(
                f"onnxruntime and torch disagree at batch {batch}: max |logit diff| {diff:.3g} > {allowed:.3g}",
                hint="export with simplify=False to rule out onnxslim, or try another opset",
            )
    if not dynamic:
        wrong = max(check_batch, 2)
        try:
            session.run(None, {inp: _example_input(preprocessing, wrong).numpy()})
        except Exception:
            return batches  # rejected, as a static graph must
        raise ExportError(
            f"the static export accepted batch {wrong}; its batch dimension is not fixed to 1",
            hint="report this: the graph does not declare the shape it was traced with",
        )
    return batches
