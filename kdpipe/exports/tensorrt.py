"""TensorRT engines from kdpipe's ONNX exports: build, stamp, refuse mismatched engines, run.

``tensorrt`` is imported lazily and only here; every function that needs it calls ``require_tensorrt`` first, so
importing kdpipe.exports works on machines without it (the CPU CI, this project's development machine).

Precision by TensorRT major version:

- TensorRT 10: networks are weakly typed; ``precision`` sets builder flags. "fp16" sets FP16; "int8" sets INT8
  (plus FP16 for layers left unquantized) and needs a QDQ ONNX: explicit quantization, since kdpipe uses no
  calibrator API.
- TensorRT 11: networks are always strongly typed and the precision flags and calibrators are gone; the engine
  runs in the types the ONNX graph carries. "fp16" therefore needs the graph from ``convert_fp16`` and "int8" the
  QDQ graph from ``quantize_int8``; ``check_onnx_for_tensorrt`` says so before a build is attempted.

Either way TensorRT takes only symmetric signed int8 Q/DQ (zero point 0): quantize with ``activation_type="int8"``.

Every engine gets a stamp ``<engine>.json`` (TensorRT and CUDA versions, GPU name and compute capability,
precision, batch profile). An engine only runs on the TensorRT version and GPU architecture it was built for;
``load_engine`` compares the stamp with this machine and raises an ``ExportError`` that says to rebuild, instead
of TensorRT's deserialisation error or, worse, a silently slower engine.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from kdpipe.errors import ConfigError, ExportError
from kdpipe.exports.runtime import require_module
from kdpipe.fileio import atomic_open, atomic_write_json
from kdpipe.requirements import TENSORRT_HINT

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")


def _import_tensorrt() -> Any:
    import tensorrt  # an optional, GPU-only dependency

    return tensorrt


def tensorrt_version() -> str | None:
    """The installed TensorRT version, or None when ``tensorrt`` does not import (absent, or no CUDA libraries)."""
    try:
        return str(_import_tensorrt().__version__)
    except Exception:  # ImportError, or OSError from a wheel whose CUDA libraries are missing
        return None


def require_tensorrt() -> None:
    """``ConfigError`` (exit 2) when TensorRT cannot be used here, with the install command."""
    if tensorrt_version() is None:
        raise ConfigError("format tensorrt needs the tensorrt package, which does not import here", hint=TENSORRT_HINT)


@dataclass
class EngineStamp:
    """Where and how an engine was built; stored as ``<engine>.json`` beside it."""

    tensorrt: str
    cuda: str
    gpu: str
    compute_capability: str
    precision: str
    min_batch: int
    opt_batch: int
    max_batch: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineStamp:
        names = {f.name for f in fields(cls)}
        missing = sorted(names - set(data))
        if missing:
            raise ExportError(f"engine stamp lacks {', '.join(missing)}", hint="rebuild the engine")
        return cls(**{k: data[k] for k in names})


def stamp_path(engine_path: Path) -> Path:
    """The stamp file of an engine: ``model.engine`` -> ``model.engine.json``."""
    return Path(engine_path).with_name(Path(engine_path).name + ".json")


def check_stamp(stamp: EngineStamp, current: EngineStamp, *, engine_path: Path | str | None = None) -> None:
    """``ExportError`` when ``stamp`` (how an engine was built) does not fit ``current`` (this machine).

    Compared: TensorRT version, GPU name and compute capability; an engine is not portable across any of them.
    The CUDA version is recorded but not compared: TensorRT is forward compatible with newer CUDA drivers.
    """
    keys = ("tensorrt", "gpu", "compute_capability")
    if all(getattr(stamp, k) == getattr(current, k) for k in keys):
        return
    engine = engine_path if engine_path is not None else "engine"
    raise ExportError(
        f"engine {engine} was built for {stamp.gpu} (compute capability {stamp.compute_capability}) with TensorRT "
        f"{stamp.tensorrt}; this machine has {current.gpu} (compute capability {current.compute_capability}) / "
        f"TensorRT {current.tensorrt}: rebuild it",
        hint="rerun the export stage on this machine (engines are specific to the GPU and TensorRT version)",
    )


def current_stamp(precision: str, min_batch: int, opt_batch: int, max_batch: int) -> EngineStamp:
    """This machine's TensorRT, CUDA and GPU (device 0 of torch's current device) as a stamp."""
    require_tensorrt()
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            "TensorRT needs a CUDA GPU, and torch sees none", hint="run the tensorrt export on a GPU machine"
        )
    device = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(device)
    return EngineStamp(
        tensorrt=str(tensorrt_version()),
        cuda=str(torch.version.cuda),
        gpu=torch.cuda.get_device_name(device),
        compute_capability=f"{major}.{minor}",
        precision=precision,
        min_batch=min_batch,
        opt_batch=opt_batch,
        max_batch=max_batch,
    )


def onnx_precision(onnx_path: Path) -> str:
    """What an ONNX graph computes in: "int8" (has QuantizeLinear), "fp16" (float16 initializers), else "fp32"."""
    onnx = require_module("onnx")
    model = onnx.load(str(onnx_path))
    if any(n.op_type == "QuantizeLinear" for n in model.graph.node):
        return "int8"
    if any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer):
        return "fp16"
    return "fp32"


def check_onnx_for_tensorrt(onnx_path: Path, precision: str, tensorrt_major: int) -> None:
    """``ConfigError`` when ``onnx_path`` cannot give a ``precision`` engine on TensorRT ``tensorrt_major``."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown TensorRT precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    onnx = require_module("onnx")
    graph_precision = onnx_precision(onnx_path)
    if precision == "int8":
        if graph_precision != "int8":
            raise ConfigError(
                f"TensorRT int8 needs a QDQ ONNX model (explicit quantization); {onnx_path} has no QuantizeLinear",
                hint="build from the output of kdpipe.exports.quantize_int8(..., activation_type='int8')",
            )
        model = onnx.load(str(onnx_path))
        consts = {t.name: t for t in model.graph.initializer}
        for node in model.graph.node:
            zero = consts.get(node.input[2]) if node.op_type == "QuantizeLinear" and len(node.input) > 2 else None
            if zero is not None and zero.data_type != onnx.TensorProto.INT8:
                raise ConfigError(
                    f"TensorRT takes only signed, symmetric int8 Q/DQ; {onnx_path} quantizes {node.input[0]!r} "
                    f"to {onnx.TensorProto.DataType.Name(zero.data_type)}",
                    hint="re-quantize with activation_type='int8' (the uint8 default is for onnxruntime's CPU EP)",
                )
    elif tensorrt_major >= 11 and precision != graph_precision:
        raise ConfigError(
            f"TensorRT {tensorrt_major} builds strongly typed engines in the ONNX graph's own types: {onnx_path} is "
            f"{graph_precision}, not {precision}",
            hint="for fp16 build from kdpipe.exports.convert_fp16's output; for fp32 from the fp32 export",
        )


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    *,
    precision: str = "fp16",
    min_batch: int = 1,
    opt_batch: int = 8,
    max_batch: int = 64,
    workspace_gb: float = 4.0,
) -> EngineStamp:
    """Build a TensorRT engine for ``onnx_path`` with a batch profile min/opt/max; write it and its stamp.

    The network is explicit-batch (the only kind since TensorRT 10); every input gets the profile
    ``(min_batch | opt_batch | max_batch, *rest)`` over dimension 0, which must be symbolic in the ONNX. Precision
    handling by major version is described in the module docstring. ``workspace_gb`` caps TensorRT's scratch
    memory (GiB). The engine is written atomically, then ``<engine>.json``.
    """
    require_tensorrt()
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ConfigError(
            f"TensorRT batch profile needs 1 <= min <= opt <= max, got {min_batch}, {opt_batch}, {max_batch}"
        )
    if workspace_gb <= 0:
        raise ConfigError(f"workspace_gb must be > 0, got {workspace_gb}")
    trt = _import_tensorrt()
    major = int(str(trt.__version__).split(".")[0])
    check_onnx_for_tensorrt(Path(onnx_path), precision, major)
    stamp = current_stamp(precision, min_batch, opt_batch, max_batch)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if major >= 11 and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)  # the default there; said for clarity
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(
            f"TensorRT cannot parse {onnx_path}: {errors}", hint="check the opset and operators TensorRT supports"
        )

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if major < 11:
        if precision in ("fp16", "int8"):
            config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            config.set_flag(trt.BuilderFlag.INT8)

    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(tensor.shape)
        if shape[0] != -1:
            raise ExportError(
                f"input {tensor.name} of {onnx_path} has a fixed batch {shape[0]}; "
                "a batch profile needs a symbolic one",
                hint="export with dynamic_batch=True",
            )
        rest = shape[1:]
        profile.set_shape(tensor.name, (min_batch, *rest), (opt_batch, *rest), (max_batch, *rest))
    config.add_optimization_profile(profile)

    log.info(
        "building TensorRT %s %s engine from %s (batch %d/%d/%d)",
        trt.__version__,
        precision,
        onnx_path,
        min_batch,
        opt_batch,
        max_batch,
    )
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(
            f"TensorRT failed to build an engine from {onnx_path}",
            hint="see TensorRT's log above; try a smaller max_batch or larger workspace_gb",
        )
    with atomic_open(engine_path, "wb") as fh:
        fh.write(memoryview(serialized))
    atomic_write_json(stamp_path(engine_path), stamp.to_dict())
    return stamp


def read_stamp(engine_path: Path) -> EngineStamp:
    """The stamp written beside an engine; ``ExportError`` when it is missing or unreadable."""
    path = stamp_path(engine_path)
    try:
        return EngineStamp.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise ExportError(
            f"cannot read the stamp {path} of engine {engine_path}: {exc}", hint="rebuild the engine"
        ) from exc


def load_engine(engine_path: Path) -> TensorRTRunner:
    """Deserialize an engine after checking its stamp against this machine (``check_stamp``)."""
    require_tensorrt()
    stamp = read_stamp(engine_path)
    check_stamp(
        stamp,
        current_stamp(stamp.precision, stamp.min_batch, stamp.opt_batch, stamp.max_batch),
        engine_path=engine_path,
    )
    trt = _import_tensorrt()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise ExportError(f"TensorRT could not deserialize {engine_path}", hint="rebuild the engine")
    return TensorRTRunner(engine, stamp)


class TensorRTRunner:
    """Runs an engine on numpy batches, using torch CUDA tensors as the device buffers (no pycuda needed).

    ``runner(images)`` takes (N, C, H, W) float images of any N: they are fed in chunks of at most the profile's
    ``max_batch``, a chunk below ``min_batch`` padded with zeros, and the logits come back as float32 numpy.
    """

    def __init__(self, engine: Any, stamp: EngineStamp) -> None:
        import torch

        trt = _import_tensorrt()
        self.engine = engine
        self.stamp = stamp
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        if len(inputs) != 1 or len(outputs) != 1:
            raise ExportError(f"expected an engine with one input and one output, got {inputs} and {outputs}")
        self.input_name, self.output_name = inputs[0], outputs[0]
        dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
        found = {n: engine.get_tensor_dtype(n) for n in (self.input_name, self.output_name)}
        unknown = {n: str(t) for n, t in found.items() if t not in dtypes}
        if unknown:
            raise ExportError(f"engine I/O types {unknown} are not float32/float16", hint="export with float32 I/O")
        self._in_dtype = dtypes[found[self.input_name]]
        self._out_dtype = dtypes[found[self.output_name]]

    def run_device(self, x: Any) -> Any:
        """Enqueue the engine on torch's current CUDA stream for ``x``, a CUDA tensor of the engine's input dtype with
        a batch inside the profile, and return the output tensor without waiting: the device-resident call a
        benchmark times with CUDA events (no host copies, no synchronisation)."""
        import torch

        if not (self.stamp.min_batch <= len(x) <= self.stamp.max_batch):
            raise ExportError(
                f"batch {len(x)} is outside the engine's profile {self.stamp.min_batch}..{self.stamp.max_batch}"
            )
        x = x.to(self._in_dtype).contiguous()
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        out = torch.empty(
            tuple(self.context.get_tensor_shape(self.output_name)), dtype=self._out_dtype, device=x.device
        )
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise ExportError("TensorRT execution failed", hint="see TensorRT's log; rebuild the engine")
        return out

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import torch

        array = np.ascontiguousarray(images, dtype=np.float32)
        if array.ndim != 4 or len(array) == 0:
            raise ExportError(f"TensorRTRunner needs a non-empty (N, C, H, W) batch, got shape {array.shape}")
        step, floor = self.stamp.max_batch, self.stamp.min_batch
        results: list[np.ndarray] = []
        stream = torch.cuda.current_stream()
        for start in range(0, len(array), step):
            chunk = torch.from_numpy(array[start : start + step])
            real = len(chunk)
            if real < floor:
                chunk = torch.cat([chunk, chunk.new_zeros((floor - real, *chunk.shape[1:]))])
            x = chunk.to("cuda", self._in_dtype).contiguous()
            self.context.set_input_shape(self.input_name, tuple(x.shape))
            out = torch.empty(
                tuple(self.context.get_tensor_shape(self.output_name)), dtype=self._out_dtype, device="cuda"
            )
            self.context.set_tensor_address(self.input_name, x.data_ptr())
            self.context.set_tensor_address(self.output_name, out.data_ptr())
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise ExportError("TensorRT execution failed", hint="see TensorRT's log; rebuild the engine")
            stream.synchronize()
            results.append(out[:real].float().cpu().numpy())
        return np.concatenate(results)
