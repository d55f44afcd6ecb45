"""Benchmark reports: ``bench.json`` (cells, environment, method), ``bench.md`` (a Markdown table) and ``bench.png``
(p50 latency against batch size, one line per model and backend, log-log).

Every file is written atomically through ``kdpipe.fileio``. ``markdown_table`` is reused by the model card.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from pathlib import Path
from typing import Any

from kdpipe.bench.measure import BenchCell
from kdpipe.bench.memory import MEMORY_SCOPES
from kdpipe.errors import DataError
from kdpipe.fileio import atomic_write_json, atomic_write_text, atomic_write_with
from kdpipe.markdown import table
from kdpipe.registry import BACKENDS

logger = logging.getLogger(__name__)

FILES = {"json": "bench.json", "markdown": "bench.md", "plot": "bench.png"}
SCHEMA_VERSION = 1

METHOD = (
    "Per cell (model x backend x batch size): the input is prepared once on the device that runs the model "
    "(random normal values; these networks have no data-dependent control flow), the backend runs `warmup` untimed "
    "calls, then timed calls until both the minimum number of iterations and the minimum wall time are reached "
    "(capped by a maximum). Each call is timed on its own: CUDA events recorded around it and synchronised after "
    "it for torch on a GPU, time.perf_counter_ns otherwise (CPU work and synchronous onnxruntime/TensorRT calls). "
    "Latency is submit-to-result of one call in milliseconds; p50/p90/p99 are percentiles with linear "
    "interpolation, std is the sample standard deviation, throughput is batch size / mean latency in images/s. "
    "Model loading, session/engine creation and torch.compile's first call are excluded (load_s, compile_s). "
    "All CPU backends use the same thread count (torch.set_num_threads for the cell, onnxruntime "
    "intra_op_num_threads, inter-op 1). A cell that fails (load error, unsupported batch size, out of memory) is "
    "reported with its error and does not stop the others."
)


def method_description(cells: list[BenchCell]) -> dict[str, Any]:
    """The method text, what one timed call covers for each backend used, and what the memory column means."""
    used = sorted({c.backend for c in cells})
    scopes = sorted({c.memory_scope for c in cells if c.memory_scope})
    return {
        "summary": METHOD,
        "timed_per_backend": {b: BACKENDS.get(b).timed for b in used if b in BACKENDS},
        "peak_memory": {s: MEMORY_SCOPES.get(s, s) for s in scopes},
    }


def write_report(out_dir: Path, cells: list[BenchCell], environment: dict[str, Any]) -> dict[str, Path]:
    """Write bench.json, bench.md and bench.png into ``out_dir`` and return their paths by kind.

    bench.json holds ``{"schema": 1, "cells": [...], "environment": {...}, "method": {...}}`` and reads back with
    ``read_report``.
    """
    out_dir = Path(out_dir)
    paths = {kind: out_dir / name for kind, name in FILES.items()}
    method = method_description(cells)
    atomic_write_json(
        paths["json"],
        {
            "schema": SCHEMA_VERSION,
            "cells": [dataclasses.asdict(c) for c in cells],
            "environment": environment,
            "method": method,
        },
    )
    atomic_write_text(paths["markdown"], _markdown_document(cells, environment, method))
    png = render_plot(cells)
    atomic_write_with(paths["plot"], lambda tmp: _write_bytes(tmp, png))
    logger.info("benchmark report written to %s", out_dir)
    return paths


def read_report(path: Path) -> tuple[list[BenchCell], dict[str, Any]]:
    """Read a bench.json back into cells and its environment."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        cells = [BenchCell.from_dict(c) for c in data["cells"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path} is not a readable kdpipe benchmark report ({type(e).__name__}: {e})") from e
    return cells, dict(data.get("environment", {}))


def markdown_table(cells: list[BenchCell]) -> str:
    """A GitHub Markdown table, one row per cell; failed cells show their error and dashes elsewhere."""
    header = ["model", "backend", "batch", "p50 ms", "p90 ms", "p99 ms", "mean ± std ms", "img/s", "size", "peak mem"]
    rows = [
        [
            c.model,
            c.backend,
            str(c.batch_size),
            _ms(c.p50_ms),
            _ms(c.p90_ms),
            _ms(c.p99_ms),
            "–" if c.mean_ms is None else f"{c.mean_ms:.3f} ± {c.std_ms or 0.0:.3f}",
            "–" if c.throughput is None else f"{c.throughput:,.1f}",
            format_bytes(c.model_bytes),
            format_bytes(c.peak_memory_bytes),
            c.error or "",
        ]
        for c in cells
    ]
    return table([*header, "error"], rows, right=range(2, len(header))) + "\n"


def format_bytes(n: int | None) -> str:
    """1536 -> '1.5 KiB'; None -> '–'."""
    if n is None:
        return "–"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def render_plot(cells: list[BenchCell]) -> bytes:
    """PNG bytes of p50 latency vs batch size, one line per (model, backend), log-log; error cells are omitted."""
    # Figure + Agg canvas directly, not pyplot: no global backend switch, no figure registry, safe in threads.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for c in cells:
        if c.ok and c.p50_ms is not None:
            series.setdefault((c.model, c.backend), []).append((c.batch_size, c.p50_ms))
    fig = Figure(figsize=(7.0, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for (model, backend), points in sorted(series.items()):
        points.sort()
        ax.plot([b for b, _ in points], [ms for _, ms in points], marker="o", label=f"{model} / {backend}")
    if series:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no successful cells", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("batch size")
    ax.set_ylabel("p50 latency (ms)")
    ax.set_title("latency vs batch size")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _markdown_document(cells: list[BenchCell], environment: dict[str, Any], method: dict[str, Any]) -> str:
    devices = sorted({c.device for c in cells})
    threads = sorted({c.threads for c in cells if c.threads is not None})
    lines = [
        "# Benchmark",
        "",
        f"Measured {environment.get('date', '')} on {', '.join(devices) or 'no device'}"
        f" ({environment.get('cpu_count', '?')} CPUs, threads {', '.join(map(str, threads)) or '–'});"
        f" torch {environment.get('torch', '?')}, onnxruntime {environment.get('onnxruntime') or '–'}.",
        "",
        markdown_table(cells).rstrip("\n"),
        "",
        "## Method",
        "",
        method["summary"],
        "",
    ]
    for backend, timed in method["timed_per_backend"].items():
        lines.append(f"- `{backend}`: {timed}.")
    for scope, text in method["peak_memory"].items():
        lines.append(f"- peak memory ({scope}): {text}.")
    return "\n".join(lines).rstrip("\n") + "\n"


def _write_bytes(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"
