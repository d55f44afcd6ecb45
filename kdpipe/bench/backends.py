"""Benchmark backends: one small class per runtime, registered in ``kdpipe.registry.BACKENDS``.

A backend turns one model artifact into a zero-argument callable on a prepared input. ``load`` runs once per
target (copying a module to the device, creating a session, deserialising an engine); ``cell`` prepares the input of
one batch size on the right device and yields the step that ``kdpipe.bench.measure`` times. What exactly one timed
step covers is the class's ``timed`` text, which the report writes beside the numbers.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from kdpipe.bench.target import BenchTarget
from kdpipe.errors import ConfigError
from kdpipe.exports.runtime import create_onnx_session
from kdpipe.registry import BACKENDS
from kdpipe.requirements import EXPORT_HINT, TENSORRT_HINT

logger = logging.getLogger(__name__)

Step = Callable[[], object]
_INPUT_SEED = 0  # inputs are random but identical across backends and runs
_PROBE_WARMUP, _PROBE_ITERATIONS = 2, 5  # calls per memory format when choosing between them
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def make_input(batch_size: int, input_shape: tuple[int, int, int]) -> torch.Tensor:
    """A float32 ``(batch, C, H, W)`` CPU tensor of seeded standard-normal values."""
    generator = torch.Generator().manual_seed(_INPUT_SEED)
    return torch.randn((batch_size, *input_shape), generator=generator, dtype=torch.float32)


def describe_device(device: torch.device) -> str:
    """``cpu`` or ``cuda:0 (NVIDIA H100 80GB HBM3)``: the device column of a report."""
    if device.type == "cuda":
        return f"cuda:{device.index or 0} ({torch.cuda.get_device_name(device)})"
    return "cpu"


class Backend:
    """Base class. Subclasses set ``name``, ``timed`` and ``needs`` and implement ``load``, ``cell``, ``version``."""

    name: ClassVar[str] = ""
    timed: ClassVar[str] = ""
    """What one timed call covers, for the report's method section."""
    needs: ClassVar[str] = "path"
    """"module": an ``nn.Module`` in ``BenchTarget.module``; "path": an artifact file in ``BenchTarget.path``."""
    consumes: ClassVar[tuple[str, ...]] = ()
    """The file suffixes a "path" backend runs (``.onnx``); the benchmark stage hands it every upstream export
    with one of them, and ``kdpipe bench`` offers it for such files. A "module" backend lists the checkpoint
    suffixes ``kdpipe bench`` can rebuild a module from."""
    needs_cuda: ClassVar[bool] = False
    """Runs on a GPU only (validation warns when the benchmark is on the CPU)."""

    def __init__(self, target: BenchTarget, device: torch.device, threads: int) -> None:
        self.target = target
        self.device = device
        self.threads = threads
        self.compile_s: float | None = None
        self.notes = ""

    @classmethod
    def check_target(cls, target: BenchTarget) -> None:
        """Raise ConfigError when ``target`` lacks what this backend runs (checked before anything is timed)."""
        if cls.needs == "module" and target.module is None:
            raise ConfigError(f"{target.label}: backend {cls.name!r} runs an nn.Module, but the target has none")
        if cls.needs == "path" and target.path is None:
            raise ConfigError(f"{target.label}: backend {cls.name!r} runs a model file, but the target has no path")

    @classmethod
    def check_available(cls) -> None:
        """Raise ConfigError with an install hint when the backend's library is missing."""

    @property
    def uses_cuda_events(self) -> bool:
        """True when steps are asynchronous torch CUDA work, timed with CUDA events."""
        return False

    @property
    def uses_torch_cuda_memory(self) -> bool:
        """True when the model's GPU memory goes through torch's allocator (so max_memory_allocated sees it)."""
        return False

    def version(self) -> str:
        raise NotImplementedError

    def device_label(self) -> str:
        return describe_device(self.device)

    def model_bytes(self) -> int | None:
        """Size of the artifact file; for a module without a file, the bytes of its parameters and buffers."""
        if self.target.path is not None:
            return Path(self.target.path).stat().st_size
        if self.target.module is not None:
            return sum(t.numel() * t.element_size() for t in self.target.module.state_dict().values())
        return None

    def load(self) -> None:
        raise NotImplementedError

    def cell(self, batch_size: int, input_shape: tuple[int, int, int]) -> contextlib.AbstractContextManager[Step]:
        """Prepare the input for ``batch_size`` and yield the step to time; undo per-cell settings on exit."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what ``load`` acquired."""


@BACKENDS.register("torch", summary="eager PyTorch nn.Module under inference_mode")
class TorchBackend(Backend):
    name = "torch"
    needs = "module"
    consumes = (".pt", ".pth", ".safetensors")
    timed = (
        "model(x) under torch.inference_mode on an input already on the device, in the memory format (contiguous "
        "or channels_last) that a short probe found faster for this cell; on CUDA timed with CUDA events"
    )

    def __init__(self, target: BenchTarget, device: torch.device, threads: int) -> None:
        super().__init__(target, device, threads)
        self.model: nn.Module | None = None

    @property
    def uses_cuda_events(self) -> bool:
        return self.device.type == "cuda"

    @property
    def uses_torch_cuda_memory(self) -> bool:
        return self.device.type == "cuda"

    def version(self) -> str:
        return f"torch {torch.__version__}"

    def load(self) -> None:
        assert self.target.module is not None  # check_target ran
        # A copy: moving to the device or to channels_last must not change the caller's module.
        self.model = _to(copy.deepcopy(self.target.module).eval(), self.device)

    def close(self) -> None:
        self.model = None

    @contextlib.contextmanager
    def cell(self, batch_size: int, input_shape: tuple[int, int, int]) -> Iterator[Step]:
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            x = make_input(batch_size, input_shape).to(self.device)
            # inference_mode is thread-local state: it stays on while the caller times the yielded step.
            with torch.inference_mode():
                x = self._choose_memory_format(x)
                yield self._step(x)
        finally:
            torch.set_num_threads(previous)

    def _step(self, x: torch.Tensor) -> Step:
        model = self.model
        assert model is not None
        return lambda: model(x)

    def _choose_memory_format(self, x: torch.Tensor) -> torch.Tensor:
        # channels_last speeds convolutions up on some devices and slows them down on others: measure both.
        assert self.model is not None
        fastest = {}
        for fmt in (torch.contiguous_format, torch.channels_last):
            _to(self.model, memory_format=fmt)
            candidate = x.contiguous(memory_format=fmt)
            fastest[fmt] = _probe(functools.partial(self.model, candidate), self.device)
        best = min(fastest, key=lambda f: fastest[f])
        _to(self.model, memory_format=best)
        label = {torch.contiguous_format: "contiguous", torch.channels_last: "channels_last"}
        probes = ", ".join(f"{label[f]} {ms:.3f} ms" for f, ms in fastest.items())
        self.notes = f"memory_format={label[best]} (probe, fastest call: {probes})"
        return x.contiguous(memory_format=best)


def _to(module: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
    # Module.to on a TorchScript module reads .grad of its (non-leaf) parameters and torch warns about it; the warning
    # is about a gradient nobody uses here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
        return module.to(*args, **kwargs)


def _probe(step: Step, device: torch.device) -> float:
    """Fastest of a few synchronised calls in ms: enough to rank two memory formats, not a measurement. The minimum,
    not the median: on a busy machine interference only ever adds time, so the fastest call is the cleanest."""
    for _ in range(_PROBE_WARMUP):
        step()
    best = float("inf")
    for _ in range(_PROBE_ITERATIONS):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - t0) * 1000)
    return best


@BACKENDS.register("torch-compile", summary="torch.compile'd nn.Module; compile time recorded separately")
class TorchCompileBackend(TorchBackend):
    name = "torch-compile"
    timed = (
        "the torch.compile'd model(x) under torch.inference_mode, as for torch; compilation is reset per cell and "
        "the first call at each batch size (tracing and compiling) is excluded and recorded as compile_s; the "
        "memory format is the one an eager probe found faster"
    )

    def __init__(self, target: BenchTarget, device: torch.device, threads: int) -> None:
        super().__init__(target, device, threads)
        self.compiled: Callable[..., Any] | None = None

    def load(self) -> None:
        super().load()
        # Specialise on every shape: the fastest kernels per batch size, which is what a deployment would build.
        self.compiled = torch.compile(self.model, dynamic=False)

    def close(self) -> None:
        self.compiled = None
        super().close()
        torch.compiler.reset()

    def _step(self, x: torch.Tensor) -> Step:
        compiled = self.compiled
        assert compiled is not None
        # Forget earlier cells' graphs so this cell's compile time is its own and no recompile limit is reached
        # (past the limit torch.compile silently falls back to eager, which would be reported as compiled).
        torch.compiler.reset()
        t0 = time.perf_counter()
        compiled(x)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.compile_s = time.perf_counter() - t0
        return lambda: compiled(x)


@BACKENDS.register("onnxruntime", summary="ONNX model in an onnxruntime InferenceSession (CUDA EP or CPU EP)")
class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    consumes = (".onnx",)
    timed = (
        "CPU execution provider: session.run(None, {input: x}) with x a prepared numpy array, including the copy of "
        "the outputs into new numpy arrays. CUDA execution provider: session.run_with_iobinding with the input "
        "already in GPU memory and outputs bound to the GPU (no host copies), timed with perf_counter_ns because "
        "the call returns after synchronising its stream"
    )

    def __init__(self, target: BenchTarget, device: torch.device, threads: int) -> None:
        super().__init__(target, device, threads)
        self.session: Any = None
        self.provider = ""

    @classmethod
    def check_available(cls) -> None:
        if importlib.util.find_spec("onnxruntime") is None:
            raise ConfigError("the onnxruntime backend needs onnxruntime", hint=EXPORT_HINT)

    def version(self) -> str:
        import onnxruntime as ort

        return f"onnxruntime {ort.__version__}"

    def device_label(self) -> str:
        return describe_device(self.device) if self.provider == "CUDAExecutionProvider" else "cpu"

    def load(self) -> None:
        self.check_available()
        import onnxruntime as ort

        path = Path(self.target.path)  # type: ignore[arg-type]  # check_target ran
        if not path.is_file():
            raise ConfigError(f"ONNX file {path} does not exist")
        providers: list[Any] = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": self.device.index or 0}))
            else:
                self.notes = "CUDAExecutionProvider unavailable (onnxruntime-gpu not installed): ran on CPU"
                logger.warning("onnxruntime has no CUDA execution provider; %s runs on CPU", path.name)
        # the same session settings as export parity checks: all graph optimisations, one inter-op thread
        self.session = create_onnx_session(path, providers=providers, threads=self.threads)
        self.provider = self.session.get_providers()[0]
        self.notes = self.notes or f"provider={self.provider}"

    def close(self) -> None:
        self.session = None

    @contextlib.contextmanager
    def cell(self, batch_size: int, input_shape: tuple[int, int, int]) -> Iterator[Step]:
        session = self.session
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise ConfigError(f"the ONNX model takes {len(inputs)} inputs; the benchmark feeds one image batch")
        graph_input = inputs[0]
        _check_static_dims(graph_input.shape, batch_size, input_shape, graph_input.name)
        dtype = _ORT_DTYPES.get(graph_input.type)
        if dtype is None:
            raise ConfigError(f"input {graph_input.name!r} has type {graph_input.type}; expected a float tensor")
        x = make_input(batch_size, input_shape).numpy().astype(dtype)
        if self.provider != "CUDAExecutionProvider":
            feeds = {graph_input.name: x}
            yield lambda: session.run(None, feeds)
            return
        import onnxruntime as ort

        index = self.device.index or 0
        binding = session.io_binding()
        binding.bind_ortvalue_input(graph_input.name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", index))
        for output in session.get_outputs():
            binding.bind_output(output.name, "cuda", index)

        def step() -> None:
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()

        yield step


def _check_static_dims(shape: list[Any], batch_size: int, input_shape: tuple[int, int, int], name: str) -> None:
    # A clear message instead of onnxruntime's "Got invalid dimensions for input" from deep inside run().
    if len(shape) != 4:
        raise ConfigError(f"input {name!r} has shape {shape}; expected (batch, C, H, W)")
    if isinstance(shape[0], int) and shape[0] > 0 and shape[0] != batch_size:
        raise ConfigError(
            f"the ONNX input {name!r} has a static batch of {shape[0]}; cannot run batch {batch_size}",
            hint="export it with a dynamic batch axis",
        )
    for axis, (dim, want) in enumerate(zip(shape[1:], input_shape, strict=True), start=1):
        if isinstance(dim, int) and dim > 0 and dim != want:
            raise ConfigError(f"the ONNX input {name!r} has size {dim} on axis {axis}; the benchmark asked for {want}")


@BACKENDS.register("tensorrt", summary="serialized TensorRT engine (.plan) through kdpipe.exports.tensorrt")
class TensorRTBackend(Backend):
    name = "tensorrt"
    consumes = (".plan", ".engine")
    needs_cuda = True
    timed = (
        "the engine's execution on the GPU (kdpipe.exports.tensorrt's TensorRTRunner.run_device on a device-resident "
        "input, enqueued on torch's current stream), timed with CUDA events; a batch outside the engine's profile "
        "is run through the host-to-host runner (chunked or padded, copies included) and timed with perf_counter"
    )

    def __init__(self, target: BenchTarget, device: torch.device, threads: int) -> None:
        super().__init__(target, device, threads)
        self.runner: Callable[[np.ndarray], np.ndarray] | None = None
        self._device_step = False

    @classmethod
    def check_available(cls) -> None:
        if importlib.util.find_spec("tensorrt") is None:
            raise ConfigError(
                "the tensorrt backend needs the tensorrt package, which is not installed",
                hint=TENSORRT_HINT,
            )

    def version(self) -> str:
        if importlib.util.find_spec("tensorrt") is None:
            return "tensorrt (not installed)"
        import tensorrt

        return f"tensorrt {tensorrt.__version__}"

    def load(self) -> None:
        self.check_available()
        if self.device.type != "cuda":
            raise ConfigError("the tensorrt backend needs a CUDA device", hint="run with device cuda, or drop tensorrt")
        # Imported here: the module imports tensorrt, which only exists on GPU machines.
        from kdpipe.exports.tensorrt import load_engine

        path = Path(self.target.path)  # type: ignore[arg-type]  # check_target ran
        if not path.is_file():
            raise ConfigError(f"TensorRT engine {path} does not exist")
        self.runner = load_engine(path)

    def close(self) -> None:
        self.runner = None

    @contextlib.contextmanager
    def cell(self, batch_size: int, input_shape: tuple[int, int, int]) -> Iterator[Step]:
        runner = self.runner
        assert runner is not None
        # The runner feeds batches outside the engine's optimisation profile in chunks (above max_batch) or padded
        # (below min_batch): such a cell times that, and says so.
        stamp = getattr(runner, "stamp", None)
        if stamp is not None:
            self.notes = f"precision={stamp.precision}, profile batch {stamp.min_batch}..{stamp.max_batch}"
            if batch_size > stamp.max_batch:
                self.notes += f"; run as {-(-batch_size // stamp.max_batch)} chunks of at most {stamp.max_batch}"
            elif batch_size < stamp.min_batch:
                self.notes += f"; padded to {stamp.min_batch}"
        self._device_step = stamp is None or stamp.min_batch <= batch_size <= stamp.max_batch
        if self._device_step:
            resident = make_input(batch_size, input_shape).to(self.device)
            yield lambda: runner.run_device(resident)  # type: ignore[attr-defined]
        else:
            x = np.ascontiguousarray(make_input(batch_size, input_shape).numpy())
            yield lambda: runner(x)

    @property
    def uses_cuda_events(self) -> bool:
        return self._device_step
