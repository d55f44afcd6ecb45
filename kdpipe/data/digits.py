"""``digits``: scikit-learn's bundled 8x8 handwritten digits, the dataset that works on a fresh machine offline.

1,797 grayscale images with values 0..16 in 10 classes. They are scaled to 0..255, upsampled (default 16x16) and
split 80/20 into train and test with a fixed seed, so test accuracy is comparable across run seeds.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kdpipe.config import DataConfig
from kdpipe.data.sources import SourceData, resize_uint8
from kdpipe.data.splits import stratified_holdout

TEST_FRACTION = 0.2
# Fixed, not the run seed: the test split must be the same for every run so accuracies can be compared.
TEST_SEED = 0


def load_digits_source(cfg: DataConfig, root: Path | None, image_size: int | None, cache_dir: Path) -> SourceData:
    """Load scikit-learn's digits as 1-channel uint8 images of ``image_size`` (16 when None); ``root`` is unused."""
    from sklearn.datasets import load_digits  # imported here: scikit-learn is slow to import and only digits needs it

    bunch = load_digits()
    # Values are counts 0..16 of set pixels in 4x4 blocks; 255/16 maps 16 to full white.
    raw = torch.from_numpy(bunch.images).mul(255.0 / 16.0).round().clamp(0, 255).to(torch.uint8)
    images = resize_uint8(raw.unsqueeze(1), image_size or 16)
    labels = torch.from_numpy(bunch.target).to(torch.int64)
    train_idx, test_idx = stratified_holdout(labels, TEST_FRACTION, TEST_SEED)
    return SourceData(
        train_images=images[train_idx],
        train_labels=labels[train_idx],
        test_images=images[test_idx],
        test_labels=labels[test_idx],
        classes=[str(d) for d in range(10)],
        name="digits:sklearn",
    )
