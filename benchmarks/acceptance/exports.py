"""Parts 6 and 7: the exported student on onnxruntime's CUDA provider, and TensorRT engines (fp16, int8 QDQ, and a
qad stage's QDQ graph), each parity-checked against PyTorch on real test images with the gates kdpipe's export stage
would apply, and benchmarked. Where CUDA, the provider or tensorrt is missing, the same code runs as a CPU stand-in
and the part is skipped with the reason."""

from __future__ import annotations

import importlib
import json
import re
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .context import Acceptance
from .core import NEEDS_CUDA, TAIL_CHARS, OutOfTime, PartRecord, PartSkipped, describe_error

if TYPE_CHECKING:
    import numpy as np
    from torch import nn


def default_gates(fmt: str, precision: str | None = None) -> dict[str, float | None]:
    """The parity gates kdpipe's export stage applies to format ``fmt`` by default (``parity_defaults`` of the
    registered format: for tensorrt, those of an engine of ``precision``, onnx-int8's for int8)."""
    from kdpipe.exports.formats import get_format
    from kdpipe.stages.export import ExportConfig

    block: dict[str, Any] = {"type": "export", "format": fmt}
    if precision is not None:
        block["tensorrt"] = {"precision": precision}
    return get_format(fmt).parity_defaults(ExportConfig.model_validate(block))


def _parity(
    model: nn.Module,
    runner: Callable[[np.ndarray], np.ndarray],
    acc: Acceptance,
    fmt: str,
    precision: str | None = None,
) -> dict[str, Any]:
    """``measure_parity`` on the test images against ``default_gates(fmt, precision)``."""
    from kdpipe.exports import ParityTolerance, check_parity, measure_parity

    images, labels = acc.parity_images(acc.sizes.parity_images)
    report = measure_parity(model, runner, images, labels, batch_size=256)
    gates = default_gates(fmt, precision)
    label = fmt if precision is None else f"{fmt} {precision}"
    failures = check_parity(report, ParityTolerance(**gates), label=label)
    return {**report.to_dict(), "gates_of": label, "gates": gates, "passed": not failures, "failures": failures}


def _parity_target(rec: PartRecord, name: str, parity: dict[str, Any]) -> None:
    rec.target(
        name,
        value={k: parity[k] for k in ("max_abs_diff", "top1_agreement", "top1_drop")},
        threshold=parity["gates"],
        rule=f"within the {parity['gates_of']} format's default parity gates",
        met=parity["passed"],
        why="; ".join(parity["failures"]) or None,
    )


def _parity_line(parity: dict[str, Any]) -> str:
    return (
        f"max |diff| {parity['max_abs_diff']:.3g}, agreement {parity['top1_agreement']:.4f}, top-1 "
        f"{parity['torch_top1']:.4f} -> {parity['export_top1']:.4f} ({'within' if parity['passed'] else 'OUTSIDE'} "
        f"{parity['gates_of']} gates)"
    )


def _bench(acc: Acceptance, label: str, backend: str, path: Path, device: str) -> list[dict[str, Any]]:
    """``run_benchmark`` of one artifact at the mode's batch sizes; the cells as dicts."""
    from kdpipe.bench import BenchTarget, run_benchmark

    splits, s = acc.splits(), acc.sizes
    cells = run_benchmark(
        [BenchTarget(label, backend, path)],
        list(s.bench_batches),
        (splits.in_chans, splits.image_size, splits.image_size),
        warmup=s.bench_warmup,
        min_iterations=s.bench_iterations,
        min_time_s=s.bench_min_time_s,
        device=device,
    )
    keys = ("batch_size", "p50_ms", "p99_ms", "throughput", "peak_memory_bytes", "timer", "device", "notes", "error")
    return [{k: getattr(c, k) for k in keys} for c in cells]


def _cli_bench(acc: Acceptance, model: Path, device: str) -> dict[str, Any]:
    """``kdpipe bench MODEL --json`` as a user runs it."""
    batches = ",".join(map(str, acc.sizes.bench_batches[:2]))
    command = acc.run(
        [
            *(sys.executable, "-m", "kdpipe", "bench", str(model), "--batch-sizes", batches, "--device", device),
            *("--warmup", str(acc.sizes.bench_warmup), "--min-iterations", str(acc.sizes.bench_iterations)),
            *("--min-time", str(acc.sizes.bench_min_time_s), "--json", "--out", str(acc.work / f"{model.name}.bench")),
        ],
        timeout=120,
        name=f"bench-{model.stem}",
    )
    command.check(f"kdpipe bench {model.name}")
    # --json prints the cells as an indented JSON list; a library's banner on stdout before it is skipped
    start = re.search(r"^\[(\]|\s*$)", command.stdout, re.MULTILINE)
    if start is None:
        raise RuntimeError(f"kdpipe bench --json printed no JSON list; output tail:\n{command.tail(1500)}")
    cells, _ = json.JSONDecoder().raw_decode(command.stdout[start.start() :])
    keys = ("backend", "batch_size", "p50_ms", "p99_ms", "throughput", "timer", "device", "error")
    return {**command.describe(), "cells": [{k: c.get(k) for k in keys} for c in cells]}


def part_onnxruntime_cuda(acc: Acceptance, rec: PartRecord) -> None:
    """The exported student on onnxruntime's CUDA execution provider against PyTorch, and its latency."""
    import onnxruntime as ort

    from kdpipe.exports import create_onnx_runner

    model, onnx_path = acc.student()
    rec.results["student"] = acc.student_record
    providers = ort.get_available_providers()
    rec.results["available_providers"] = providers
    if acc.cuda and "CUDAExecutionProvider" in providers:
        runner = create_onnx_runner(onnx_path, providers=["CUDAExecutionProvider"], batch_size=256)
        used = runner.session.get_providers()
        rec.results["session_providers"] = used
        if used[0] != "CUDAExecutionProvider":
            raise RuntimeError(f"asked for CUDAExecutionProvider, the session runs on {used}")
        parity = _parity(model, runner, acc, "onnx")
        rec.results["parity"] = parity
        rec.results["bench"] = _bench(acc, "student fp32", "onnxruntime", onnx_path, "cuda")
        _parity_target(rec, "onnxruntime_cuda_parity", parity)
        rec.summary = _parity_line(parity)
        return
    # Not here: the same code on the CPU provider, so a typo cannot wait for the GPU.
    runner = create_onnx_runner(onnx_path, providers=["CPUExecutionProvider"], batch_size=256)
    parity = _parity(model, runner, acc, "onnx")
    stand_in = {"session_providers": runner.session.get_providers(), "parity": parity}
    stand_in["bench"] = _bench(acc, "student fp32", "onnxruntime", onnx_path, "cpu")
    rec.results["cpu_stand_in"] = stand_in
    _parity_target(rec, "cpu_stand_in_parity", parity)
    rec.target(
        "onnxruntime_cuda_parity",
        value=None,
        threshold=default_gates("onnx"),
        rule="CUDAExecutionProvider within the onnx format's gates",
        met=None,
        why=NEEDS_CUDA,
    )
    rec.summary = f"CPU stand-in: {_parity_line(parity)}"
    if not acc.cuda:
        raise PartSkipped(
            f"{NEEDS_CUDA}: no GPU here (dry run); the same export and parity ran on CPUExecutionProvider"
        )
    raise PartSkipped(
        f"{NEEDS_CUDA} in onnxruntime: this build offers {providers} (the CPU wheel); carry onnxruntime-gpu wheels"
    )


def _qad_graph(acc: Acceptance, rec: PartRecord) -> Path | None:
    """A qad stage's signed QDQ graph from a ``kdpipe run`` (None, with the reason recorded, without modelopt)."""
    spec_error = None
    try:
        importlib.import_module("modelopt.torch.quantization")
    except Exception as exc:  # absent, or a dependency of it missing
        spec_error = describe_error(exc)
    if spec_error is not None:
        rec.results["qad"] = {"status": "skipped", "reason": f"nvidia-modelopt does not import: {spec_error}"}
        return None
    s = acc.sizes
    qad = (
        "  qad:\n    type: qad\n"
        f"    train: {{epochs: 1, batch_size: {s.pipeline_batch}, lr: 0.005}}\n"
        "    calibration_samples: 256\n    max_drop_vs_fp32: 1.0\n"
        "    parity: {min_agreement: 0.0, max_top1_drop: 1.0}\n"
    )
    config = acc.pipeline_config("qad", acc.teacher_and_distill() + qad)
    run_dir = config.parent / "run"
    command = acc.run(
        [sys.executable, "-m", "kdpipe", "run", str(config), "--out", str(run_dir)], timeout=240, name="qad"
    )
    # The stage records which of its artifacts is the signed QDQ graph (model.qdq.onnx in the default layout), as the
    # export stage reads it.
    graph = run_dir / "qad" / "model.qdq.onnx"
    record: dict[str, Any] = command.describe()
    result_path = run_dir / "qad" / "result.json"
    if result_path.is_file():
        result = json.loads(result_path.read_text(encoding="utf-8"))
        graph = run_dir / "qad" / result["artifacts"][result["info"]["qdq_graph"]]
        record["metrics"] = {k: v for k, v in result.get("metrics", {}).items() if isinstance(v, (int, float))}
    record["graph"] = graph.name if graph.is_file() else None
    if command.rc != 0 or not graph.is_file():
        record.update(status="failed", error=command.tail())
        rec.results["qad"] = record
        raise RuntimeError(f"the qad pipeline did not write {graph}: {command.tail(1500)}")
    record["status"] = "ok"
    rec.results["qad"] = record
    return graph


def part_tensorrt(acc: Acceptance, rec: PartRecord) -> None:
    """fp16, int8 (QDQ) and qad engines: built, stamped, parity-checked and benchmarked."""
    from kdpipe.exports import check_onnx_for_tensorrt, convert_fp16, quantize_int8, tensorrt_version

    model, fp32 = acc.student()
    rec.results["student"] = acc.student_record
    calibration = acc.calibration_images(acc.sizes.calibration_images)
    graphs: dict[str, tuple[Path, str]] = {
        "fp16": (convert_fp16(fp32, acc.work / "student.fp16.onnx"), "fp16"),
        "int8": (quantize_int8(fp32, acc.work / "student.int8.onnx", calibration, activation_type="int8"), "int8"),
    }
    failures = []
    try:
        qad_graph = _qad_graph(acc, rec)
    except OutOfTime:
        raise
    except Exception as exc:  # recorded; the engines of the other graphs are still built
        qad_graph = None
        failures.append(f"qad: {describe_error(exc)}")
    if qad_graph is not None:
        graphs["qad-int8"] = (qad_graph, "int8")
    version = tensorrt_version()
    majors = [int(version.split(".")[0])] if version else [10, 11]
    checks: dict[str, Any] = {}
    for tag, (path, precision) in graphs.items():
        for major in majors:
            check_onnx_for_tensorrt(path, precision, major)  # a ConfigError fails the part: the graph is wrong
        checks[tag] = {"graph": path.name, "precision": precision, "accepted_by_tensorrt_major": majors}
    rec.results["graphs"] = checks
    rec.results["tensorrt"] = version
    if version is None or not acc.cuda:
        cli = _cli_bench(acc, graphs["int8"][0], "cuda" if acc.cuda else "cpu")
        rec.results["cpu_stand_in"] = {"kdpipe_bench_cli": cli}
        missing = [w for w, ok in (("CUDA", acc.cuda), ("tensorrt", version is not None)) if not ok]
        rec.summary = f"graphs {', '.join(graphs)} accepted for TensorRT {majors}; no engine built"
        for tag, (_, precision) in graphs.items():
            rec.target(
                f"engine_{tag}",
                value=None,
                threshold=default_gates("tensorrt", precision),
                rule=f"built, stamped and within the tensorrt {precision} engine's default parity gates",
                met=None,
                why=f"{NEEDS_CUDA} and tensorrt; missing here: {', '.join(missing)}",
            )
        why = (
            "no GPU here (dry run)" if not acc.cuda else "tensorrt does not import (carry its wheels to build engines)"
        )
        if failures:
            raise RuntimeError("; ".join(failures))
        raise PartSkipped(f"{NEEDS_CUDA} and tensorrt: {why}; the QDQ/fp16 graphs and their TensorRT checks ran")
    engines = {}
    for tag, (path, precision) in graphs.items():
        try:
            acc.require_time(f"the {tag} engine", 30)
            engines[tag] = _engine(acc, rec, tag, path, precision, model)
        except OutOfTime:
            raise
        except Exception as exc:
            engines[tag] = {
                "status": "failed",
                "error": describe_error(exc),
                "traceback": traceback.format_exc()[-TAIL_CHARS:],
            }
            failures.append(f"{tag}: {describe_error(exc)}")
        rec.results["engines"] = engines
    rec.summary = "; ".join(
        f"{t}: {e['parity_line']}" if e.get("status") == "ok" else f"{t}: {e['status']}" for t, e in engines.items()
    )
    if failures:
        raise RuntimeError("; ".join(failures))


def _engine(
    acc: Acceptance, rec: PartRecord, tag: str, source: Path, precision: str, model: nn.Module
) -> dict[str, Any]:
    """Build, stamp-check, parity-check and benchmark one engine."""
    import numpy as np

    from kdpipe.exports import build_engine, create_onnx_runner, load_engine
    from kdpipe.exports.tensorrt import read_stamp, stamp_path

    plan = acc.work / f"student.{tag}.plan"
    t0 = time.perf_counter()
    stamp = build_engine(source, plan, precision=precision, min_batch=1, opt_batch=64, max_batch=256)
    record: dict[str, Any] = {
        "source": source.name,
        "precision": precision,
        "build_s": round(time.perf_counter() - t0, 2),
    }
    stamp_file = stamp_path(plan)
    if not stamp_file.is_file() or read_stamp(plan) != stamp:
        raise RuntimeError(f"the stamp {stamp_file} is missing or differs from the build's")
    record.update(stamp=stamp.to_dict(), stamp_file=stamp_file.name, plan_bytes=plan.stat().st_size)
    runner = load_engine(plan)
    if tag == "qad-int8":  # against onnxruntime running the same fine-tuned QDQ graph
        images, labels = acc.parity_images(acc.sizes.parity_images)
        x = images.numpy()
        reference = create_onnx_runner(source, providers=["CPUExecutionProvider"], batch_size=256)(x)
        got = runner(x)
        agreement = float((got.argmax(1) == reference.argmax(1)).mean())
        top1 = float((got.argmax(1) == labels.numpy()).mean())
        record["parity"] = {
            "reference": "onnxruntime CPU on model.qdq.onnx",
            "max_abs_diff": float(np.abs(got - reference).max()),
            "top1_agreement": agreement,
            "engine_top1": top1,
            "onnxruntime_top1": float((reference.argmax(1) == labels.numpy()).mean()),
            "passed": agreement >= 0.9,
        }
        record["parity_line"] = f"agreement with onnxruntime {agreement:.4f}, top-1 {top1:.4f}"
        rec.target(
            f"engine_{tag}",
            value=agreement,
            threshold=0.9,
            rule="top-1 agreement with onnxruntime on the same QDQ graph (tests/stages/test_qad.py's gate)",
            met=agreement >= 0.9,
        )
    else:  # against PyTorch, with the gates the export stage gives an engine of this precision
        parity = _parity(model, runner, acc, "tensorrt", precision)
        record["parity"] = parity
        record["parity_line"] = _parity_line(parity)
        _parity_target(rec, f"engine_{tag}", parity)
    record["bench"] = _bench(acc, f"trt {tag}", "tensorrt", plan, "cuda")
    # Batches inside the engine's profile run device-resident (TensorRTRunner.run_device) and are timed with CUDA
    # events; a batch outside it goes through the host runner and perf_counter, and says so in its notes.
    low, high = stamp.min_batch, stamp.max_batch
    in_profile = [c for c in record["bench"] if low <= c["batch_size"] <= high]
    rec.target(
        f"engine_{tag}_cuda_events",
        value={str(c["batch_size"]): c["error"] or c["timer"] for c in in_profile},
        threshold="cuda-events",
        rule=f"run_benchmark times every batch inside the engine's profile ({low}..{high}) with CUDA events "
        "(DESIGN.md §6: CUDA events on GPU)",
        met=bool(in_profile) and all(c["timer"] == "cuda-events" and not c["error"] for c in in_profile),
    )
    record["kdpipe_bench_cli"] = _cli_bench(acc, plan, "cuda")
    record["status"] = "ok"
    return record
