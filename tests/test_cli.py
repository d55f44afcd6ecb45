"""The ``kdpipe`` command as a user runs it (a subprocess): exit codes, one-line errors without tracebacks,
nothing lost in an existing run directory, skip-on-rerun, and resume after SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY


def kdpipe(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kdpipe", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200"},
        timeout=300,
    )


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file of a run directory but the pid of its last writer."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".kdpipe.pid"
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny config and its completed run directory, shared by the bad-input tests."""
    root = tmp_path_factory.mktemp("cli")
    cfg = root / "stages.yaml"
    cfg.write_text(TINY.lstrip("\n"))
    env_cache = os.environ.get("KDPIPE_CACHE")
    os.environ["KDPIPE_CACHE"] = str(root / "cache")
    try:
        proc = kdpipe("run", cfg, "--out", root / "run")
    finally:
        if env_cache is None:
            os.environ.pop("KDPIPE_CACHE", None)
        else:
            os.environ["KDPIPE_CACHE"] = env_cache
    assert proc.returncode == 0, proc.stderr
    return cfg, root / "run"


def test_run_then_rerun_skips(finished_run: tuple[Path, Path]) -> None:
    cfg, run_dir = finished_run
    lock_before = (run_dir / "run.lock.json").read_bytes()
    proc = kdpipe("run", cfg, "--out", run_dir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("up to date, skipped") == 4
    assert "0 ran, 4 up to date" in proc.stderr
    assert (run_dir / "run.lock.json").read_bytes() == lock_before


BAD_INPUTS = {
    "unknown key": (TINY.replace("seed: 0", "seed: 0\nsead: 1"), 2, "unknown key 'sead' (did you mean 'seed'?)"),
    "stage type": (
        TINY.replace("type: verify", "type: verfy"),
        2,
        "unknown stage type 'verfy' (did you mean 'verify'?)",
    ),
    "method": (TINY.replace("name: kd,", "name: kdd,"), 2, "unknown method 'kdd' (did you mean 'kd'?)"),
    "zero epochs": (
        TINY.replace("{epochs: 2, batch_size: 32, lr: 0.05}\n  verify", "{epochs: 0}\n  verify"),
        2,
        "greater than 0",
    ),
    "negative epochs": (TINY.replace("{train: {epochs: 2,", "{train: {epochs: -1,"), 2, "greater than 0"),
    "model name": (
        TINY.replace("student: resnet8", "student: resnet8x5"),
        2,
        "'resnet8x5' (did you mean 'resnet8x4'?)",
    ),
    "yaml syntax": (TINY.replace("seed: 0", "seed: [0"), 2, "YAML syntax error"),
    "empty file": ("", 2, "the file is empty"),
    "missing data path": (
        TINY.replace("kind: synthetic,", "kind: imagefolder, root: /nonexistent/data,"),
        3,
        "/nonexistent/data does not exist",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_one_line_error_and_nothing_lost(finished_run: tuple[Path, Path], tmp_path: Path, case: str) -> None:
    _, run_dir = finished_run
    text, code, fragment = BAD_INPUTS[case]
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    before = snapshot(run_dir)
    proc = kdpipe("run", bad, "--out", run_dir)
    assert proc.returncode == code, proc.stderr
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and str(bad) in proc.stderr
    assert snapshot(run_dir) == before


def test_empty_image_folder_is_a_data_error(finished_run: tuple[Path, Path], tmp_path: Path) -> None:
    _, run_dir = finished_run
    (tmp_path / "imgs" / "train").mkdir(parents=True)
    bad = tmp_path / "bad.yaml"
    bad.write_text(TINY.replace("kind: synthetic,", "kind: imagefolder, root: imgs,"))
    before = snapshot(run_dir)
    proc = kdpipe("run", bad, "--out", run_dir)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr and "imgs" in proc.stderr
    assert snapshot(run_dir) == before


def test_not_a_checkpoint(finished_run: tuple[Path, Path], tmp_path: Path) -> None:
    _, run_dir = finished_run
    (tmp_path / "teacher.pt").write_text("this is not a checkpoint\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        TINY.replace("weights: {train: {epochs: 2, batch_size: 32, lr: 0.05}}", "weights: {checkpoint: teacher.pt}")
    )
    before = snapshot(run_dir)
    proc = kdpipe("run", bad, "--out", run_dir)
    assert proc.returncode == 3, proc.stderr
    assert "teacher.pt" in proc.stderr and "Traceback" not in proc.stderr
    # the teacher stage had to rerun (its config changed) and failed: the earlier distill result is untouched
    assert (run_dir / "distill" / "model.safetensors").read_bytes() == before["distill/model.safetensors"]


def test_gate_failure_exit_code(finished_run: tuple[Path, Path], tmp_path: Path) -> None:
    cfg, _ = finished_run
    proc = kdpipe("run", cfg, "--out", tmp_path / "gated", "--set", "stages.verify.min_top1=1.0")
    assert proc.returncode == 4, proc.stderr
    assert "FAILED by" in proc.stderr and "Traceback" not in proc.stderr


def test_validate_schema_list(finished_run: tuple[Path, Path]) -> None:
    cfg, _ = finished_run
    proc = kdpipe("validate", cfg)  # the installed entry point, in its own process
    assert proc.returncode == 0 and "ok" in proc.stdout and "distill (distill <- teacher)" in proc.stdout
    # the rest in-process: the same click commands, without paying a torch import per call
    from click.testing import CliRunner

    from kdpipe.cli import cli

    runner = CliRunner()
    schema = json.loads(runner.invoke(cli, ["schema"]).output)
    assert "stages" in schema["properties"]
    methods = runner.invoke(cli, ["list", "methods"]).output
    assert "kd" in methods and "ce" in methods
    models = runner.invoke(cli, ["list", "models"]).output.split()
    assert {"resnet8x4", "resnet32x4", "wrn_40_2"} <= set(models)
    assert runner.invoke(cli, ["list", "nonsense"]).exit_code == 2


def test_sigterm_saves_checkpoint_and_rerun_resumes(tmp_path: Path, write_config: Callable[..., Path]) -> None:
    # enough steps that the signal lands mid-training: 512 samples / 16 = 32 steps per epoch (about a second here),
    # 8 epochs; the signal follows the first epoch event within 0.2 s
    cfg = write_config(
        TINY.replace("num_samples: 128", "num_samples: 512").replace(
            "weights: {train: {epochs: 2, batch_size: 32, lr: 0.05}}", "weights: {train: {epochs: 8, batch_size: 16}}"
        )
    )
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdpipe", "run", str(cfg), "--out", str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    events = run_dir / "events.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (events.exists() and '"epoch"' in events.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "checkpoint saved" in stderr and "to resume: kdpipe run" in stderr
    assert (run_dir / "teacher" / "checkpoints" / "last.pt").is_file()
    proc2 = kdpipe("run", cfg, "--out", run_dir, "--set", "stages.teacher.weights.train.epochs=8")
    assert proc2.returncode == 0, proc2.stderr
    result = json.loads((run_dir / "teacher" / "result.json").read_text())
    assert result["info"]["resumed_from"] is not None and result["info"]["resumed_from"] >= 1


def test_help_mentions_exit_codes() -> None:
    proc = kdpipe("--help", cwd=REPO)
    assert proc.returncode == 0 and "4 gate failed" in proc.stdout
