"""How one part runs: the function of each part, and ``run_part``, which times it, keeps the parts after it running
whatever it does (ok, failed with the error, skipped with the reason), and skips it when it was not selected, when an
earlier part made the run impossible (kdpipe does not import) or when the time budget is spent."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable

from .context import Acceptance
from .core import ALWAYS_RUN, PARTS, TAIL_CHARS, TITLES, PartRecord, PartSkipped, describe_error
from .environment import part_environment, part_wheels
from .exports import part_onnxruntime_cuda, part_tensorrt
from .suite import part_gpu_tests
from .torchrun import part_torchrun
from .training import part_methods, part_throughput

PART_FUNCTIONS: dict[str, Callable[[Acceptance, PartRecord], None]] = {
    "wheels": part_wheels,
    "environment": part_environment,
    "methods": part_methods,
    "throughput": part_throughput,
    "torchrun": part_torchrun,
    "onnxruntime_cuda": part_onnxruntime_cuda,
    "tensorrt": part_tensorrt,
    "gpu_tests": part_gpu_tests,
}
assert tuple(PART_FUNCTIONS) == PARTS  # one function per part, in the run's order
MIN_PART_S = 15
"""Seconds of the budget a part needs left to start."""


def run_part(acc: Acceptance, name: str) -> PartRecord:
    """Run part ``name`` and return its record (also kept in ``acc.records``)."""
    rec = PartRecord(name)
    acc.records[name] = rec
    selected = acc.args.parts
    if selected and name not in selected and name not in ALWAYS_RUN:
        rec.status, rec.reason = "skipped", "not selected (--parts)"
        return rec
    if acc.fatal is not None:
        rec.status, rec.reason = "skipped", acc.fatal
        return rec
    if acc.remaining() < MIN_PART_S:
        rec.status, rec.reason = "skipped", f"time budget: {acc.args.budget_s:.0f} s spent"
        return rec
    print(f"[{time.perf_counter() - acc.started:6.1f} s] {TITLES[name]}", flush=True)
    t0 = time.perf_counter()
    try:
        PART_FUNCTIONS[name](acc, rec)
        rec.status = "ok"
    except PartSkipped as exc:
        rec.status, rec.reason = "skipped", str(exc)
    except Exception as exc:
        rec.status, rec.error, rec.traceback = "failed", describe_error(exc), traceback.format_exc()[-TAIL_CHARS:]
    rec.seconds = round(time.perf_counter() - t0, 2)
    line = rec.reason or rec.error or rec.summary
    print(f"    -> {rec.status} in {rec.seconds:.1f} s: {line.splitlines()[0] if line else ''}", flush=True)
    return rec
