"""Where and with what kdpipe runs: the device a setting resolves to and the environment record (versions, device,
CPU, GPU, commit) that runs (environment.json, checkpoints, the model card), benchmark reports and
``benchmarks/*.py`` results all write. One place, so every record names the same facts the same way."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import os
import platform
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import torch

from kdpipe.errors import ConfigError

# Distributions whose version decides what an exported model is and how it runs; recorded when installed.
EXPORT_DISTRIBUTIONS = ("onnx", "onnxruntime", "onnxruntime-gpu", "onnxslim", "tensorrt")


def resolve_device(setting: str, local_rank: int | None = None) -> torch.device:
    """``auto`` (this process's GPU under torchrun, ``local_rank`` given; else the first GPU; else the CPU), ``cpu``,
    ``cuda`` or ``cuda:N``; a ConfigError for anything else or for CUDA on a machine without it."""
    if setting == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank or 0)
        return torch.device("cpu")
    try:
        device = torch.device(setting)
    except RuntimeError as exc:
        raise ConfigError(f"device: {setting!r} is not a device", hint="use auto, cpu, cuda or cuda:N") from exc
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device: {setting!r} is not supported", hint="use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {setting!r} asked for, but CUDA is not available here", hint="use auto or cpu")
        if device.index is None:
            return torch.device("cuda", local_rank or 0)
    return device


@cache
def git_sha() -> str:
    """The commit of the kdpipe checkout, with ``-dirty`` when tracked files differ from it ("" outside a checkout)."""

    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return ""
    return head + ("-dirty" if dirty else "")


def export_versions() -> dict[str, str]:
    """Installed versions of the export and runtime libraries, read from package metadata (nothing is imported)."""
    versions = {}
    for name in EXPORT_DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def describe_environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """The environment record: date, kdpipe/python/torch/timm and export library versions, platform, CPU (model,
    count, torch threads), the device and its GPU and CUDA, onnxruntime's providers, and the git commit."""
    import timm

    import kdpipe

    env: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "kdpipe": kdpipe.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "git_sha": git_sha(),
    }
    if device is not None:
        env["device"] = str(device)
    if torch.cuda.is_available():
        index = torch.device(device).index if device is not None and str(device).startswith("cuda") else None
        env["gpu"] = torch.cuda.get_device_name(index or 0)
        env["cuda"] = torch.version.cuda
    env.update(export_versions())
    try:
        import onnxruntime as ort

        env["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        pass
    return env
