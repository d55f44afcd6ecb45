"""The run summary: one JSON document per run for machines (CI jobs, orchestrators).

The engine writes it to ``<run>/summary.json`` at the end of every run that got as far as changing its run
directory, whether it succeeded or failed; ``kdpipe run --json`` prints the same document on stdout, and for a run
that stopped earlier (a config, lock or data error, where nothing in the run directory changes) a document with the
same keys, the error and no stage results. Layout (``SCHEMA`` 1)::

    {"schema": 1, "kdpipe": "0.1.0", "name": "digits-kd", "config": "/abs/stages.yaml", "run_dir": "/abs/runs/x",
     "status": "ok" | "gate_failed" | "failed" | "interrupted" | "error", "exit_code": 0,
     "error": null | {"message": "...", "hint": "...", "type": "GateFailed", "stage": "verify"},
     "started_at": "2026-...Z", "finished_at": "...", "seconds": 12.3,
     "stages": [{"name", "type", "status": "ran" | "skipped" | "failed" | "not_run", "seconds", "summary",
                 "metrics": {...}, "artifacts": {"model": "/abs/path"}, "gates": [gate, ...], "error": null}],
     "gates": {"checked": 5, "failed": 0, "failures": ["message", ...]},
     "tracking": {"mlflow": {...}, "tensorboard": {...}}}

A gate is ``Gate.to_dict()``: ``{"name", "threshold", "value", "passed", "message"}`` (verify and parity alike).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kdpipe
from kdpipe.errors import Gate, KdpipeError, status_of

if TYPE_CHECKING:
    from kdpipe.pipeline.graph import Node
    from kdpipe.pipeline.outcome import StageOutcome
    from kdpipe.stages.base import StageRecord

SCHEMA = 1
SUMMARY_FILE = "summary.json"
RUN_FILES = ("resolved.yaml", "environment.json", "events.jsonl", SUMMARY_FILE)
"""The run directory's own files (besides the stage folders)."""


def exit_code_of(error: BaseException | None) -> int:
    """The process exit code ``kdpipe run`` ends with for ``error`` (None: success)."""
    if error is None:
        return 0
    if isinstance(error, KdpipeError):
        return error.exit_code
    if isinstance(error, KeyboardInterrupt):
        return 130
    if isinstance(error, SystemExit):
        return error.code if isinstance(error.code, int) else 1
    return 1


def error_of(error: BaseException | None, stage: str | None = None) -> dict[str, Any] | None:
    if error is None:
        return None
    if isinstance(error, KdpipeError):
        return {"message": error.message, "hint": error.hint, "type": type(error).__name__, "stage": stage}
    message = "interrupted" if isinstance(error, KeyboardInterrupt) else f"{type(error).__name__}: {error}"
    return {"message": message, "hint": None, "type": type(error).__name__, "stage": stage}


def gates_of(info: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The gates a finished stage recorded in its result ``info`` (verify and export alike: ``Gate.to_dict``)."""
    return [Gate.from_dict(g).to_dict() for g in (info or {}).get("gates", [])]


def stage_entry(
    name: str,
    type_: str,
    status: str,
    *,
    seconds: float = 0.0,
    summary: str = "",
    result: dict[str, Any] | None = None,
    stage_dir: Path | None = None,
    failed_gates: list[dict[str, Any]] | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One stage of the summary. ``seconds`` it took in this run (0 when skipped); ``result`` is its result.json (ran
    or skipped), ``failed_gates`` the gates carried by the ``GateFailed`` of a stage whose gate failed."""
    result = result or {}
    artifacts: dict[str, str] = {}
    if stage_dir is not None:
        artifacts = {key: str((stage_dir / rel).absolute()) for key, rel in result.get("artifacts", {}).items()}
    gates = list(failed_gates) if failed_gates is not None else gates_of(result.get("info"))
    return {
        "name": name,
        "type": type_,
        "status": status,
        "seconds": round(seconds, 3),
        "summary": result.get("summary", summary) or summary,
        "metrics": dict(result.get("metrics", {})),
        "artifacts": artifacts,
        "gates": gates,
        "error": error,
    }


def stage_entries(
    root: Path,
    nodes: Sequence[Node],
    outcomes: Sequence[StageOutcome],
    records: Mapping[str, StageRecord],
    failed_gates: Mapping[str, list[dict[str, Any]]],
    error: BaseException | None,
) -> list[dict[str, Any]]:
    """Every stage of the pipeline in file order: ran or skipped (with its result), failed (with its error and, for a
    failed gate, the gates and the reports it wrote), or not run (after a failure, or left out by --only)."""
    by_name = {o.name: o for o in outcomes}
    entries = []
    for node in nodes:
        o = by_name.get(node.name)
        if o is None:
            entries.append(stage_entry(node.name, node.type, "not_run"))
        elif o.status == "failed":
            entry = stage_entry(
                node.name,
                node.type,
                "failed",
                seconds=o.seconds,
                summary=o.error,
                failed_gates=failed_gates.get(node.name),
                error=error_of(error, node.name),
            )
            if node.name in failed_gates:  # the gate's report (report.json, parity.json) is written before it fails
                reports = sorted((root / node.name).glob("*.json"))
                entry["artifacts"] = {p.stem: str(p.absolute()) for p in reports if p.name != "result.json"}
            entries.append(entry)
        else:
            record = records.get(node.name)
            result, folder = (record.result, record.dir) if record is not None else (None, None)
            entries.append(
                stage_entry(
                    node.name,
                    node.type,
                    o.status,
                    seconds=o.seconds,
                    summary=o.summary,
                    result=result,
                    stage_dir=folder,
                )
            )
    return entries


def stage_files(
    root: Path, records: Mapping[str, StageRecord], failed_gates: Mapping[str, list[dict[str, Any]]]
) -> dict[str, list[Path]]:
    """Per stage, the files worth keeping elsewhere (experiment tracking): each finished stage's artifacts and
    result.json, and the JSON reports of a stage whose gate failed."""
    files = {
        name: [rec.dir / rel for rel in rec.result.get("artifacts", {}).values()] + [rec.dir / "result.json"]
        for name, rec in records.items()
    }
    for name in failed_gates:
        files.setdefault(name, sorted((root / name).glob("*.json")))
    return files


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def document(
    *,
    name: str | None,
    config: Path | None,
    run_dir: Path | None,
    stages: list[dict[str, Any]],
    error: BaseException | None,
    started_at: float | None = None,
    finished_at: float | None = None,
    seconds: float = 0.0,
    tracking: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole summary document."""
    code = exit_code_of(error)
    failed_stage = next((s["name"] for s in stages if s["status"] == "failed"), None)
    gates = [g for s in stages for g in s["gates"]]
    failures = [str(g.get("message", g.get("name"))) for g in gates if not g.get("passed")]
    return {
        "schema": SCHEMA,
        "kdpipe": kdpipe.__version__,
        "name": name,
        "config": str(config.absolute()) if config is not None else None,
        "run_dir": str(run_dir.absolute()) if run_dir is not None else None,
        "status": status_of(code),
        "exit_code": code,
        "error": error_of(error, failed_stage),
        "started_at": _iso(started_at),
        "finished_at": _iso(finished_at),
        "seconds": round(seconds, 3),
        "stages": stages,
        "gates": {"checked": len(gates), "failed": len(failures), "failures": failures},
        "tracking": tracking or {},
    }
