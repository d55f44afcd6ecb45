"""The timing core: run every (target, batch size) cell with warm-up, timed iterations and percentiles.

What one cell does, in order:
1. the backend prepares the input for this batch size once, on the device that runs the model (so a GPU cell never
   times a host-to-device copy of its input unless the backend's own API forces it; each backend says what it times
   in ``Backend.timed``);
2. peak-memory tracking is reset, then ``warmup`` untimed calls run (caches, allocator pools, lazy initialisation);
3. timed calls run until both ``min_iterations`` and ``min_time_s`` are reached, at most ``max_iterations``. Each
   call is timed on its own: with CUDA events recorded around it and synchronised after it for torch on CUDA,
   with ``time.perf_counter_ns`` otherwise (CPU work and the synchronous onnxruntime/TensorRT calls);
4. latency percentiles (linear interpolation), mean, sample std and throughput (batch / mean latency) are computed.

A cell that raises becomes a row with ``error`` set; the other cells still run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kdpipe.bench.backends import Backend
from kdpipe.bench.memory import PeakMemory
from kdpipe.bench.target import BenchTarget
from kdpipe.environment import resolve_device
from kdpipe.errors import ConfigError, KdpipeError
from kdpipe.progress import NullProgress, Progress
from kdpipe.registry import BACKENDS

logger = logging.getLogger(__name__)

_MAX_ERROR_CHARS = 300  # an error row is one table cell; the full traceback goes to the debug log


@dataclass
class BenchCell:
    """The result of one (model, backend, batch size) cell. Latencies are in milliseconds, throughput in images/s.

    On a failed cell the timing fields are None and ``error`` says what went wrong.
    """

    model: str
    backend: str
    batch_size: int
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    std_ms: float | None
    throughput: float | None
    iterations: int
    warmup: int
    model_bytes: int | None
    peak_memory_bytes: int | None
    threads: int | None
    device: str
    version: str
    error: str | None = None
    load_s: float | None = None
    """Seconds to load the artifact (module copy, session or engine creation); not part of any latency."""
    compile_s: float | None = None
    """torch-compile only: seconds of the first call at this batch size (tracing and compilation)."""
    timer: str = ""
    """"cuda-events" or "perf_counter_ns": how each timed call was measured."""
    memory_scope: str = ""
    """What ``peak_memory_bytes`` covers: one of ``MEMORY_SCOPES``."""
    notes: str = ""
    """Choices the backend made for this cell (memory format, execution provider)."""

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchCell:
        """Rebuild a cell from its ``dataclasses.asdict`` form (as stored in bench.json); unknown keys are ignored."""
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in fields})


def summarize(latencies_ms: list[float], batch_size: int) -> dict[str, float]:
    """Percentiles (linear interpolation), mean, sample std of ``latencies_ms`` and throughput in images/s."""
    if not latencies_ms:
        raise ValueError("no timed iterations to summarize")
    values = np.asarray(latencies_ms, dtype=np.float64)
    p50, p90, p99 = (float(v) for v in np.percentile(values, [50, 90, 99]))
    mean = float(values.mean())
    return {
        "p50_ms": p50,
        "p90_ms": p90,
        "p99_ms": p99,
        "mean_ms": mean,
        "std_ms": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
        "throughput": batch_size * 1000.0 / mean if mean > 0 else float("inf"),
    }


def time_iterations(
    step: Callable[[], object],
    *,
    warmup: int,
    min_iterations: int,
    min_time_s: float,
    max_iterations: int,
    cuda_device: torch.device | None = None,
) -> list[float]:
    """Call ``step`` ``warmup`` times untimed, then time calls one by one; return their latencies in ms.

    Timing stops once at least ``min_iterations`` calls ran and ``min_time_s`` seconds of wall time passed, or at
    ``max_iterations``. With ``cuda_device`` each call is bracketed by CUDA events on the current stream and the end
    event is synchronised before the next call, so a latency is submit-to-done of one call, not a pipelined average.
    """
    for _ in range(warmup):
        step()
    if cuda_device is not None:
        torch.cuda.synchronize(cuda_device)
    budget_ns = int(min_time_s * 1e9)
    latencies: list[float] = []
    started = time.perf_counter_ns()

    def more() -> bool:
        if len(latencies) >= max_iterations:
            return False
        return len(latencies) < min_iterations or time.perf_counter_ns() - started < budget_ns

    if cuda_device is not None:
        with torch.cuda.device(cuda_device):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            while more():
                start.record()
                step()
                end.record()
                end.synchronize()
                latencies.append(float(start.elapsed_time(end)))
    else:
        while more():
            t0 = time.perf_counter_ns()
            step()
            latencies.append((time.perf_counter_ns() - t0) / 1e6)
    return latencies


def run_benchmark(
    targets: list[BenchTarget],
    batch_sizes: list[int],
    input_shape: tuple[int, int, int],
    *,
    warmup: int = 10,
    min_iterations: int = 30,
    min_time_s: float = 1.0,
    max_iterations: int = 10_000,
    threads: int | None = None,
    device: str = "auto",
    progress: Progress | None = None,
) -> list[BenchCell]:
    """Benchmark every target at every batch size and return one cell per pair, in target-then-batch order.

    Args:
        targets: models with their backend (``kdpipe.registry.BACKENDS``: torch, torch-compile, onnxruntime, tensorrt).
        batch_sizes: images per call.
        input_shape: ``(C, H, W)`` of one image; inputs are random normal floats (these models have no
            data-dependent control flow, so values do not change the latency).
        warmup: untimed calls per cell before timing.
        min_iterations, min_time_s, max_iterations: timed calls continue until both minimums are reached, at most
            ``max_iterations``.
        threads: CPU threads for every backend (torch intra-op threads, onnxruntime ``intra_op_num_threads``); None
            uses torch's current setting, so all backends get the same number.
        device: "auto", "cpu", "cuda" or "cuda:N".
        progress: advanced once per cell.

    Raises:
        ConfigError: invalid settings or an unknown backend name (nothing is run). Failures of one cell (a file that
            cannot be loaded, a batch size a static graph refuses, out of memory) are returned as error rows.
    """
    _validate(targets, batch_sizes, input_shape, warmup, min_iterations, min_time_s, max_iterations, threads)
    dev = resolve_device(device)
    c, h, w = (int(d) for d in input_shape)
    n_threads = threads if threads is not None else torch.get_num_threads()
    settings = {
        "warmup": warmup,
        "min_iterations": min_iterations,
        "min_time_s": min_time_s,
        "max_iterations": max_iterations,
    }
    task = (progress or NullProgress()).task("benchmark", total=len(targets) * len(batch_sizes))
    cells: list[BenchCell] = []
    try:
        for target in targets:
            backend: Backend = BACKENDS.get(target.backend)(target, dev, n_threads)
            cells.extend(_run_target(backend, batch_sizes, (c, h, w), settings, task.advance))
    finally:
        task.close()
    return cells


def _validate(
    targets: list[BenchTarget],
    batch_sizes: list[int],
    input_shape: tuple[int, int, int],
    warmup: int,
    min_iterations: int,
    min_time_s: float,
    max_iterations: int,
    threads: int | None,
) -> None:
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ConfigError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if len(input_shape) != 3 or any(int(d) < 1 for d in input_shape):
        raise ConfigError(f"input_shape must be (C, H, W) with positive sizes, got {tuple(input_shape)}")
    if warmup < 0 or min_iterations < 1 or min_time_s < 0:
        raise ConfigError(
            f"need warmup >= 0, min_iterations >= 1, min_time_s >= 0; got {warmup}, {min_iterations}, {min_time_s}"
        )
    if max_iterations < min_iterations:
        raise ConfigError(f"max_iterations ({max_iterations}) is below min_iterations ({min_iterations})")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be at least 1, got {threads}")
    for target in targets:
        BACKENDS.get(target.backend).check_target(target)


def _run_target(
    backend: Backend,
    batch_sizes: list[int],
    input_shape: tuple[int, int, int],
    settings: dict[str, Any],
    advance: Callable[[], None],
) -> list[BenchCell]:
    t0 = time.perf_counter()
    try:
        backend.load()
    except Exception as exc:  # any load failure is this target's problem, reported in its rows
        message = _describe(exc)
        logger.warning("%s on %s: cannot load: %s", backend.target.label, backend.name, message)
        logger.debug("load failure", exc_info=True)
        rows = []
        for batch in batch_sizes:
            rows.append(_cell(backend, int(batch), settings, error=message))
            advance()
        return rows
    load_s = time.perf_counter() - t0
    rows = []
    try:
        for batch in batch_sizes:
            rows.append(_run_cell(backend, int(batch), input_shape, settings, load_s))
            advance()
    finally:
        backend.close()
    return rows


def _run_cell(
    backend: Backend, batch: int, input_shape: tuple[int, int, int], settings: dict[str, Any], load_s: float
) -> BenchCell:
    backend.compile_s = None  # set again by a torch-compile cell; never carried over from the previous one
    tracker = PeakMemory(backend.device if backend.uses_torch_cuda_memory else None, backend.device)
    try:
        with backend.cell(batch, input_shape) as step:
            tracker.reset()
            latencies = time_iterations(
                step,
                warmup=settings["warmup"],
                min_iterations=settings["min_iterations"],
                min_time_s=settings["min_time_s"],
                max_iterations=settings["max_iterations"],
                cuda_device=backend.device if backend.uses_cuda_events else None,
            )
            peak = tracker.peak()
    except Exception as exc:  # one failing cell (OOM, a static batch dimension) must not stop the others
        message = _describe(exc)
        logger.warning("%s on %s at batch %d failed: %s", backend.target.label, backend.name, batch, message)
        logger.debug("cell failure", exc_info=True)
        if backend.device.type == "cuda":
            torch.cuda.empty_cache()  # give an out-of-memory cell's cached blocks back before the next cell
        return _cell(backend, batch, settings, error=message, load_s=load_s)
    stats = summarize(latencies, batch)
    logger.info(
        "%s on %s, batch %d: p50 %.3f ms, %.1f img/s (%d iterations)",
        backend.target.label,
        backend.name,
        batch,
        stats["p50_ms"],
        stats["throughput"],
        len(latencies),
    )
    return _cell(
        backend,
        batch,
        settings,
        **stats,
        iterations=len(latencies),
        peak_memory_bytes=peak,
        memory_scope=tracker.scope,
        load_s=load_s,
    )


def _cell(backend: Backend, batch: int, settings: dict[str, Any], **values: Any) -> BenchCell:
    base: dict[str, Any] = {
        "model": backend.target.label,
        "backend": backend.name,
        "batch_size": batch,
        "p50_ms": None,
        "p90_ms": None,
        "p99_ms": None,
        "mean_ms": None,
        "std_ms": None,
        "throughput": None,
        "iterations": 0,
        "warmup": settings["warmup"],
        "model_bytes": _safe(backend.model_bytes),
        "peak_memory_bytes": None,
        "threads": backend.threads,
        "device": _safe(backend.device_label) or str(backend.device),
        "version": _safe(backend.version) or backend.name,
        "compile_s": backend.compile_s,
        "timer": "cuda-events" if backend.uses_cuda_events else "perf_counter_ns",
        "notes": backend.notes,
    }
    base.update(values)
    return BenchCell(**base)


def _safe(fn: Callable[[], Any]) -> Any:
    # Descriptive fields of an error row must never raise themselves (e.g. the size of a missing file).
    try:
        return fn()
    except Exception:
        return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KdpipeError):
        text = exc.message
    else:
        first = (str(exc).strip().splitlines() or [""])[0]
        text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."
