"""SIGKILL (not SIGTERM: no handler runs, no checkpoint is written at the kill) at chosen and at random points of
teacher training, distillation, ONNX export and benchmarking; then the same command again. The rerun must finish,
must not redo a stage that had finished before the kill, must resume training from the last per-epoch checkpoint
(the one on disk at the kill), and must end with the same weights, bit for bit, as a run never interrupted."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.reliability._support import (
    STAGES,
    TRAINED_STAGES,
    KillPoint,
    assert_consistent,
    assert_same_weights,
    checkpoint_epoch,
    kill_at,
    last_run_events,
    lock_stages,
    read_events,
    result_of,
    run_cli,
    start_cli,
)


def _state_after_kill(run_dir: Path) -> dict[str, Any]:
    """What the killed run left: finished stages (in run.lock.json) with their result timestamps and file times,
    and the epoch each unfinished training stage's checkpoint resumes at."""
    finished = lock_stages(run_dir)
    return {
        "finished": set(finished),
        "finished_at": {s: result_of(run_dir, s)["finished_at"] for s in finished},
        "mtimes": {
            s: {rel: (run_dir / s / rel).stat().st_mtime_ns for rel in e["outputs"]} for s, e in finished.items()
        },
        "checkpoints": {
            s: checkpoint_epoch(run_dir / s / "checkpoints" / "last.pt") for s in TRAINED_STAGES if s not in finished
        },
    }


def _check_rerun(run_dir: Path, reference: Path, before: dict[str, Any]) -> None:
    """The rerun skipped what had finished, resumed what had a checkpoint, and matches the reference bit for bit."""
    events = last_run_events(run_dir)
    started = {e["stage"] for e in events if e["event"] == "stage_start"}
    skipped = {e["stage"] for e in events if e["event"] == "stage_skip"}
    assert skipped == before["finished"], f"skipped {skipped}, but {before['finished']} had finished before the kill"
    assert started == set(STAGES) - before["finished"]
    for stage in before["finished"]:  # not redone: same result.json timestamp, output files not rewritten
        assert result_of(run_dir, stage)["finished_at"] == before["finished_at"][stage]
        for rel, mtime in before["mtimes"][stage].items():
            assert (run_dir / stage / rel).stat().st_mtime_ns == mtime, f"{stage}/{rel} was rewritten"
    for stage, epoch in before["checkpoints"].items():
        assert result_of(run_dir, stage)["info"]["resumed_from"] == epoch, f"{stage} did not resume at {epoch}"
    for stage in TRAINED_STAGES:
        assert_same_weights(reference / stage / "model.safetensors", run_dir / stage / "model.safetensors")
    assert (run_dir / "onnx" / "model.onnx").read_bytes() == (reference / "onnx" / "model.onnx").read_bytes()
    assert_consistent(run_dir)


def _kill_and_rerun(config: Path, reference: Path, run_dir: Path, point: KillPoint) -> dict[str, Any] | None:
    """Start a run, SIGKILL it at ``point``, rerun it to the end and check it. None when the run finished first."""
    cwd = run_dir.parent
    proc = start_cli("run", config, "--out", run_dir, cwd=cwd)
    if not kill_at(run_dir, proc, point):
        assert proc.wait() == 0, proc.output[-3000:]
        return None
    assert proc.wait() == -9
    # the dead run's pid is still in the pid file: a stale lock, which the rerun must take over
    assert (run_dir / ".kdpipe.pid").read_text().strip() == str(proc.pid)
    before = _state_after_kill(run_dir)
    code, output = run_cli("run", config, "--out", run_dir, cwd=cwd)
    assert code == 0, output[-3000:]
    _check_rerun(run_dir, reference, before)
    return before


# (kill point, the stage that must be cut short, whether a checkpoint must exist at the kill)
DEFAULT_POINTS = [
    (KillPoint("teacher", "epoch", nth=2), "teacher", True),  # mid teacher training, after >= 1 epoch checkpoint
    (KillPoint("distill", "stage_start", delay_s=0.02), "distill", False),  # distillation's first epoch
    (KillPoint("distill", "epoch", nth=2), "distill", True),  # mid distillation, after >= 1 checkpoint
    (KillPoint("onnx", "stage_start", delay_s=0.05), "onnx", False),  # during the ONNX export
    (KillPoint("bench", "stage_start", delay_s=0.1), "bench", False),  # during the benchmark
]


@pytest.mark.parametrize(
    ("point", "stage", "needs_checkpoint"), DEFAULT_POINTS, ids=[p.label for p, _, _ in DEFAULT_POINTS]
)
def test_sigkill_then_rerun_completes_with_identical_weights(
    config: Path, reference: Path, tmp_path: Path, point: KillPoint, stage: str, needs_checkpoint: bool
) -> None:
    before = _kill_and_rerun(config, reference, tmp_path / "run", point)
    assert before is not None, f"the run finished before {point.label}"
    assert stage not in before["finished"], f"the kill at {point.label} came after {stage} had finished"
    if needs_checkpoint:
        assert before["checkpoints"][stage] is not None and before["checkpoints"][stage] >= 1


@pytest.mark.slow
def test_sigkill_at_random_points(config: Path, reference: Path, tmp_path: Path) -> None:
    """12 seeded random kill points: any event of the reference run (stage starts, every epoch, stage ends) plus a
    random delay of up to 80 ms, so kills land inside training steps, checkpoint writes, exports and benchmarks."""
    rng = random.Random(20240611)
    events = [e for e in read_events(reference) if e["stage"] is not None]
    landed: list[str] = []
    for i in range(12):
        event = rng.choice(events)
        nth = sum(
            1 for e in events[: events.index(event) + 1] if (e["stage"], e["event"]) == (event["stage"], event["event"])
        )
        point = KillPoint(event["stage"], event["event"], nth=nth, delay_s=round(rng.uniform(0.0, 0.08), 3))
        if _kill_and_rerun(config, reference, tmp_path / f"run{i}", point) is not None:
            landed.append(point.label)
    assert len(landed) >= 8, f"only {len(landed)} kills landed before the run ended: {landed}"


@pytest.mark.slow
def test_repeated_sigkills_in_one_run_directory(config: Path, reference: Path, tmp_path: Path) -> None:
    """Kill the run, then kill each rerun too (5 times, at seeded random times), then let it finish."""
    rng = random.Random(7)
    run_dir = tmp_path / "run"
    for _ in range(5):
        proc = start_cli("run", config, "--out", run_dir, cwd=tmp_path)
        time.sleep(rng.uniform(0.3, 2.0))
        proc.kill()
    code, output = run_cli("run", config, "--out", run_dir, cwd=tmp_path)
    assert code == 0, output[-3000:]
    for stage in TRAINED_STAGES:
        assert_same_weights(reference / stage / "model.safetensors", run_dir / stage / "model.safetensors")
    assert_consistent(run_dir)


@pytest.mark.slow
def test_sigkill_of_python_m_kdpipe(config: Path, reference: Path, tmp_path: Path) -> None:
    """The same with a plain ``python -m kdpipe run`` (no fork server): killed during distillation, rerun."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "kdpipe", "run", str(config), "--out", str(run_dir)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if any(e["stage"] == "distill" and e["event"] == "epoch" for e in read_events(run_dir)):
                break
            time.sleep(0.005)
        proc.kill()
    finally:
        proc.wait(60)
    assert proc.returncode == -9
    assert "distill" not in lock_stages(run_dir) and "teacher" in lock_stages(run_dir)
    epoch = checkpoint_epoch(run_dir / "distill" / "checkpoints" / "last.pt")
    rerun = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert result_of(run_dir, "distill")["info"]["resumed_from"] == epoch
    for stage in TRAINED_STAGES:
        assert_same_weights(reference / stage / "model.safetensors", run_dir / stage / "model.safetensors")
    assert_consistent(run_dir)
