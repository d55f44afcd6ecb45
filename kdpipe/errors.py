"""Error types. Each maps to one process exit code (DESIGN.md §3), so the CLI never needs a traceback.

A message must say what is wrong, where (file:line, field, or path) and what to do about it.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


EXIT_CODES: dict[int, tuple[str, str]] = {
    0: ("ok", "ok"),
    2: ("error", "config or usage error"),
    3: ("error", "data error"),
    4: ("gate_failed", "gate failed"),
    5: ("failed", "stage crashed"),
    130: ("interrupted", "interrupted (rerun the same command to resume)"),
}
"""Every exit code kdpipe ends with: the status word summary.json and tracking record, and what it means."""


def status_of(exit_code: int) -> str:
    """The run status for an exit code (``failed`` for any code kdpipe does not itself use)."""
    return EXIT_CODES.get(exit_code, ("failed", ""))[0]


class KdpipeError(Exception):
    """Base of every error kdpipe reports to a user. ``exit_code`` is what ``kdpipe`` exits with."""

    exit_code: int = 5

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class ConfigError(KdpipeError):
    """The stages.yaml, a --set override or a command-line argument is invalid (exit 2)."""

    exit_code = 2


class DataError(KdpipeError):
    """A dataset path, archive or file is missing or malformed (exit 3)."""

    exit_code = 3


@dataclass(frozen=True)
class Gate:
    """One checked bound, the one type for the verify stage's accuracy gates and an export's parity gates: stored
    in the stage's result (``info.gates``), carried by ``GateFailed`` and listed alike in the run summary."""

    name: str
    """The config key of the bound: min_top1, max_drop_vs_teacher, max_abs_diff, min_agreement, ..."""
    threshold: float | None
    value: float | None
    passed: bool
    message: str
    """The measured value against the bound, and by how much it passed or failed."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Gate:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


class GateFailed(KdpipeError):
    """A verify or parity gate was not met (exit 4). The stage's report is written before this is raised; ``gates``
    are every gate the stage checked (the failed ones have ``passed`` False)."""

    exit_code = 4

    def __init__(self, message: str, *, hint: str | None = None, gates: Sequence[Gate] = ()) -> None:
        super().__init__(message, hint=hint)
        self.gates = tuple(gates)

    @property
    def failed(self) -> list[Gate]:
        return [g for g in self.gates if not g.passed]


class StageError(KdpipeError):
    """A stage crashed while running (exit 5)."""

    exit_code = 5


class ExportError(StageError):
    """Exporting or converting a model failed (exit 5)."""


class RunLocked(ConfigError):
    """Another live ``kdpipe run`` holds the run directory (exit 2: a usage error, nothing was touched)."""


class Interrupted(KdpipeError):
    """The run was stopped by SIGINT/SIGTERM after saving a checkpoint; rerunning resumes it (exit 130)."""

    exit_code = 130


def handle_errors(fn: F) -> F:
    """Decorator for command-line entry points: a KdpipeError becomes a one-line ``error: ...`` (plus its hint) on
    stderr and the error's exit code; never a traceback for a user error. Every kdpipe command uses it."""
    import click

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KdpipeError as exc:
            click.echo(f"{click.style('error:', fg='red', bold=True)} {exc.message}", err=True)
            if exc.hint:
                click.echo(f"  {click.style('hint:', fg='yellow')} {exc.hint}", err=True)
            sys.exit(exc.exit_code)

    return wrapper  # type: ignore[return-value]
