"""What a mode of the acceptance run trains on: the networks and sizes of the GPU run and of the CPU dry run, and the
dataset (scikit-learn's digits, or a CIFAR archive in ImageFolder layout) that ``--data`` names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import SHARED_DATA

from .core import REPO

CIFAR_ARCHIVES = ("cifar10-jpg.tar.gz", "cifar100-jpg.tar.gz")
SEED = 0
"""The seed of every network, training run and image draw of the acceptance run."""


@dataclass(frozen=True)
class Sizes:
    """Networks and sizes of one mode (the GPU run, or the CPU dry run)."""

    teacher: str
    student: str
    method_batch: int
    method_steps: int
    method_eval_images: int
    precisions: tuple[str, ...]
    skipped_precisions: tuple[str, ...]
    student_epochs: int
    student_batch: int
    calibration_images: int
    parity_images: int
    bench_batches: tuple[int, ...]
    bench_warmup: int
    bench_iterations: int
    bench_min_time_s: float
    pipeline_batch: int
    pipeline_epochs: int
    pipeline_subset: float | None
    """``data.subset`` of the torchrun and qad pipelines on CIFAR (None: digits, or the whole split)."""


GPU_SIZES = Sizes(
    teacher="resnet32x4",
    student="resnet8x4",
    method_batch=128,
    method_steps=3,
    method_eval_images=512,
    precisions=("bf16", "fp16"),
    skipped_precisions=(),
    student_epochs=3,
    student_batch=256,
    calibration_images=512,
    parity_images=2000,
    bench_batches=(1, 64, 256),
    bench_warmup=10,
    bench_iterations=50,
    bench_min_time_s=0.3,
    pipeline_batch=128,
    pipeline_epochs=3,
    pipeline_subset=0.1,
)
DRY_SIZES = Sizes(
    teacher="resnet20",
    student="resnet8",
    method_batch=32,
    method_steps=3,
    method_eval_images=128,
    precisions=("fp32", "bf16"),
    skipped_precisions=("fp16",),
    student_epochs=2,
    student_batch=64,
    calibration_images=128,
    parity_images=400,
    bench_batches=(1, 8),
    bench_warmup=2,
    bench_iterations=5,
    bench_min_time_s=0.02,
    pipeline_batch=64,
    pipeline_epochs=1,
    pipeline_subset=0.02,
)


@dataclass(frozen=True)
class DataSpec:
    """Which dataset the run trains on: scikit-learn's digits, or a CIFAR archive in ImageFolder layout."""

    kind: str
    root: Path | None = None

    @property
    def label(self) -> str:
        return "digits (scikit-learn, 1x16x16)" if self.root is None else f"imagefolder {self.root}"

    @property
    def augment(self) -> str:
        return "crop" if self.root is None else "cifar"

    def config(self, subset: float | None = None) -> dict[str, Any]:
        """The ``data:`` block (validation split of 10%: fusion_ratio learns from it)."""
        if self.root is None:
            return {"kind": "digits", "image_size": 16, "augment": "crop", "val_fraction": 0.1}
        block: dict[str, Any] = {"kind": "imagefolder", "root": str(self.root), "augment": "cifar", "val_fraction": 0.1}
        if subset is not None:
            block["subset"] = subset
        return block


def resolve_data(given: str | None, dry_run: bool) -> DataSpec:
    """``--data``: "digits", a CIFAR .tar.gz or ImageFolder folder, or a folder holding the CIFAR archives (CIFAR-10
    preferred: ten classes give a few-epoch student clear enough top-1 margins for parity). Default: digits for a
    dry run; else ./data, then ../shared/data."""
    if given == "digits" or (given is None and dry_run):
        return DataSpec("digits")
    candidates = [Path(given)] if given is not None else [REPO / "data", SHARED_DATA]
    for folder in candidates:
        if folder.is_file():
            return DataSpec("imagefolder", folder.resolve())
        if (folder / "train").is_dir():
            return DataSpec("imagefolder", folder.resolve())
        for name in CIFAR_ARCHIVES:
            if (folder / name).is_file():
                return DataSpec("imagefolder", (folder / name).resolve())
    raise SystemExit(
        f"--data {given or ' / '.join(map(str, candidates))}: no {' or '.join(CIFAR_ARCHIVES)} and no ImageFolder "
        "train/ folder there; pass --data digits to use scikit-learn's digits"
    )
