"""ONNX Runtime sessions and batched inference, shared by the export checks, parity and the benchmark.

Everything that runs an exported ``.onnx`` goes through ``create_onnx_session`` so that the settings that change
numbers (execution providers, thread count, graph optimisation level) are chosen in one place and recorded the
same way everywhere. onnxruntime is an optional dependency (the ``export`` extra): it is imported inside the
functions, and a missing install is a ``ConfigError`` naming the command that fixes it.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kdpipe.errors import ConfigError, ExportError
from kdpipe.requirements import EXPORT_HINT

if TYPE_CHECKING:
    import onnxruntime as ort

log = logging.getLogger(__name__)

# Preferred order: a GPU build of onnxruntime lists CUDA first; the CPU EP is always the fallback. The TensorRT EP
# is left out on purpose: kdpipe builds TensorRT engines itself (exports/tensorrt.py), and the EP would silently
# spend minutes building its own engine on the first run.
_PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


def require_module(name: str, *, purpose: str = "exporting to ONNX") -> ModuleType:
    """Import an optional export dependency by name, or raise ``ConfigError`` saying how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ConfigError(
            f"{purpose} needs the {name} package, which does not import here: {exc}", hint=EXPORT_HINT
        ) from exc


def onnx_providers() -> list[str]:
    """Execution providers this onnxruntime build offers, in the order kdpipe prefers them (CUDA, then CPU)."""
    ort = require_module("onnxruntime")
    available = set(ort.get_available_providers())
    return [p for p in _PREFERRED_PROVIDERS if p in available]


def create_onnx_session(
    path: Path | str | bytes,
    *,
    providers: Sequence[str | tuple[str, dict[str, Any]]] | None = None,
    threads: int | None = None,
    optimize: bool = True,
) -> ort.InferenceSession:
    """Open an ONNX model (a file path, or serialized bytes) in an onnxruntime session.

    ``providers`` defaults to ``onnx_providers()`` (CUDA when this build has it, then CPU); an entry may be a
    ``(name, options)`` pair such as ``("CUDAExecutionProvider", {"device_id": 1})``; naming one this build
    lacks is a ``ConfigError`` listing those it has. ``threads`` sets the intra-op thread count (None: onnxruntime's
    default, one per physical core). Graph optimisations are all enabled (constant folding, operator fusion,
    layout transforms and the QDQ -> QLinearConv fusion that makes int8 models fast on CPU); ``optimize=False``
    disables them all, so a QDQ graph runs its QuantizeLinear/DequantizeLinear nodes literally, in float: the graph's
    own arithmetic, which is what fake quantization emulated (used to check a QDQ export's structure).
    """
    ort = require_module("onnxruntime")
    available = ort.get_available_providers()
    chosen: list[Any] = list(providers) if providers is not None else onnx_providers()
    missing = [p for p in chosen if (p if isinstance(p, str) else p[0]) not in available]
    if missing or not chosen:
        raise ConfigError(
            f"onnxruntime execution provider(s) {missing or chosen} not available; this build has {available}",
            hint="install onnxruntime-gpu for CUDAExecutionProvider, or leave providers unset",
        )
    if threads is not None and threads < 0:
        raise ConfigError(f"onnxruntime threads must be >= 0 (0 = onnxruntime's default), got {threads}")

    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if threads is not None:
        options.intra_op_num_threads = threads
    # Operators of these small CNNs run one after another; a second pool of inter-op threads only competes
    # with the intra-op pool for the same cores.
    options.inter_op_num_threads = 1
    # 3 = errors only: warnings such as "some nodes were not assigned to the preferred EP" are expected when a
    # CUDA session keeps shape ops on the CPU, and would otherwise flood every benchmark log.
    options.log_severity_level = 3

    source = path if isinstance(path, bytes) else str(path)
    if not isinstance(path, bytes) and not Path(path).is_file():
        raise ExportError(f"ONNX model {path} does not exist", hint="export it first (kdpipe.exports.export_onnx)")
    try:
        session = ort.InferenceSession(source, sess_options=options, providers=chosen)
    except Exception as exc:  # onnxruntime raises its own pybind exception types (Fail, InvalidGraph, ...)
        where = "the serialized model" if isinstance(path, bytes) else str(path)
        raise ExportError(
            f"onnxruntime cannot load {where}: {exc}",
            hint="re-export the model; check the opset is supported by this onnxruntime",
        ) from exc
    log.debug(
        "onnxruntime session on %s, providers %s, threads %s",
        source if isinstance(source, str) else "bytes",
        session.get_providers(),
        threads,
    )
    return session


def _as_float_array(images: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        images = images.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(images, dtype=np.float32)


def _numpy_dtype(onnx_type: str) -> Any:
    # Session input types read like "tensor(float)"; only the float types a model input can sensibly have.
    types: dict[str, Any] = {"tensor(float16)": np.float16, "tensor(double)": np.float64}
    return types.get(onnx_type, np.float32)


def run_onnx(session: ort.InferenceSession, images: np.ndarray | torch.Tensor, batch_size: int) -> np.ndarray:
    """Run ``images`` (N, C, H, W) through the session's first input in batches; return the first output as float32.

    A graph with a fixed batch dimension is fed chunks of exactly that size, the last one padded with zeros and the
    padding dropped from the result, so static exports can be evaluated on any number of images. An input declared
    float16 (an fp16 graph without float32 IO) is cast on the way in.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    array = _as_float_array(images)
    if array.ndim < 1 or len(array) == 0:
        raise ExportError(f"run_onnx got no images (shape {array.shape})")
    inp = session.get_inputs()[0]
    out_name = session.get_outputs()[0].name
    dtype = _numpy_dtype(inp.type)
    fixed = inp.shape[0] if inp.shape and isinstance(inp.shape[0], int) else None
    step = fixed or batch_size

    chunks: list[np.ndarray] = []
    for start in range(0, len(array), step):
        chunk = array[start : start + step]
        real = len(chunk)
        if fixed is not None and real < fixed:
            pad = np.zeros((fixed - real, *chunk.shape[1:]), dtype=chunk.dtype)
            chunk = np.concatenate([chunk, pad])
        try:
            (logits,) = session.run([out_name], {inp.name: chunk.astype(dtype, copy=False)})
        except Exception as exc:
            raise ExportError(
                f"onnxruntime failed on a batch of shape {chunk.shape} for input {inp.name!r} "
                f"(declared {inp.shape}, {inp.type}): {exc}",
                hint="check the images match the exported input size and channels",
            ) from exc
        chunks.append(np.asarray(logits, dtype=np.float32)[:real])
    return np.concatenate(chunks)


class OnnxRunner:
    """A callable ``images -> logits`` over one session: what ``measure_parity`` and the benchmark take.

    ``session`` is kept public so a report can record the providers that actually ran (``session_summary``).
    """

    def __init__(self, session: ort.InferenceSession, batch_size: int) -> None:
        self.session = session
        self.batch_size = batch_size

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return run_onnx(self.session, images, self.batch_size)


def create_onnx_runner(
    path: Path | str,
    *,
    providers: list[str] | None = None,
    threads: int | None = None,
    batch_size: int = 256,
) -> OnnxRunner:
    """Open ``path`` with ``create_onnx_session`` and wrap it as an ``OnnxRunner`` of ``batch_size``."""
    return OnnxRunner(create_onnx_session(path, providers=providers, threads=threads), batch_size)


def session_summary(session: Any) -> dict[str, Any]:
    """What a report should record about a session: providers, input/output names, shapes and types."""
    inp, out = session.get_inputs()[0], session.get_outputs()[0]
    return {
        "providers": list(session.get_providers()),
        "input": {"name": inp.name, "shape": list(inp.shape), "type": inp.type},
        "output": {"name": out.name, "shape": list(out.shape), "type": out.type},
    }
