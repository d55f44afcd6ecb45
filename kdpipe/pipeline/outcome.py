"""What a run returns: one outcome per stage and the run's summary. Its own module so that the engine
(``runner``) and the summary writer (``summary``) share the types without importing each other."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class StageOutcome:
    name: str
    type: str
    status: str  # "ran" | "skipped" | "failed"
    seconds: float = 0.0
    summary: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str = ""


@dataclass
class RunSummary:
    run_dir: Path
    stages: list[StageOutcome]
    seconds: float
