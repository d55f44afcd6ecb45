"""Benchmark reports: bench.json round-trips, bench.md has one row per cell, bench.png is a PNG."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from kdpipe.bench.measure import BenchCell
from kdpipe.bench.report import (
    FILES,
    format_bytes,
    markdown_table,
    read_report,
    render_plot,
    write_report,
)
from kdpipe.environment import describe_environment
from kdpipe.errors import DataError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def cell(model: str, backend: str, batch: int, p50: float | None = 1.0, error: str | None = None) -> BenchCell:
    ok = error is None
    return BenchCell(
        model=model,
        backend=backend,
        batch_size=batch,
        p50_ms=p50 if ok else None,
        p90_ms=p50 * 1.1 if ok and p50 else None,
        p99_ms=p50 * 1.5 if ok and p50 else None,
        mean_ms=p50 * 1.05 if ok and p50 else None,
        std_ms=0.01 if ok else None,
        throughput=batch * 1000 / (p50 * 1.05) if ok and p50 else None,
        iterations=30 if ok else 0,
        warmup=10,
        model_bytes=313_310,
        peak_memory_bytes=800 << 20 if ok else None,
        threads=2,
        device="cpu",
        version="onnxruntime 1.31.1" if backend == "onnxruntime" else "torch 2.14.1",
        error=error,
        timer="perf_counter_ns",
        memory_scope="process-rss-cell" if ok else "",
    )


CELLS = [
    cell("student", "torch", 1, 0.6),
    cell("student", "torch", 8, 2.0),
    cell("student", "onnxruntime", 1, 0.1),
    cell("student", "onnxruntime", 8, 0.5),
    cell("static.onnx", "onnxruntime", 8, error="static batch of 1 | cannot run batch 8\nsecond line"),
]


def test_write_report_writes_three_files_that_read_back(tmp_path: Path) -> None:
    env = describe_environment("cpu")
    paths = write_report(tmp_path / "bench", CELLS, env)
    assert {k: p.name for k, p in paths.items()} == FILES
    cells, environment = read_report(paths["json"])
    assert [dataclasses.asdict(c) for c in cells] == [dataclasses.asdict(c) for c in CELLS]
    assert environment == json.loads(json.dumps(env))
    data = json.loads(paths["json"].read_text())
    assert data["schema"] == 1
    assert set(data["method"]["timed_per_backend"]) == {"torch", "onnxruntime"}
    assert "process-rss-cell" in data["method"]["peak_memory"]
    assert "warm" in data["method"]["summary"] and "percentile" in data["method"]["summary"]
    assert paths["plot"].read_bytes().startswith(PNG_SIGNATURE)
    assert not list(tmp_path.glob("bench/.*"))  # no temp files left behind


def test_markdown_table_has_a_row_per_cell_and_escapes_errors() -> None:
    table = markdown_table(CELLS)
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(CELLS)
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    assert header == [
        "model",
        "backend",
        "batch",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "mean ± std ms",
        "img/s",
        "size",
        "peak mem",
        "error",
    ]
    assert (
        "| student | torch | 1 | 0.600 | 0.660 | 0.900 | 0.630 ± 0.010 | 1,587.3 | 306.0 KiB | 800.0 MiB |  |" in lines
    )
    error_row = lines[-1]
    assert "static batch of 1 \\| cannot run batch 8 second line" in error_row
    assert error_row.count(" | ") == len(header) - 1  # the escaped pipe did not add a column


def test_markdown_document_states_the_method(tmp_path: Path) -> None:
    text = write_report(tmp_path, CELLS, {"date": "2026-01-01", "cpu_count": 2, "torch": "2.14"})[
        "markdown"
    ].read_text()
    assert text.startswith("# Benchmark\n") and "## Method" in text
    assert "- `onnxruntime`:" in text and "- `torch`:" in text
    assert markdown_table(CELLS).strip() in text


def test_plot_without_successful_cells_is_still_a_png() -> None:
    assert render_plot([cell("m", "torch", 1, error="boom")]).startswith(PNG_SIGNATURE)
    assert render_plot([]).startswith(PNG_SIGNATURE)


def test_format_bytes() -> None:
    assert format_bytes(None) == "–"
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 << 30) == "3.0 GiB"


def test_read_report_rejects_other_files(tmp_path: Path) -> None:
    bad = tmp_path / "bench.json"
    bad.write_text('{"no": "cells"}')
    with pytest.raises(DataError, match="not a readable kdpipe benchmark report"):
        read_report(bad)
