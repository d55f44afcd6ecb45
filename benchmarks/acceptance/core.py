"""The vocabulary of the GPU acceptance run: its parts in order, what a part records, and a finished subprocess.

A part ends ok, failed (with the error) or skipped (with the reason); it records numbers in ``results`` and targets
in ``targets``, a target whose ``met`` is None being "not measurable here", with ``why``. Nothing here imports torch or
kdpipe: the wheels part runs before either is importable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_acceptance.py"
"""The entry point: the torchrun part runs it again as the process-group probe."""

TITLES = {
    "wheels": "1. carried wheels and imports",
    "environment": "2. environment",
    "methods": "3. every KD method, a few steps per precision",
    "throughput": "4. training throughput (train_throughput.py)",
    "torchrun": "5. torchrun and the process group",
    "onnxruntime_cuda": "6. onnxruntime CUDA provider parity",
    "tensorrt": "7. TensorRT engines",
    "gpu_tests": "8. the suite's gpu/tensorrt tests",
}
"""Every part, in the order the run takes them, with its heading in the log and the report."""
PARTS = tuple(TITLES)
ALWAYS_RUN = ("wheels", "environment")
"""Parts every run needs (imports, the environment record); ``--parts`` selects among the others."""
NEEDS_CUDA = "needs CUDA"
"""How the reason of a skip (or of an unmeasured target) that only a GPU machine can lift begins."""
TAIL_CHARS = 4000
"""Characters of a failing command's output (or of a traceback) kept in the record."""


class PartSkipped(Exception):
    """Raised by a part that cannot run here; the message is the reason."""


class OutOfTime(PartSkipped):
    """Raised inside a part when the budget ends before its next item."""


def describe_error(exc: BaseException) -> str:
    """``Type: message`` of an exception, cut to 2,000 characters, for a record."""
    return f"{type(exc).__name__}: {exc}"[:2000]


@dataclass
class PartRecord:
    """What one part did: status ok | failed | skipped, its reason or error, numbers and targets."""

    name: str
    status: str = "not run"
    seconds: float = 0.0
    reason: str | None = None
    error: str | None = None
    traceback: str | None = None
    summary: str = ""
    results: dict[str, Any] = field(default_factory=dict)
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)

    def target(
        self, name: str, *, value: Any, threshold: Any, rule: str, met: bool | None, why: str | None = None
    ) -> None:
        """Record a target: ``met`` None means not measurable here, and ``why`` says so."""
        self.targets[name] = {"value": value, "threshold": threshold, "rule": rule, "met": met, "why": why}


@dataclass
class Command:
    """A finished subprocess: exit code (None when killed at its timeout), seconds, and its output."""

    argv: list[str]
    rc: int | None
    seconds: float
    stdout: str
    stderr: str
    budget_capped: bool = False
    """The timeout was cut short by the end of the time budget."""

    @property
    def timed_out(self) -> bool:
        return self.rc is None

    def tail(self, chars: int = TAIL_CHARS) -> str:
        """The last ``chars`` characters of stdout and stderr together."""
        text = (self.stdout + ("\n" if self.stdout and self.stderr else "") + self.stderr).strip()
        return text[-chars:]

    def describe(self) -> dict[str, Any]:
        """argv, exit code, whether it timed out and its seconds, for a record."""
        return {"argv": self.argv, "rc": self.rc, "timed_out": self.timed_out, "seconds": round(self.seconds, 2)}

    def check(self, what: str) -> None:
        """``RuntimeError`` with the output's tail unless the command exited 0 (``OutOfTime`` when the end of the
        budget killed it)."""
        if self.timed_out and self.budget_capped:
            raise OutOfTime(f"time budget: {what} was stopped after {self.seconds:.0f} s, when the budget ran out")
        if self.rc != 0:
            how = "timed out" if self.timed_out else f"exited {self.rc}"
            raise RuntimeError(f"{what} {how} after {self.seconds:.0f} s; output tail:\n{self.tail()}")
