"""A file cache of decoded uint8 tensors, keyed by where the data came from and how it was decoded.

Decoding CIFAR's 60,000 JPEGs takes seconds per run; reading the decoded tensors back takes a fraction of one.
A cache file is written atomically (``kdpipe.fileio.atomic_open``: temporary file, fsync, rename) so a killed
run never leaves a torn file under the final name, read with ``torch.load(weights_only=True)`` so a planted file
cannot run code, and verified against a stored checksum so a corrupt file is rebuilt rather than trusted. When the
cache folder cannot be written the data is still returned; the run only loses the speed-up.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import PIL
import torch

from kdpipe.fileio import WriteError, atomic_open

logger = logging.getLogger(__name__)

# Bump when the payload layout or the decoding changes, so old files are not mistaken for current ones.
CACHE_FORMAT = 1
ENV_VAR = "KDPIPE_CACHE"


def resolve_cache_dir(explicit: Path | None = None) -> Path:
    """The folder for dataset cache files: ``explicit`` (data.cache_dir), else ``$KDPIPE_CACHE``, else
    ``~/.cache/kdpipe``; the ``data`` subfolder of it, so other kdpipe caches can share the root."""
    if explicit is not None:
        base = Path(explicit).expanduser()
    elif os.environ.get(ENV_VAR):
        base = Path(os.environ[ENV_VAR]).expanduser()
    else:
        base = Path.home() / ".cache" / "kdpipe"
    return base / "data"


def file_identity(path: Path) -> str:
    """Identity of a single file for a cache key: absolute path, size and modification time in nanoseconds.

    Cheaper than hashing the file, and a rewritten or replaced archive changes its size or mtime.
    """
    st = path.stat()
    return f"file:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def listing_identity(path: Path, entries: list[tuple[str, int, int]]) -> str:
    """Identity of a folder for a cache key from ``(relative path, size, mtime_ns)`` of every file it uses."""
    digest = hashlib.sha256()
    for rel, size, mtime_ns in sorted(entries):
        digest.update(f"{rel}\0{size}\0{mtime_ns}\n".encode())
    return f"dir:{path.resolve()}:{len(entries)}:{digest.hexdigest()}"


def _checksum(data: Mapping[str, object]) -> str:
    """SHA-256 over every tensor's bytes and every other value's repr, in key order (about 0.1 s per 150 MB)."""
    digest = hashlib.sha256()
    for key in sorted(data):
        value = data[key]
        digest.update(key.encode())
        if isinstance(value, torch.Tensor):
            digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
            digest.update(value.detach().cpu().contiguous().view(torch.uint8).reshape(-1).numpy().data)
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _read_verified(path: Path, key: str) -> dict[str, object] | None:
    """Return the payload of the cache file at ``path`` if it is intact and was written for ``key``, else None."""
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None
    except Exception as exc:  # a torn or foreign file can fail inside zipfile, pickle or torch in many ways
        logger.warning("cache file %s is unreadable (%s: %s); rebuilding it", path, type(exc).__name__, exc)
        return None
    if not isinstance(stored, dict) or stored.get("format") != CACHE_FORMAT or stored.get("key") != key:
        logger.info("cache file %s was written for another source or format; rebuilding it", path)
        return None
    data = stored.get("data")
    if not isinstance(data, dict) or stored.get("checksum") != _checksum(data):
        logger.warning("cache file %s fails its checksum; rebuilding it", path)
        return None
    return data


def cache_path(cache_dir: Path, *, kind: str, source: Path, variant: str, identity: str) -> Path:
    """Where the cache file for this source/variant/identity lives.

    The name is ``<kind>-<hash of source and variant>-<hash of the full key>.pt``: the first hash groups the
    versions of one dataset so stale ones can be pruned, the second changes whenever the source changes.
    """
    key = _cache_key(kind=kind, variant=variant, identity=identity)
    return cache_dir / f"{kind}-{_short_hash(f'{source.resolve()}|{variant}')}-{_short_hash(key)}.pt"


def _cache_key(*, kind: str, variant: str, identity: str) -> str:
    # The Pillow version is part of the key: a different libjpeg can decode a few pixel values differently.
    return f"kdpipe-data/{CACHE_FORMAT}|{kind}|{variant}|{identity}|torch={torch.__version__}|pil={PIL.__version__}"


def load_or_build(
    cache_dir: Path,
    *,
    kind: str,
    source: Path,
    variant: str,
    identity: str,
    build: Callable[[], dict[str, object]],
) -> dict[str, object]:
    """Return the cached payload for (kind, source, variant, identity), building and storing it on a miss.

    ``variant`` names how the data was decoded (e.g. ``size=32``); ``identity`` changes when the source changes
    (``file_identity`` / ``listing_identity``). ``build`` returns a dict of tensors and plain values. After a
    successful write, older cache files of the same source and variant are deleted.
    """
    key = _cache_key(kind=kind, variant=variant, identity=identity)
    path = cache_path(cache_dir, kind=kind, source=source, variant=variant, identity=identity)
    start = time.perf_counter()
    data = _read_verified(path, key)
    if data is not None:
        logger.info("loaded %s from cache %s in %.2f s", source, path, time.perf_counter() - start)
        return data
    data = build()
    logger.debug("built %s in %.2f s", source, time.perf_counter() - start)
    payload = {"format": CACHE_FORMAT, "key": key, "checksum": _checksum(data), "data": data}
    try:
        with atomic_open(path, "wb") as handle:
            torch.save(payload, handle)
    except WriteError as exc:
        # Log the OS's own reason (fileio's WriteError wraps it), as this warning always has.
        logger.warning("could not write dataset cache %s (%s); continuing without it", path, exc.__cause__ or exc)
        return data
    prefix = path.name.rsplit("-", 1)[0] + "-"
    for stale in path.parent.glob(f"{prefix}*.pt"):
        if stale != path:
            stale.unlink(missing_ok=True)
            logger.info("removed stale cache file %s", stale)
    return data
