"""A stage's fingerprint: everything its result depends on, hashed. run.lock.json records it per stage; a stage
whose fingerprint and output hashes still match is skipped.

The fingerprint covers the stage's own resolved config, the fingerprints of the stages it depends on, the data
config and the identity of the data files (so a dataset changed in place reruns), the seed, the identity of other
input files a stage reads (``Stage.input_files``, e.g. a teacher checkpoint), and the versions of kdpipe, torch and
timm. Identity is path, size and modification time, never content.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch

import kdpipe
from kdpipe.config import LoadedConfig
from kdpipe.data.cache import file_identity
from kdpipe.fileio import sha256_json
from kdpipe.pipeline.graph import Node


def fingerprint(node: Node, loaded: LoadedConfig, upstream_fps: dict[str, str], data_files: str | None = None) -> str:
    """What a stage's result depends on. ``data_files`` is :func:`kdpipe.data.splits.data_identity` of the run."""
    cfg = loaded.config
    return sha256_json(
        {
            "type": node.type,
            "params": node.config.model_dump(mode="json", exclude={"needs"}),
            "needs": {dep: upstream_fps[dep] for dep in node.needs},
            # How batches are read (memory or stream, workers) does not change them: not part of the fingerprint.
            "data": cfg.data.model_dump(mode="json", exclude={"loader", "workers", "prefetch"}),
            "data_files": data_files,
            "seed": cfg.seed,
            "inputs": [_file_identity(path) for path in node.stage_cls.input_files(node.config)],
            "versions": {"kdpipe": kdpipe.__version__, "torch": torch.__version__, "timm": timm.__version__},
        }
    )


def _file_identity(path: Path) -> str:
    """Path, size and modification time of an input file (a missing one is caught by the stage's preflight)."""
    try:
        return file_identity(Path(path))
    except OSError:
        return f"missing:{path}"
