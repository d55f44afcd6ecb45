"""Shared fixtures: an isolated data cache, no network, a tiny config writer, and the real datasets in
../shared/data (tests that need them skip with a reason where they are absent, as in a user's clone)."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub (timm does): tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"

import importlib.util
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip, with the reason shown in the summary, what cannot or should not run here."""
    import torch

    run_slow = config.getoption("--runslow") or os.environ.get("KDPIPE_RUNSLOW") == "1"
    reasons = {
        "slow": None if run_slow else "slow test: run with --runslow",
        "gpu": None if torch.cuda.is_available() else "needs a CUDA GPU",
        "tensorrt": None if importlib.util.find_spec("tensorrt") else "needs the tensorrt package",
    }
    for item in items:
        for marker, reason in reasons.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


def load_module(path: Path, name: str) -> ModuleType:
    """Import a script that is not a package module (a benchmark, a generator) under ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def shared_dataset(name: str) -> Path:
    """Path of a dataset archive in ../shared/data, or skip the test saying why."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is absent (it ships beside the project checkout, not in it)")
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kdpipe-cache")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, cache_dir: Path) -> None:
    monkeypatch.setenv("KDPIPE_CACHE", str(cache_dir))


# A small, fast pipeline on synthetic data: ~seconds on 2 cores.
TINY = """
version: 1
name: tiny
seed: 0
device: cpu
data: {kind: synthetic, num_classes: 4, num_samples: 128, image_size: 8, augment: none, val_fraction: 0.0}
stages:
  teacher:
    type: teacher
    model: resnet8
    weights: {train: {epochs: 2, batch_size: 32, lr: 0.05}}
  distill:
    type: distill
    student: resnet8
    method: {name: kd, temperature: 4.0}
    train: {epochs: 2, batch_size: 32, lr: 0.05}
  verify:
    type: verify
    min_top1: 0.0
  card:
    type: model_card
"""


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """Write YAML text (dedented) to tmp_path/<name> and return its path."""

    def write(text: str = TINY, name: str = "stages.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return path

    return write
