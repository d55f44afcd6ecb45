"""Two ``kdpipe run`` on one run directory, as separate processes: the first runs, the second exits 2 at once
(naming the first's pid) and touches nothing. A lock left by a dead process (its pid still in .kdpipe.pid) is
taken over: the lock is an flock the kernel drops when its holder dies, the pid file is only for the message."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.reliability._support import (
    assert_consistent,
    error_lines,
    pipeline_config,
    read_events,
    run_cli,
    start_cli,
    watch_events,
)


@pytest.fixture
def long_config(tmp_path: Path) -> Path:
    """Long enough (30 teacher epochs, ~2.5 s here) that a second command starts while the first is training."""
    return pipeline_config(tmp_path / "stages.yaml", epochs=30, bench_s=0.01)


def test_second_run_on_the_same_directory_exits_2_at_once(long_config: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = start_cli("run", long_config, "--out", run_dir, "--set", "stages.distill.train.epochs=1", cwd=tmp_path)
    assert watch_events(run_dir, first, lambda e: e["event"] == "epoch"), first.output[-3000:]
    started = time.monotonic()
    code, output = run_cli("run", long_config, "--out", run_dir, cwd=tmp_path, timeout=60)
    waited = time.monotonic() - started
    assert first.alive(), "the first run ended before the second was refused: the test proves nothing"
    assert code == 2, output
    (error,) = error_lines(output)
    assert error == f"error: run directory {run_dir} is in use by another kdpipe run (pid {first.pid})"
    assert "--out DIR" in output and "Traceback" not in output
    assert waited < 30, f"the second run took {waited:.1f}s to give up: it waited for the lock"
    assert first.wait() == 0, first.output[-3000:]
    assert [e["event"] for e in read_events(run_dir)].count("run_start") == 1  # the second one wrote nothing
    assert_consistent(run_dir)


@pytest.mark.slow
def test_second_run_refused_with_python_m_kdpipe(long_config: Path, tmp_path: Path) -> None:
    """The same with a plain ``python -m kdpipe`` as the second command (no fork server)."""
    run_dir = tmp_path / "run"
    first = start_cli(
        "run", long_config, "--out", run_dir, "--set", "stages.teacher.weights.train.epochs=300", cwd=tmp_path
    )
    try:
        assert watch_events(run_dir, first, lambda e: e["event"] == "epoch")
        second = subprocess.run(
            [sys.executable, "-m", "kdpipe", "run", str(long_config), "--out", str(run_dir)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert first.alive()
        assert second.returncode == 2, second.stderr
        assert f"is in use by another kdpipe run (pid {first.pid})" in second.stderr
    finally:
        first.kill()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("holder", ["dead-process", "live-non-kdpipe-process"])
def test_stale_pid_file_is_taken_over(tmp_path: Path, holder: str) -> None:
    """.kdpipe.pid names a process that holds no lock (dead, or alive but not a kdpipe run, e.g. a reused pid)."""
    config = pipeline_config(tmp_path / "stages.yaml", epochs=1, bench_s=0.01)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stale = _dead_pid() if holder == "dead-process" else 1
    (run_dir / ".kdpipe.pid").write_text(f"{stale}\n")
    proc = start_cli("run", config, "--out", run_dir, cwd=tmp_path)
    assert proc.wait() == 0, proc.output[-3000:]
    assert (run_dir / ".kdpipe.pid").read_text().strip() == str(proc.pid)
    assert_consistent(run_dir)
