"""Parts 1 and 2: the carried wheels installed into a private folder, what imports from where, and the environment
record (versions, CPU, GPU, commit, and the CUDA facts: capability, memory, cuDNN, NCCL, bf16 support)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from _common import environment

from .context import Acceptance
from .core import REPO, PartRecord

IMPORTS = (
    "torch",
    "torchvision",
    "timm",
    "numpy",
    "onnx",
    "onnxruntime",
    "onnxslim",
    "pydantic",
    "tritonclient",
    "modelopt",
    "tensorrt",
    "kdpipe.config",
)
"""Modules whose import is recorded (kdpipe through kdpipe.config, which needs pydantic)."""


def importable_versions() -> dict[str, dict[str, Any]]:
    """Which of ``IMPORTS`` import in this interpreter: version, the distribution that provides it (onnxruntime or
    onnxruntime-gpu), its folder, and onnxruntime's execution providers."""
    import importlib.metadata

    distributions = importlib.metadata.packages_distributions()
    found: dict[str, dict[str, Any]] = {}
    for name in IMPORTS:
        key = "kdpipe" if name == "kdpipe.config" else name
        try:
            importlib.import_module(name)
        except Exception as exc:  # ImportError, or OSError from a wheel whose native libraries are missing
            found[key] = {"importable": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
            continue
        top = importlib.import_module(key)
        where = getattr(top, "__file__", None)
        dists = distributions.get(key, [])
        version = getattr(top, "__version__", None) or (importlib.metadata.version(dists[0]) if dists else "unknown")
        found[key] = {
            "importable": True,
            "version": str(version),
            "distribution": ",".join(dists) or None,
            "from": str(Path(where).parent) if where else None,
        }
    if found["onnxruntime"]["importable"]:
        found["onnxruntime"]["providers"] = importlib.import_module("onnxruntime").get_available_providers()
    return found


def part_wheels(acc: Acceptance, rec: PartRecord) -> None:
    """Install the carried wheels into a private folder, put it and the checkout on the import path, record what
    imports."""
    wheels_dir: Path | None = acc.args.wheels
    if wheels_dir is not None:
        wheels = sorted(wheels_dir.glob("*.whl"))
        if not wheels:
            raise FileNotFoundError(f"--wheels {wheels_dir}: no *.whl files there")
        site = acc.work / "site"
        pip = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir"]
        command = acc.run(
            [*pip, "--disable-pip-version-check", "--target", str(site), *map(str, wheels)], timeout=180, name="pip"
        )
        command.check("pip install of the carried wheels")
        rec.results["wheels"] = [w.name for w in wheels]
        rec.results["installed"] = sorted(d.name for d in site.glob("*.dist-info"))
        rec.results["site"] = str(site)
        acc.import_paths.append(str(site))
    acc.import_paths.append(str(REPO))
    for path in reversed(acc.import_paths):
        sys.path.insert(0, path)
    importlib.invalidate_caches()
    versions = importable_versions()
    rec.results["importable"] = versions
    kdpipe = versions["kdpipe"]
    if not kdpipe["importable"]:
        acc.fatal = f"kdpipe does not import ({kdpipe['error']}): see part wheels"
        raise RuntimeError(f"kdpipe does not import: {kdpipe['error']} (carry the pydantic wheels with --wheels)")
    missing = [k for k, v in versions.items() if not v["importable"]]
    rec.summary = f"{len(rec.results.get('wheels', []))} wheels; not importable: {', '.join(missing) or 'none'}"


def part_environment(acc: Acceptance, rec: PartRecord) -> None:
    """kdpipe's environment record with the commit, the device the run uses and, on a GPU, its CUDA facts."""
    import torch

    rec.results["environment"] = environment()
    rec.results["device"] = str(acc.device)
    if acc.cuda:
        props = torch.cuda.get_device_properties(0)
        nccl = torch.cuda.nccl.version()
        rec.results["cuda"] = {
            "gpu": props.name,
            "compute_capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "torch_cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl),
            "bf16_supported": torch.cuda.is_bf16_supported(),
            "device_count": torch.cuda.device_count(),
        }
    env = rec.results["environment"]
    gpu = f" ({env['gpu']})" if env.get("gpu") else ""
    rec.summary = f"{acc.device}{gpu}, torch {env['torch']}, commit {env['commit'][:12]}"
