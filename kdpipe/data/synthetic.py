"""``synthetic``: seeded random images whose class sets a spatial colour pattern. For fast unit tests only.

Each class has a coarse 4x4 colour template, upsampled to the image size; an image is its class template plus
Gaussian noise. A small CNN (or a linear model) learns it in a few steps, which is all a pipeline test needs. It is
never used to claim accuracy.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from kdpipe.config import DataConfig
from kdpipe.data.sources import SourceData

IN_CHANS = 3
# Noise std in pixel units (0..255): large enough that a sample is not its template, small enough to stay learnable.
NOISE_STD = 40.0
# The data depends only on the config, not on the run seed: like a real dataset, it is the same for every run.
DATA_SEED = 1234


def _make_split(templates: torch.Tensor, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    num_classes = templates.shape[0]
    # Balanced classes (n // C each, the first n % C classes get one more), then shuffled.
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=generator)]
    noise = torch.randn((n, *templates.shape[1:]), generator=generator) * NOISE_STD
    images = (templates[labels] + noise).round().clamp(0, 255).to(torch.uint8)
    return images, labels.to(torch.int64)


def load_synthetic_source(cfg: DataConfig, root: Path | None, image_size: int | None, cache_dir: Path) -> SourceData:
    """``cfg.num_samples`` train and a quarter of that (at least one) test images, ``cfg.num_classes`` classes."""
    size = image_size or 16
    generator = torch.Generator().manual_seed(DATA_SEED)
    coarse = torch.rand((cfg.num_classes, IN_CHANS, 4, 4), generator=generator) * 160 + 48  # keep noise off 0/255
    templates = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    train_images, train_labels = _make_split(templates, cfg.num_samples, generator)
    test_images, test_labels = _make_split(templates, max(1, cfg.num_samples // 4), generator)
    return SourceData(
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        classes=[str(c) for c in range(cfg.num_classes)],
        name=f"synthetic:{cfg.num_classes}x{cfg.num_samples}",
    )
