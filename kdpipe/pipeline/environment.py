"""The run's device and the environment record (versions, device, git SHA) written to environment.json, checkpoints'
metadata and the model card."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import timm
import torch

import kdpipe
from kdpipe.errors import ConfigError


def resolve_device(setting: str, local_rank: int | None = None) -> torch.device:
    """The run's device; under torchrun (``local_rank`` given) CUDA means this process's own GPU."""
    if local_rank is not None and setting in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except RuntimeError as exc:
        raise ConfigError(f"device: {setting!r} is not a device; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {setting!r} asked for, but CUDA is not available here", hint="use device: auto")
    return device


@cache
def git_sha() -> str:
    """The commit of the kdpipe checkout, when running from one ("" otherwise)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(kdpipe.__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and device, written to environment.json, checkpoints' metadata and the model card."""
    env: dict[str, Any] = {
        "kdpipe": kdpipe.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
        "git_sha": git_sha(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    env.update(export_versions())
    return env


# Distributions whose version decides what an exported model is and how it runs; recorded when installed.
EXPORT_DISTRIBUTIONS = ("onnx", "onnxruntime", "onnxruntime-gpu", "onnxslim", "tensorrt")


def export_versions() -> dict[str, str]:
    """Installed versions of the export and runtime libraries, read from package metadata (nothing is imported)."""
    versions = {}
    for name in EXPORT_DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions
