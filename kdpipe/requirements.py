"""What a config needs from the machine: libraries, CUDA, execution providers.

Stages (``Stage.requirements``), the pipeline (``device``) and tracking each declare a ``Requirement`` per thing
their config asks for, checked where it is declared. ``kdpipe run`` and ``kdpipe validate`` refuse to start while a
``fatal`` one is missing (exit 2); ``kdpipe doctor`` lists all of them, met or not.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from kdpipe.errors import ConfigError, KdpipeError

# How to install what an optional feature needs: the one text every error, requirement and `kdpipe doctor` line uses.
EXPORT_HINT = 'pip install "kdpipe[export]" (onnx, onnxruntime, onnxslim, tritonclient[grpc], nvidia-modelopt, ...)'
TRACKING_HINT = 'pip install "kdpipe[tracking]" (mlflow-skinny and tensorboard)'
TENSORRT_HINT = "pip install tensorrt on a machine with an NVIDIA GPU and CUDA, or choose another format or backend"


@dataclass(frozen=True)
class Requirement:
    """One thing a config asks for, and whether this machine has it."""

    what: str
    """The library or facility: "tensorrt", "CUDA", "onnxruntime CUDAExecutionProvider"."""
    field: str
    """The config field that asks for it: "stages.trt.format", "tracking.mlflow", "device"."""
    where: str
    """``file:line`` of that field."""
    available: bool
    message: str = ""
    """Why it is missing, starting with the field (empty when available)."""
    hint: str = ""
    """How to get it."""
    fatal: bool = True
    """``kdpipe run`` refuses to start without it. Not fatal: the run goes on, degraded (a benchmark cell becomes an
    error row, onnxruntime falls back to the CPU)."""

    @property
    def line(self) -> str:
        """One line for a user: ``file:line: field: what is missing; hint: how to fix it``."""
        return f"{self.where}: {self.message}" + (f"; hint: {self.hint}" if self.hint else "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def error(self) -> ConfigError:
        return ConfigError(f"{self.where}: {self.message}", hint=self.hint or None)


def module_available(name: str) -> bool:
    """True when ``name`` can be found for import (without importing it; a module blocked by ``sys.modules[name] =
    None`` counts as missing)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def needs_module(
    module: str, *, field: str, where: str, value: str | None, hint: str, fatal: bool = True
) -> Requirement:
    """``field`` (set to ``value``) needs the importable package ``module``."""
    ok = module_available(module)
    asked = f"{value!r} needs" if value is not None else "needs"
    message = "" if ok else f"{field}: {asked} {module}, which is not installed"
    return Requirement(module, field, where, ok, message, "" if ok else hint, fatal)


def from_check(what: str, check: Callable[[], object], *, field: str, where: str, fatal: bool = True) -> Requirement:
    """Run an existing check that raises a ``KdpipeError`` with a hint when ``what`` is missing."""
    try:
        check()
    except KdpipeError as exc:
        message = exc.message if exc.message.startswith(f"{field}:") else f"{field}: {exc.message}"
        return Requirement(what, field, where, False, message, exc.hint or "", fatal)
    return Requirement(what, field, where, True, fatal=fatal)


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def needs_cuda(*, field: str, where: str, value: str, fatal: bool = True) -> Requirement:
    """``field`` (set to ``value``) needs a CUDA device."""
    ok = cuda_available()
    message = "" if ok else f"{field}: {value!r} asked for, but CUDA is not available here"
    hint = "" if ok else "run on a machine with an NVIDIA GPU (docker run --gpus all), or use device: auto / cpu"
    return Requirement("CUDA", field, where, ok, message, hint, fatal)


def enforce(requirements: list[Requirement]) -> None:
    """Raise the first missing fatal requirement as a ``ConfigError`` (exit 2)."""
    for req in requirements:
        if req.fatal and not req.available:
            raise req.error()
