"""Shared fixtures: an isolated data cache, no network, a tiny config writer, and the real datasets in
../shared/data (tests that need them skip with a reason where they are absent, as in a user's clone).

Tests marked ``gpu`` or ``tensorrt`` are skipped, visibly, where they cannot run. On a GPU machine that is meant to
run them, ``--require-gpu`` (or ``KDPIPE_REQUIRE_GPU=1``) turns every such skip into a failure that carries the
reason, so a missing CUDA device, TensorRT or optional package cannot pass as a green run
(``pytest -m "gpu or tensorrt" --require-gpu``; benchmarks/gpu_acceptance.py runs exactly that)."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub (timm does): tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"

import importlib.util
import sys
import textwrap
from collections.abc import Callable, Generator
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


REQUIRED_MARKERS = ("gpu", "tensorrt")
"""Markers of tests that ``--require-gpu`` insists on running."""
_HARDWARE_SKIPS = pytest.StashKey[list[str]]()
"""Per item: the reasons its gpu/tensorrt markers gave for skipping it here."""


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")
    parser.addoption(
        "--require-gpu",
        action="store_true",
        help="a test marked gpu or tensorrt that cannot run here fails with the reason instead of being skipped "
        "(also KDPIPE_REQUIRE_GPU=1); for the GPU machine that must run them",
    )


def require_gpu(config: pytest.Config) -> bool:
    """Whether skips of gpu/tensorrt tests are failures in this session (``--require-gpu`` or the environment)."""
    return bool(config.getoption("--require-gpu")) or os.environ.get("KDPIPE_REQUIRE_GPU") == "1"


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
                if marker in REQUIRED_MARKERS:
                    item.stash.setdefault(_HARDWARE_SKIPS, []).append(reason)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Under ``--require-gpu``: a gpu/tensorrt test that was skipped (by its marker here, or by a ``pytest.skip`` /
    ``importorskip`` of its own) is reported as failed with the reason. A test skipped only because it is slow and
    ``--runslow`` was not given stays skipped: it could run, it was not asked to."""
    report = yield
    if not (report.skipped and require_gpu(item.config)) or hasattr(report, "wasxfail"):
        return report
    markers = [m for m in REQUIRED_MARKERS if item.get_closest_marker(m) is not None]
    hardware = item.stash.get(_HARDWARE_SKIPS, [])
    own_skip = report.when == "call" or not any(m.name == "skip" for m in item.iter_markers())
    if not markers or not (hardware or own_skip):
        return report
    reason = "; ".join(hardware) if hardware else _skip_message(report)
    report.outcome = "failed"
    report.longrepr = f"--require-gpu: this {'/'.join(markers)} test cannot run here: {reason}"
    report.user_properties.append(("require_gpu", reason))
    return report


def _skip_message(report: pytest.TestReport) -> str:
    """The message of a skip report (pytest keeps it as (path, line, "Skipped: message"))."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def pytest_report_teststatus(report: pytest.TestReport, config: pytest.Config) -> tuple[str, str, str] | None:
    """A setup-phase report turned into a failure by ``--require-gpu`` counts as FAILED, not as an ERROR."""
    if report.failed and any(key == "require_gpu" for key, _ in getattr(report, "user_properties", ())):
        return "failed", "F", "FAILED"
    return None


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
