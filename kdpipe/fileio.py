"""Crash-safe file writes and content hashes. Every file kdpipe writes into a run directory goes through here,
so an interrupted or failed run never leaves a half-written file where a complete one is expected.

A write goes to a temporary file in the target's folder, which is fsynced and renamed over the target; the folder
is then fsynced too, so after a power loss the target holds the old content or the new, never a torn file."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from kdpipe.errors import KdpipeError


class WriteError(KdpipeError):
    """The output location cannot be written (disk full, read-only, permissions). Exit 5."""

    exit_code = 5


def write_error(path: Path, exc: OSError) -> WriteError:
    """The error for a failed write: names the path and the likely fix (space, permissions)."""
    return WriteError(f"cannot write {path}: {exc.strerror or exc}", hint="check free space and permissions")


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temp file next to ``path``; on success fsync it and rename it over ``path`` in one step."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_temps(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise write_error(path, exc) from exc
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise write_error(path, exc) from exc
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as fh:
        fh.write(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_with(path: str | Path, writer: Callable[[Path], None]) -> None:
    """For libraries that insist on writing to a path themselves (torch.save, safetensors, onnx.save): let
    ``writer`` write a temp path in the same folder, then fsync and rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_temps(path)
        writer(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise write_error(path, exc) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _remove_dead_temps(path: Path) -> None:
    """Delete the temporary files of ``path`` that a writer killed mid-write (SIGKILL, OOM killer) left behind. Their
    names carry the writer's pid (``.<name>.<pid>.[...]tmp``); one whose writer is alive (a concurrent write) stays."""
    prefix = f".{path.name}."
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent):
            if not (entry.name.startswith(prefix) and entry.name.endswith(".tmp")):
                continue
            pid = entry.name[len(prefix) :].split(".", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: a live process of another user
        return True
    return True


def _fsync_dir(folder: Path) -> None:
    # The rename lives in the folder's entry table: without this fsync a power loss can undo it even though the
    # file's data was synced. Best effort: the file is already in place, and some platforms and filesystems
    # (Windows, some network mounts) refuse to open or fsync a directory.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def zip_damage(path: str | Path) -> str | None:
    """Why the zip archive at ``path`` (the format of ``torch.save``) is damaged: unreadable, truncated, or a member
    whose bytes fail its CRC-32; None when intact. ``torch.load`` checks none of this and would load flipped bits.
    A file saved without checksums (torch's ``compute_crc32=False``: every CRC is 0) cannot be checked: None."""
    try:
        with zipfile.ZipFile(path) as archive:
            if all(info.CRC == 0 for info in archive.infolist() if info.file_size):
                return None
            bad = archive.testzip()
    except Exception as exc:  # BadZipFile, EOFError, OSError, ...: a torn file fails in many ways
        return f"not a readable zip archive: {type(exc).__name__}: {exc}"
    return None if bad is None else f"its member {bad} fails its CRC-32 check"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Stable hash of a JSON-able object (sorted keys), used for fingerprints."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
