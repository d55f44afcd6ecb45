"""Honest latency and throughput per backend and batch size, with JSON, Markdown and PNG reports.

``run_benchmark(targets, batch_sizes, input_shape)`` measures ``BenchTarget``s (a model and a backend registered in
``kdpipe.registry.BACKENDS``) and returns ``BenchCell``s; ``write_report`` writes them out; ``benchmark_file``
measures one stand-alone model file (``kdpipe bench MODEL``, see ``standalone.bench_command``).
"""

from __future__ import annotations

from kdpipe.bench import backends as backends  # registers torch, torch-compile, onnxruntime, tensorrt
from kdpipe.bench.measure import BenchCell, run_benchmark, summarize
from kdpipe.bench.memory import MEMORY_SCOPES
from kdpipe.bench.report import markdown_table, read_report, write_report
from kdpipe.bench.standalone import benchmark_file
from kdpipe.bench.target import BenchTarget
from kdpipe.environment import describe_environment, resolve_device

__all__ = [
    "MEMORY_SCOPES",
    "BenchCell",
    "BenchTarget",
    "benchmark_file",
    "describe_environment",
    "markdown_table",
    "read_report",
    "resolve_device",
    "run_benchmark",
    "summarize",
    "write_report",
]
