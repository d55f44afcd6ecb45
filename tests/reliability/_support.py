"""Shared machinery of the reliability tests: a small pipeline that exercises every long-running stage type, the
``kdpipe`` command run as a real (forked) process that can be SIGKILLed, a watcher of ``events.jsonl`` that fires
kills at chosen points, and a disk-fault injector (ENOSPC / EROFS at the k-th write).

Why forked processes: ``python -m kdpipe`` pays 10-15 s of imports (torch, timm, onnx) on a busy 2-core machine
before it does anything, so a dozen kill-and-rerun cycles would cost minutes. A ``multiprocessing`` fork server
imports the heavy libraries once (and never runs a torch op, so forking it is safe); each ``kdpipe run`` is then a
fresh child process that runs the real command-line entry point (``kdpipe.cli``), has its own pid, file descriptors
and flock, and dies for real under ``SIGKILL``. One slow test also kills a plain ``python -m kdpipe`` to show the
fork server changes nothing that matters.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import json
import multiprocessing
import os
import signal
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import IO, Any

import pytest
import torch
from safetensors.torch import load_file

# --------------------------------------------------------------------------------------------------------------------
# The pipeline under test
# --------------------------------------------------------------------------------------------------------------------

PIPELINE = """\
version: 1
name: reliability
seed: 0
device: cpu
data: {{kind: synthetic, num_classes: 4, num_samples: {samples}, image_size: 8, augment: none, val_fraction: 0.0}}
stages:
  teacher:
    type: teacher
    model: resnet8
    weights: {{train: {{epochs: {epochs}, batch_size: 32, lr: 0.05}}}}
  distill:
    type: distill
    student: resnet8
    method: {{name: kd, temperature: 4.0}}
    train: {{epochs: {epochs}, batch_size: 32, lr: 0.05}}
  onnx:
    type: export
    format: onnx
    simplify: false
  bench:
    type: benchmark
    backends: [torch, onnxruntime]
    batch_sizes: [1, 4]
    warmup: 2
    min_iterations: 20
    min_time_s: {bench_s}
"""
"""teacher (trained) -> distill -> ONNX export -> benchmark: every stage kind that runs for a while. The benchmark
is timed for at least 0.05 s per cell, so a kill can land inside it."""

TEACHER_FROM_CHECKPOINT = """\
version: 1
name: untrusted
seed: 0
device: cpu
data: {{kind: synthetic, num_classes: 4, num_samples: 64, image_size: 8, augment: none, val_fraction: 0.0}}
stages:
  teacher:
    type: teacher
    model: resnet8
    weights: {{checkpoint: {checkpoint}}}
"""
"""A teacher-only pipeline whose weights come from ``checkpoint`` (a path relative to the config)."""

TRAINED_STAGES = ("teacher", "distill")
STAGES = ("teacher", "distill", "onnx", "bench")


def pipeline_config(path: Path, *, epochs: int = 4, samples: int = 128, bench_s: float = 0.05) -> Path:
    """Write the reliability pipeline to ``path`` (``samples / 32`` optimizer steps per epoch, each benchmark cell
    timed for ``bench_s``) and return it."""
    path.write_text(PIPELINE.format(epochs=epochs, samples=samples, bench_s=bench_s), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------------------------
# Run directory inspection
# --------------------------------------------------------------------------------------------------------------------


def read_events(run_dir: Path) -> list[dict[str, Any]]:
    """Every complete line of events.jsonl (a torn last line would fail json.loads: the test then fails)."""
    path = run_dir / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def last_run_events(run_dir: Path) -> list[dict[str, Any]]:
    """The events of the latest ``kdpipe run`` (from its ``run_start``)."""
    events = read_events(run_dir)
    starts = [i for i, e in enumerate(events) if e["event"] == "run_start"]
    return events[starts[-1] :] if starts else []


def lock_stages(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "run.lock.json"
    return dict(json.loads(path.read_text(encoding="utf-8"))["stages"]) if path.exists() else {}


def result_of(run_dir: Path, stage: str) -> dict[str, Any]:
    return dict(json.loads((run_dir / stage / "result.json").read_text(encoding="utf-8")))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def assert_same_weights(reference: Path, candidate: Path) -> None:
    """Bitwise equality of two safetensors files' tensors (metadata such as the fingerprint may differ)."""
    a, b = weights(reference), weights(candidate)
    assert a.keys() == b.keys(), f"{candidate}: other tensors than {reference}"
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{candidate} differs from {reference} in {len(differ)} tensors, e.g. {differ[:3]}"


def assert_consistent(run_dir: Path, stages: tuple[str, ...] = STAGES) -> None:
    """The run directory is complete and self-consistent: every stage is in the lock with status ok, every output it
    recorded still has the recorded hash (so an unchanged rerun skips everything), no temporary file of an
    interrupted atomic write is left behind, and events.jsonl has no torn line."""
    from kdpipe.pipeline.rundir import outputs_intact

    lock = lock_stages(run_dir)
    assert sorted(lock) == sorted(stages), f"lock holds {sorted(lock)}"
    for name, entry in lock.items():
        assert entry["status"] == "ok", name
        assert outputs_intact(run_dir / name, entry["outputs"]), f"{name}: outputs do not match run.lock.json"
    leftovers = [str(p.relative_to(run_dir)) for p in run_dir.rglob("*.tmp")]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    read_events(run_dir)


# --------------------------------------------------------------------------------------------------------------------
# Disk faults: ENOSPC / EROFS from the k-th write on
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FaultSpec:
    """From the ``fail_from``-th write on (1-based), or from the first write to a path containing ``match``, every
    write fails with ``code`` (a full disk stays full). Neither given: the writes are only counted."""

    fail_from: int | None = None
    code: int = errno.ENOSPC
    match: str | None = None


@dataclass
class DiskFault:
    """Counts (and fails) the writes kdpipe makes to a run directory, at the two places all of them pass:

    - ``kdpipe.fileio``: every atomic write (text, JSON, torch.save, safetensors, ONNX) fsyncs its temporary file
      before the rename; the fault is raised there, after the data went to the temporary file, as a full disk
      does at write/fsync time, so the cleanup of the temporary file is exercised too.
    - ``kdpipe.pipeline.rundir``: the appends to events.jsonl and the pid file of the writer lock.
    """

    spec: FaultSpec
    writes: list[str] = field(default_factory=list)
    failing: bool = False

    def check(self, path: str) -> None:
        self.writes.append(path)
        spec = self.spec
        if spec.fail_from is not None and len(self.writes) >= spec.fail_from:
            self.failing = True
        if spec.match is not None and spec.match in path:
            self.failing = True
        if self.failing:
            raise OSError(spec.code, os.strerror(spec.code), path)

    def install(self, monkeypatch: pytest.MonkeyPatch | None) -> None:
        """Patch kdpipe, undone with ``monkeypatch`` (in-process), or for good (``None``, in a child process)."""
        import kdpipe.fileio
        import kdpipe.pipeline.rundir

        def faulty_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> IO[Any]:
            if any(c in mode for c in "wax+"):
                self.check(str(file))
            return builtins.open(file, mode, *args, **kwargs)

        patches: list[tuple[object, str, object]] = [
            (kdpipe.fileio, "os", _FaultyOs(self)),
            (kdpipe.pipeline.rundir, "open", faulty_open),  # shadows the builtin in that module only
        ]
        for target, name, value in patches:
            if monkeypatch is None:
                setattr(target, name, value)
            else:
                monkeypatch.setattr(target, name, value, raising=False)


class _FaultyOs:
    """``os`` for kdpipe.fileio, whose ``fsync`` of a regular file is a write that may fail."""

    def __init__(self, fault: DiskFault) -> None:
        self._fault = fault

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def fsync(self, fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            self._fault.check(os.readlink(f"/proc/self/fd/{fd}"))
        os.fsync(fd)


# --------------------------------------------------------------------------------------------------------------------
# `kdpipe` as a real process (forked from a fork server that has the heavy imports done)
# --------------------------------------------------------------------------------------------------------------------

_PRELOAD = [
    "torch",
    "timm",
    "onnx",
    "onnxruntime",
    "safetensors.torch",
    "matplotlib",
    "matplotlib.pyplot",
    "kdpipe.stages",
    "kdpipe.pipeline.runner",
    "kdpipe.exports",
    "kdpipe.bench",
    "kdpipe.cli",
]


def _context() -> Any:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _child(argv: list[str], cwd: str, log: str, env: dict[str, str], fault: FaultSpec | None) -> None:
    """Body of a forked ``kdpipe`` process: stdout and stderr to ``log``, then the real entry point."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.clear()  # the caller's environment at start_cli time, not the fork server's
    os.environ.update(env)
    os.chdir(cwd)
    torch.set_num_threads(1)  # lean on a shared machine; every compared run is made the same way
    if fault is not None:
        DiskFault(fault).install(None)
    from kdpipe.cli import cli

    cli.main(args=argv, prog_name="kdpipe")  # exits (SystemExit) with kdpipe's exit code


@dataclass
class CliProcess:
    """A running ``kdpipe`` command."""

    process: BaseProcess
    log: Path

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    @property
    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.process.is_alive()

    def wait(self, timeout: float = 300.0) -> int:
        """Its exit code (-9 when SIGKILLed); a process still running after ``timeout`` is killed and fails the test."""
        self.process.join(timeout)
        if self.process.is_alive():
            self.kill()
            raise AssertionError(f"kdpipe (pid {self.pid}) still running after {timeout}s:\n{self.output[-3000:]}")
        code = self.process.exitcode
        assert code is not None
        return code

    def kill(self) -> None:
        """SIGKILL: no handler runs, no checkpoint is written, nothing is flushed or cleaned up."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self.process.join(60)


def start_cli(*args: str | Path, cwd: Path, fault: FaultSpec | None = None) -> CliProcess:
    """Start ``kdpipe ARGS`` in a new process (its output goes to a log file in ``cwd``)."""
    log = cwd / f"kdpipe-{time.monotonic_ns()}.log"
    env = {**os.environ, "COLUMNS": "200"}
    process = _context().Process(target=_child, args=([str(a) for a in args], str(cwd), str(log), env, fault))
    process.start()
    return CliProcess(process, log)


def run_cli(*args: str | Path, cwd: Path, fault: FaultSpec | None = None, timeout: float = 300.0) -> tuple[int, str]:
    """Run ``kdpipe ARGS`` to the end; returns (exit code, stdout+stderr)."""
    proc = start_cli(*args, cwd=cwd, fault=fault)
    code = proc.wait(timeout)
    return code, proc.output


def mentions(output: str, text: str) -> bool:
    """``text`` (a path, a phrase) is in ``output`` even where the terminal renderer wrapped it across lines."""
    return "".join(text.split()) in "".join(output.split())


def error_lines(output: str) -> list[str]:
    """The ``error: ...`` lines kdpipe prints for a KdpipeError."""
    return [line for line in output.splitlines() if line.startswith("error: ")]


# --------------------------------------------------------------------------------------------------------------------
# Kill points: SIGKILL a running `kdpipe run` when its event log reaches a chosen point
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KillPoint:
    """Kill when the ``nth`` event named ``event`` of ``stage`` is logged, then ``delay_s`` later."""

    stage: str
    event: str
    nth: int = 1
    delay_s: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.stage}-{self.event}{self.nth}+{self.delay_s:.2f}s"


def watch_events(run_dir: Path, proc: CliProcess, predicate: Callable[[dict[str, Any]], bool]) -> bool:
    """Poll events.jsonl (every 2 ms) until ``predicate`` holds for a new event (True) or the process exits (False)."""
    path = run_dir / "events.jsonl"
    offset = 0
    pending = b""
    while True:
        alive = proc.alive()
        with contextlib.suppress(FileNotFoundError), open(path, "rb") as fh:
            fh.seek(offset)
            chunk = fh.read()
            offset += len(chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            if any(predicate(json.loads(line)) for line in lines if line):
                return True
        if not alive:
            return False
        time.sleep(0.002)


def kill_at(run_dir: Path, proc: CliProcess, point: KillPoint) -> bool:
    """SIGKILL ``proc`` at ``point``; False when the run ended before the point was reached."""
    seen = 0

    def reached(event: dict[str, Any]) -> bool:
        nonlocal seen
        if event.get("stage") == point.stage and event.get("event") == point.event:
            seen += 1
        return seen >= point.nth

    if not watch_events(run_dir, proc, reached):
        return False
    if point.delay_s:
        time.sleep(point.delay_s)
    if not proc.alive():
        return False
    proc.kill()
    return True


def checkpoint_epoch(path: Path) -> int | None:
    """The epoch a trainer checkpoint resumes at (None when there is none)."""
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["step"] == 0, "SIGKILL leaves only per-epoch checkpoints"
    return int(state["epoch"])


@contextlib.contextmanager
def chdir(path: Path) -> Iterator[None]:
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Invert one byte (default: the middle one), keeping the size: bit rot, not truncation."""
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def flip_zip_tensor_byte(path: Path) -> None:
    """Invert one byte inside the largest member of a ``torch.save`` zip (tensor data, not the pickle), where
    ``torch.load`` notices nothing."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        header = fh.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    flip_byte(path, info.header_offset + 30 + name_len + extra_len + info.file_size // 2)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
