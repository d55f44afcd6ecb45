"""Calibration, held-out and parity images are seeded random draws, not the first images of a split: an ImageFolder
split is in class order, so its first 512 training images are one class of CIFAR (int8 ranges calibrated on one
class, mixed precision ranked on a few)."""

from __future__ import annotations

import torch

from kdpipe.data import Splits, TensorSplit, sample_indices
from kdpipe.stages.export import calibration_images, heldout_images

CLASS_SORTED = torch.arange(100).repeat_interleave(500)  # CIFAR-100's training labels as an ImageFolder lists them


def test_a_draw_covers_the_classes_of_a_class_sorted_split_and_is_reproducible() -> None:
    idx = sample_indices(len(CLASS_SORTED), 512, seed=0, purpose="calibration")
    assert len(idx) == 512 and len(set(idx.tolist())) == 512
    assert len(set(CLASS_SORTED[idx].tolist())) >= 95  # the first 512 hold 2 classes
    assert torch.equal(idx, sample_indices(len(CLASS_SORTED), 512, 0, "calibration"))  # same seed: same images
    assert not torch.equal(idx, sample_indices(len(CLASS_SORTED), 512, 1, "calibration"))
    assert not torch.equal(idx, sample_indices(len(CLASS_SORTED), 512, 0, "parity"))
    assert torch.equal(sample_indices(len(CLASS_SORTED), 2000, 0, "calibration")[:512], idx)  # nested cuts
    assert len(sample_indices(10, 512, 0, "calibration")) == 10


def _splits(val: bool) -> Splits:
    """Splits whose images carry their own index (pixel 0) and label, to see which images a helper picked."""
    n = len(CLASS_SORTED)
    ids = torch.arange(n)
    images = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = (ids % 256).to(torch.uint8)
    images[:, 0, 0, 1] = (ids // 256).to(torch.uint8)
    train = TensorSplit(images, CLASS_SORTED.clone())
    held = TensorSplit(images[:1000].clone(), CLASS_SORTED[::50].clone()) if val else None
    return Splits(train=train, val=held, test=train, classes=[str(c) for c in range(100)], mean=(0.0,), std=(1 / 255,),
                  in_chans=1, image_size=2)  # fmt: skip


def _ids(images: torch.Tensor) -> set[int]:
    pixels = images.round().long()  # normalised with mean 0, std 1/255: the raw pixel values
    return set((pixels[:, 0, 0, 0] + 256 * pixels[:, 0, 0, 1]).tolist())


def test_calibration_and_held_out_training_images_are_spread_and_disjoint() -> None:
    splits = _splits(val=False)
    calibration = _ids(calibration_images(splits, 512, seed=0))
    held = _ids(heldout_images(splits, 512, 1000, seed=0))
    assert len(calibration) == 512 and len(held) == 1000 and not calibration & held
    assert len({int(CLASS_SORTED[i]) for i in calibration}) >= 95
    assert len({int(CLASS_SORTED[i]) for i in held}) >= 95


def test_held_out_images_come_from_the_validation_split_when_there_is_one() -> None:
    splits = _splits(val=True)
    held = heldout_images(splits, 512, 300, seed=0)
    assert len(held) == 300 and _ids(held) <= set(range(1000))
