"""What a benchmark measures: one model artifact with one backend. Its own module so that the backends and the
measuring loop both use it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn


@dataclass
class BenchTarget:
    """One model artifact to benchmark with one backend.

    ``label`` names the model in tables and plots; ``path`` is the artifact file (``.onnx``, ``.plan``, a
    TorchScript ``.pt``), also used for the model size; ``module`` is the ``nn.Module`` the torch backends run.
    """

    label: str
    backend: str
    path: Path | None
    module: nn.Module | None = None
