"""A full disk (ENOSPC) or a read-only output directory (EROFS, EACCES) at any write of a run: the run stops with
exit 5 and one ``error:`` line naming the path it could not write, the run directory stays consistent (no torn or
temporary file, nothing recorded as finished that is not), and once space is freed the same command completes with
the same weights as a run that never failed.

The fault is injected in-process (tests may run as root, where permissions do not stop a write, and a tiny tmpfs
needs root to mount): every write kdpipe makes to a run directory goes through kdpipe.fileio or the run
directory's event/pid files, and ``DiskFault`` fails all of them from the k-th on, as a disk that filled up would.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

import pytest

import kdpipe.stages  # noqa: F401  (registers the stage types)
from kdpipe.config import load_config
from kdpipe.errors import KdpipeError
from kdpipe.pipeline.rundir import outputs_intact
from kdpipe.pipeline.runner import Runner
from tests.reliability._support import (
    STAGES,
    TRAINED_STAGES,
    DiskFault,
    FaultSpec,
    assert_consistent,
    assert_same_weights,
    error_lines,
    last_run_events,
    lock_stages,
    pipeline_config,
    read_events,
    run_cli,
)

MESSAGES = {
    errno.ENOSPC: "No space left on device",
    errno.EROFS: "Read-only file system",
    errno.EACCES: "Permission denied",
}


def run(config: Path, run_dir: Path) -> None:
    Runner(load_config(config), run_dir).run()


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[Path, Path, list[str]]:
    """The pipeline with a short benchmark, an uninterrupted in-process reference run of it, and the writes that
    run made, in order."""
    root = tmp_path_factory.mktemp("disk")
    config = pipeline_config(root / "stages.yaml", bench_s=0.01)
    counter = DiskFault(FaultSpec())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDPIPE_CACHE", str(cache_dir))
        counter.install(mp)
        run(config, root / "reference")
    return config, root / "reference", [os.path.relpath(w, root / "reference") for w in counter.writes]


def _fail_and_recover(
    config: Path, reference: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch, spec: FaultSpec
) -> str:
    """Run with the fault, check the error and the run directory, rerun without it; returns the error message."""
    fault = DiskFault(spec)
    with monkeypatch.context() as mp:
        fault.install(mp)
        with pytest.raises(KdpipeError) as info:
            run(config, run_dir)
    message = str(info.value)
    assert info.value.exit_code == 5, message
    failed = re.search(rf"cannot write (\S+): {MESSAGES[spec.code]}", message)
    assert failed, message
    assert Path(failed.group(1)).is_relative_to(run_dir), message
    assert "check free space and permissions" in message
    # consistent although the disk is still full: what the lock records as finished is intact, nothing is torn
    lock = lock_stages(run_dir)
    for stage, entry in lock.items():
        assert outputs_intact(run_dir / stage, entry["outputs"]), stage
    assert not run_dir.exists() or not list(run_dir.rglob("*.tmp"))
    read_events(run_dir)
    # space freed: the same run completes, redoing only what had not finished
    run(config, run_dir)
    started = {e["stage"] for e in last_run_events(run_dir) if e["event"] == "stage_start"}
    assert started == set(STAGES) - set(lock)
    for stage in TRAINED_STAGES:
        assert_same_weights(reference / stage / "model.safetensors", run_dir / stage / "model.safetensors")
    assert_consistent(run_dir)
    return message


def _first(writes: list[str], fragment: str) -> int:
    """1-based index of the first write whose path contains ``fragment``."""
    return next(i for i, w in enumerate(writes, start=1) if fragment in w)


# The first write of each kind: the lock, the run files, an event, a training checkpoint, a stage's weights,
# result.json, run.lock.json, the ONNX file, the benchmark report. Four of them run in the default suite.
DEFAULT_POINTS = [
    "teacher/checkpoints/.last.pt",
    "distill/.model.safetensors",
    ".run.lock.json",
    "onnx/.model.fp32.onnx",
]
MORE_POINTS = [".kdpipe.pid", "resolved.yaml", "events.jsonl", "teacher/.result.json", "bench/"]


@pytest.mark.parametrize("fragment", [*DEFAULT_POINTS, *(pytest.param(p, marks=pytest.mark.slow) for p in MORE_POINTS)])
def test_disk_full_at_each_kind_of_write(
    quick: tuple[Path, Path, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fragment: str
) -> None:
    config, reference, writes = quick
    _fail_and_recover(config, reference, tmp_path / "run", monkeypatch, FaultSpec(_first(writes, fragment)))


@pytest.mark.parametrize(
    "fragment",
    [
        ".kdpipe.pid",
        *(pytest.param(p, marks=pytest.mark.slow) for p in ("distill/.model.safetensors", ".run.lock.json")),
    ],
)
def test_read_only_output_at_each_kind_of_write(
    quick: tuple[Path, Path, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fragment: str
) -> None:
    config, reference, writes = quick
    spec = FaultSpec(_first(writes, fragment), code=errno.EROFS)
    _fail_and_recover(config, reference, tmp_path / "run", monkeypatch, spec)


def test_disk_full_error_names_the_file_that_failed(
    quick: tuple[Path, Path, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, reference, writes = quick
    message = _fail_and_recover(
        config, reference, tmp_path / "run", monkeypatch, FaultSpec(_first(writes, "teacher/checkpoints/.last.pt"))
    )
    assert "checkpoints/last.pt" in message


@pytest.mark.slow
def test_disk_full_at_every_write(
    quick: tuple[Path, Path, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every k from the first write to the last, ENOSPC from the k-th write on."""
    config, reference, writes = quick
    assert len(writes) > 30
    for k in range(1, len(writes) + 1):
        _fail_and_recover(config, reference, tmp_path / f"run{k}", monkeypatch, FaultSpec(k))


@pytest.mark.parametrize(
    ("match", "code"),
    [
        ("teacher/checkpoints/.last.pt", errno.ENOSPC),
        pytest.param(".kdpipe.pid", errno.EROFS, marks=pytest.mark.slow),
    ],
    ids=["enospc-checkpoint", "erofs-lock"],
)
def test_cli_reports_one_line_and_exit_5(
    quick: tuple[Path, Path, list[str]], tmp_path: Path, match: str, code: int
) -> None:
    """As a user sees it: ``kdpipe run`` exits 5 with one error line naming the path, then resumes when fixed."""
    config, _, _ = quick
    run_dir = tmp_path / "run"
    status, output = run_cli("run", config, "--out", run_dir, cwd=tmp_path, fault=FaultSpec(code=code, match=match))
    assert status == 5, output
    (error,) = error_lines(output)
    assert re.search(rf"cannot write {re.escape(str(run_dir))}\S*: {MESSAGES[code]}$", error), error
    assert "Traceback" not in output and "to resume: kdpipe run" in " ".join(output.split())
    status, output = run_cli("run", config, "--out", run_dir, cwd=tmp_path)
    assert status == 0, output[-3000:]
    assert_consistent(run_dir)


@pytest.mark.skipif(
    os.geteuid() == 0,
    reason="running as root: permissions do not stop root's writes (the EROFS/EACCES injection above covers it)",
)
def test_chmod_read_only_run_directory(quick: tuple[Path, Path, list[str]], tmp_path: Path) -> None:
    """A real read-only run directory (as a non-root user): a forced rerun fails cleanly, then works when writable."""
    config, reference, _ = quick
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    modes = {p: p.stat().st_mode for p in [run_dir, *run_dir.rglob("*")]}
    for path in modes:
        path.chmod(modes[path] & ~0o222)
    try:
        status, output = run_cli("run", config, "--out", run_dir, "--force", cwd=tmp_path)
    finally:
        for path, mode in modes.items():
            path.chmod(mode)
    assert status == 5, output
    (error,) = error_lines(output)
    assert f"cannot write {run_dir}" in error and "Permission denied" in error
    status, output = run_cli("run", config, "--out", run_dir, "--force", cwd=tmp_path)
    assert status == 0, output[-3000:]
    assert_consistent(run_dir)
