"""``benchmark`` stage: latency and throughput of the student and its exports, per backend and batch size.

The torch backends measure the PyTorch student; onnxruntime measures every upstream ONNX export; tensorrt every
upstream engine. A cell that fails (a backend missing here, out of memory at a large batch) is an error row in
the report, not a crashed stage.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, PositiveFloat, PositiveInt, field_validator

from kdpipe.bench import BenchTarget, describe_environment, run_benchmark, write_report
from kdpipe.config import LoadedConfig, StageConfig
from kdpipe.errors import ConfigError, StageError
from kdpipe.registry import BACKENDS, STAGES
from kdpipe.requirements import Requirement, cuda_available, from_check, needs_cuda
from kdpipe.stages.base import Stage, StageRecord, StageResult
from kdpipe.stages.common import load_stage_model
from kdpipe.stages.outputs import BenchmarkOutput, ExportOutput, ModelOutput

log = logging.getLogger(__name__)


class BenchmarkConfig(StageConfig):
    """Measure latency (p50/p90/p99, mean, std), throughput, size and peak memory."""

    type: Literal["benchmark"]
    backends: list[str] = Field(default_factory=lambda: ["torch", "onnxruntime"], min_length=1)
    """torch | torch-compile | onnxruntime | tensorrt (kdpipe list backends)."""
    batch_sizes: list[PositiveInt] = Field(default_factory=lambda: [1, 8, 64], min_length=1)
    warmup: int = Field(10, ge=0)
    """Untimed iterations before measuring each cell."""
    min_iterations: PositiveInt = 30
    min_time_s: PositiveFloat = 1.0
    """Each cell is timed for at least this many iterations and seconds."""
    threads: PositiveInt | None = None
    """CPU threads for torch and onnxruntime (default: torch's current setting)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("backends")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        for name in value:
            try:
                BACKENDS.get(name)  # raises a ConfigError with did-you-mean
            except ConfigError as exc:  # as a ValueError, pydantic reports it at its file:line and field
                raise ValueError(exc.message) from None
        return value


def _targets(
    cfg: BenchmarkConfig, exports: list[StageRecord], student: StageRecord | None, load: Any
) -> list[BenchTarget]:
    """What each backend measures, as the backend declares it (``Backend.needs``): a file-consuming backend every
    upstream export whose artifact suffix it runs (``Backend.consumes``), a module backend the PyTorch student."""
    targets: list[BenchTarget] = []
    for backend in cfg.backends:
        cls = BACKENDS.get(backend)
        if cls.needs == "path":
            for record in exports:
                path = record.artifact("model")
                if path.suffix in cls.consumes:
                    out = record.output(ExportOutput)
                    label = f"{out.model_name} {out.format}"
                    targets.append(BenchTarget(label=label, backend=backend, path=path))
        elif student is not None:
            module = load()
            label = f"{student.output(ModelOutput).model_name} torch"
            targets.append(BenchTarget(label=label, backend=backend, path=student.artifact("model"), module=module))
    return targets


@STAGES.register("benchmark", summary="latency/throughput per backend and batch size: JSON, Markdown, PNG")
class BenchmarkStage(Stage):
    Config = BenchmarkConfig
    Output = BenchmarkOutput
    provides = frozenset({"benchmark"})
    config: BenchmarkConfig

    @classmethod
    def requires(cls, config: Any) -> tuple[str, ...]:
        return ("model",)

    @classmethod
    def requirements(cls, name: str, config: Any, loaded: LoadedConfig) -> list[Requirement]:
        """Each backend's library (``Backend.check_available``) and, when the benchmark runs on the GPU, CUDA and
        onnxruntime's CUDA execution provider. None is fatal: a backend missing at run time is an error row, and
        onnxruntime without CUDA falls back to the CPU (noted in the report)."""
        field, where = f"stages.{name}.backends", loaded.where(("stages", name, "backends"))
        reqs = [
            from_check(backend, BACKENDS.get(backend).check_available, field=field, where=where, fatal=False)
            for backend in config.backends
        ]
        if config.device == "cuda":
            reqs.append(
                needs_cuda(
                    field=f"stages.{name}.device",
                    where=loaded.where(("stages", name, "device")),
                    value="cuda",
                    fatal=False,
                )
            )
        pipeline_device = str(loaded.config.device)
        on_gpu = config.device == "cuda" or (
            config.device == "auto"
            and (pipeline_device.startswith("cuda") or (pipeline_device == "auto" and cuda_available()))
        )
        for backend in (b for b in config.backends if BACKENDS.get(b).needs_cuda):
            if config.device == "cpu":
                message = f"{field}: {backend!r} runs on the GPU, but stages.{name}.device is 'cpu'"
                reqs.append(Requirement("CUDA", field, where, False, message, "set device: auto or cuda", fatal=False))
            elif not on_gpu:
                reqs.append(needs_cuda(field=field, where=where, value=backend, fatal=False))
        onnxruntime_ok = any(r.what == "onnxruntime" and r.available for r in reqs)
        if on_gpu and onnxruntime_ok:
            reqs.append(cuda_provider_requirement(field, where))
        return reqs

    def run(self) -> StageResult:
        ctx, cfg = self.ctx, self.config
        splits = ctx.data()
        student = ctx.find("student") or ctx.find("model")
        device = torch.device(
            "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and ctx.device.type == "cuda") else "cpu"
        )
        assert student is not None  # requires() guarantees a model upstream
        targets = _targets(cfg, ctx.find_all("export"), student, lambda: load_stage_model(student, splits, device))
        if not targets:
            log.warning("benchmark %s: nothing to measure for backends %s", ctx.name, cfg.backends)
        cells = run_benchmark(
            targets,
            list(cfg.batch_sizes),
            (splits.in_chans, splits.image_size, splits.image_size),
            warmup=cfg.warmup,
            min_iterations=cfg.min_iterations,
            min_time_s=cfg.min_time_s,
            threads=cfg.threads,
            device=str(device),
            progress=ctx.progress,
        )
        # The run's environment (git SHA, world size) on top of what a benchmark records: date, CPU count, onnxruntime
        # version and providers, GPU.
        paths = write_report(ctx.dir, cells, {**describe_environment(str(device)), **ctx.environment})
        rows = [vars(c) for c in cells]
        errors = [r for r in rows if r.get("error")]
        ok = [r for r in rows if not r.get("error")]
        fastest = min(ok, key=lambda r: r["p50_ms"] / r["batch_size"]) if ok else None
        summary = f"{len(ok)} cells measured, {len(errors)} errors"
        if fastest:
            summary += (
                f"; best per image: {fastest['model']} on {fastest['backend']} at batch {fastest['batch_size']} "
                f"({fastest['throughput']:.0f} img/s)"
            )
        return StageResult(
            metrics={"cells": len(ok), "errors": len(errors)},
            artifacts={key: str(Path(p).relative_to(ctx.dir)) for key, p in paths.items()},
            summary=summary,
            info={"cells": rows},
        )


def cuda_provider_requirement(field: str, where: str) -> Requirement:
    """onnxruntime's CUDA execution provider (onnxruntime-gpu), asked for by ``field``."""
    from kdpipe.exports.runtime import onnx_providers

    providers = onnx_providers()
    ok = "CUDAExecutionProvider" in providers
    message = (
        ""
        if ok
        else (
            f"{field}: 'onnxruntime' on the GPU needs onnxruntime's CUDAExecutionProvider, which this onnxruntime "
            f"build lacks (it has {', '.join(providers)}); it would run on the CPU"
        )
    )
    hint = "" if ok else "pip uninstall -y onnxruntime && pip install onnxruntime-gpu"
    return Requirement("onnxruntime CUDAExecutionProvider", field, where, ok, message, hint, fatal=False)


def copy_plot(record: StageRecord, dest: Path) -> Path | None:
    """Copy a benchmark stage's plot next to a model card (cards reference images by relative path)."""
    try:
        src = record.artifact("plot")
    except StageError:
        return None
    if not src.exists():
        return None
    shutil.copyfile(src, dest)
    return dest
