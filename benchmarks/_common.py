"""What every benchmark records beside its numbers: when, where (device, CPU threads), with what (versions),
at which commit, and how it measured. Results go to benchmarks/results/<name>.json."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
"""The real CIFAR archives beside the checkout (absent in a user's clone)."""


def git_commit() -> str:
    """HEAD of this checkout, with "-dirty" when tracked files differ from it."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=RESULTS.parent).stdout

    try:
        head, dirty = git("rev-parse", "HEAD").strip(), git("status", "--porcelain", "--untracked-files=no").strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def environment() -> dict[str, Any]:
    """kdpipe's environment record (versions, CPU, GPU, ...) with the commit of this benchmark checkout."""
    from kdpipe.environment import describe_environment, resolve_device

    return {**describe_environment(resolve_device("auto")), "commit": git_commit()}


def write_result(name: str, payload: dict[str, Any], directory: Path | None = None) -> Path:
    """Write ``<directory>/<name>.json`` (default benchmarks/results) with the environment; return its path."""
    directory = directory or RESULTS
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "environment": environment(), **payload}, indent=2) + "\n")
    return path
