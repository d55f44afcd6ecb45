"""Fixtures of the reliability tests: the pipeline config, and finished reference runs made the way every compared
run is made (a forked ``kdpipe run``, one torch thread), shared by the whole session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability._support import KillPoint, checkpoint_epoch, kill_at, pipeline_config, run_cli, start_cli


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder shared by the reliability tests: the config, the reference run, the logs."""
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="session")
def config(workdir: Path) -> Path:
    return pipeline_config(workdir / "stages.yaml")


@pytest.fixture(scope="session")
def reference(workdir: Path, config: Path, cache_dir: Path) -> Path:
    """An uninterrupted run of ``config``: what every interrupted, corrupted or refused-then-fixed run must end as."""
    run_dir = workdir / "reference"
    with pytest.MonkeyPatch.context() as mp:  # session scope: the autouse env fixture is function-scoped
        mp.setenv("KDPIPE_CACHE", str(cache_dir))
        code, output = run_cli("run", config, "--out", run_dir, cwd=workdir)
    assert code == 0, output[-3000:]
    return run_dir


@pytest.fixture(scope="session")
def interrupted(tmp_path_factory: pytest.TempPathFactory, config: Path, cache_dir: Path) -> Path:
    """A run SIGKILLed in the teacher's training after its epoch-1 checkpoint (checkpoints/last.pt)."""
    run_dir = tmp_path_factory.mktemp("interrupted") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDPIPE_CACHE", str(cache_dir))
        proc = start_cli("run", config, "--out", run_dir, cwd=run_dir.parent)
        assert kill_at(run_dir, proc, KillPoint("teacher", "epoch", nth=2))
    assert proc.wait() == -9
    assert checkpoint_epoch(run_dir / "teacher" / "checkpoints" / "last.pt")
    return run_dir
