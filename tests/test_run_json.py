"""``kdpipe run --json`` as an orchestrator runs it (a subprocess): exactly one JSON document on stdout, success or
failure, with the run's exit code; everything else on stderr; KDPIPE_OUT and KDPIPE_SET_* from the environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def kdpipe(
    *args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kdpipe", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        timeout=300,
    )


def document(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """stdout must be one JSON document and nothing else."""
    doc = json.loads(proc.stdout)
    assert isinstance(doc, dict)
    return doc


def test_success_with_environment_overrides(write_config: Callable[..., Path], tmp_path: Path) -> None:
    cfg = write_config()
    out = tmp_path / "from-env"
    env = {
        "KDPIPE_OUT": str(out),
        "KDPIPE_SET_STAGES__DISTILL__TRAIN__EPOCHS": "1",
        "KDPIPE_SET_SEED": "5",
    }
    proc = kdpipe("run", cfg, "--json", "--set", "seed=7", env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    doc = document(proc)
    assert doc["run_dir"] == str(out) and doc["status"] == "ok" and doc["exit_code"] == 0
    assert doc == json.loads((out / "summary.json").read_text())
    assert [(s["name"], s["status"]) for s in doc["stages"]] == [
        ("teacher", "ran"),
        ("distill", "ran"),
        ("verify", "ran"),
        ("card", "ran"),
    ]
    assert all(Path(p).is_file() for s in doc["stages"] for p in s["artifacts"].values())
    assert doc["stages"][2]["gates"][0]["name"] == "min_top1" and doc["gates"]["failed"] == 0
    # progress and logs went to stderr
    assert "done in" in proc.stderr and "✓ distill" in proc.stderr
    resolved = (out / "resolved.yaml").read_text()
    assert "seed: 7" in resolved  # --set wins over KDPIPE_SET_SEED
    epochs = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "epoch" and e["stage"] == "distill" for e in epochs) == 1


def test_gate_failure_still_prints_the_document(write_config: Callable[..., Path], tmp_path: Path) -> None:
    proc = kdpipe("run", write_config(), "--json", "--out", tmp_path / "run", "--set", "stages.verify.min_top1=1.0")
    assert proc.returncode == 4, proc.stderr
    doc = document(proc)
    assert (doc["status"], doc["exit_code"]) == ("gate_failed", 4)
    assert doc["error"]["stage"] == "verify" and "FAILED by" in doc["error"]["message"]
    verify = next(s for s in doc["stages"] if s["name"] == "verify")
    assert verify["status"] == "failed" and verify["gates"][0]["passed"] is False
    assert proc.stderr.count("error: verify:") == 1 and "Traceback" not in proc.stderr


def test_config_error_prints_a_document_without_stages(write_config: Callable[..., Path], tmp_path: Path) -> None:
    cfg = write_config()
    proc = kdpipe(
        "run", cfg, "--json", "--out", tmp_path / "run", env={"KDPIPE_SET_STAGES__DISTILL__TRAIN__EPOCHS": "zero"}
    )
    assert proc.returncode == 2, proc.stderr
    doc = document(proc)
    assert (doc["status"], doc["exit_code"], doc["stages"]) == ("error", 2, [])
    assert "KDPIPE_SET_STAGES__DISTILL__TRAIN__EPOCHS" in doc["error"]["message"]
    assert doc["run_dir"] == str(tmp_path / "run") and doc["config"] == str(cfg)
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_stdout_is_reserved_for_the_document(capfd: pytest.CaptureFixture[str]) -> None:
    """While a --json run works, whatever prints to stdout (Python or C, through file descriptor 1) lands on stderr."""
    from kdpipe.cli import _stdout_to_stderr

    with _stdout_to_stderr():
        print("from python", flush=True)
        os.write(1, b"from C\n")
    print("the document", flush=True)
    out, err = capfd.readouterr()
    assert out == "the document\n"
    assert "from python" in err and "from C" in err
