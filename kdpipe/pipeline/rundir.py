"""The run directory: its layout, the single-writer lock, the event log and the stage lock file (run.lock.json).

runs/<name>/
  resolved.yaml        the config with every default filled in
  environment.json     versions, device, git SHA, command line
  events.jsonl         one JSON object per line: stage start/end/skip/fail, per-epoch metrics
  run.lock.json        per stage: fingerprint, output hashes, status, duration
  summary.json         the run's outcome for machines (kdpipe.pipeline.summary), rewritten at the end of every run
  <stage>/             one folder per stage with its artifacts and result.json
  <sweep>/<candidate>/ a sweep's sub-run: its stages' folders, and its own run.lock.json, events.jsonl,
                       summary.json and .kdpipe.pid (kdpipe run --only <sweep>/<candidate> works there)
  .kdpipe.pid          held (flock) by the live ``kdpipe run``; holds its pid
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from kdpipe.errors import RunLocked
from kdpipe.fileio import atomic_write_json, sha256_file, write_error

log = logging.getLogger(__name__)

LOCK_VERSION = 1


class RunDir:
    """Paths and bookkeeping files of one run directory. Use as a context manager to hold the writer lock."""

    def __init__(self, root: str | Path, *, shared: bool = False) -> None:
        self.root = Path(root)
        self.shared = shared
        """Hold the writer lock shared: several sub-runs (``kdpipe run --only <sweep>/<candidate>``, each holding its
        own sub-run directory exclusively) may work under one run directory at once, while a whole run, which holds
        it exclusively, waits for none of them and is refused while any runs."""
        self._lock_fh: IO[str] | None = None
        self.sinks: list[Callable[[dict[str, Any]], None]] = []
        """Called with every event after it is appended (experiment tracking, the run summary). A sink that raises
        is logged and otherwise ignored: the event log is the record, sinks are extras."""

    # -- layout --------------------------------------------------------------------------------------------------
    @property
    def lock_file(self) -> Path:
        return self.root / "run.lock.json"

    @property
    def events_file(self) -> Path:
        return self.root / "events.jsonl"

    def stage_dir(self, name: str) -> Path:
        return self.root / name

    # -- single writer -------------------------------------------------------------------------------------------
    def __enter__(self) -> RunDir:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fh = open(self.root / ".kdpipe.pid", "a+", encoding="utf-8")  # held open for the whole run
        except OSError as exc:
            raise write_error(self.root, exc) from exc
        try:
            # flock is released by the kernel when the holder dies, so a stale lock from a killed run never blocks.
            fcntl.flock(fh.fileno(), (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise RunLocked(
                f"run directory {self.root} is in use by another kdpipe run (pid {holder})",
                hint="wait for it to finish, or write this run elsewhere with --out DIR",
            ) from None
        if not self.shared:  # a shared holder leaves the pid of the last exclusive one
            fh.seek(0)
            fh.truncate()
            fh.write(f"{os.getpid()}\n")
            fh.flush()
        self._lock_fh = fh
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock_fh is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fh.fileno(), fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    # -- events --------------------------------------------------------------------------------------------------
    def event(self, stage: str | None, event: str, **fields: Any) -> None:
        """Append one event line. Appends of one short line are atomic enough for a single writer."""
        record = {"time": time.time(), "stage": stage, "event": event, **fields}
        try:
            with open(self.events_file, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record, default=str, sort_keys=True) + "\n")
        except OSError as exc:
            raise write_error(self.events_file, exc) from exc
        for sink in self.sinks:
            try:
                sink(record)
            except Exception:
                log.warning("an event sink failed on %s/%s; the run goes on", stage, event, exc_info=True)

    # -- stage lock ----------------------------------------------------------------------------------------------
    def read_lock(self) -> dict[str, Any]:
        """The stage records; an unreadable or foreign lock file counts as empty (every stage reruns)."""
        try:
            data = json.loads(self.lock_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("version") != LOCK_VERSION:
            return {}
        if not isinstance(data.get("stages"), dict):
            return {}
        return dict(data["stages"])

    def write_lock(self, stages: dict[str, Any]) -> None:
        atomic_write_json(self.lock_file, {"version": LOCK_VERSION, "stages": stages})


def hash_outputs(stage_dir: Path, relpaths: list[str]) -> dict[str, str]:
    """sha256 of each listed file (relative to ``stage_dir``)."""
    return {rel: sha256_file(stage_dir / rel) for rel in sorted(relpaths)}


def outputs_intact(stage_dir: Path, recorded: dict[str, str]) -> bool:
    """True when every recorded output still exists with the recorded hash."""
    for rel, digest in recorded.items():
        path = stage_dir / rel
        if not path.is_file():
            return False
        try:
            if sha256_file(path) != digest:
                return False
        except OSError:
            return False
    return True
