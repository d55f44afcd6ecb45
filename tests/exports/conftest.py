"""Shared by the export tests: a real classifier on real images (a resnet8 trained for a few seconds on
scikit-learn's digits), so parity and quantization are measured on a meaningful model, never on noise."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import kdpipe  # noqa: F401  (registers resnet8 with timm)
from kdpipe.exports import Preprocessing

DIGITS_MEAN, DIGITS_STD = 0.3, 0.4  # of the 0..1 pixel values, measured on the digits images


@dataclass(frozen=True)
class Digits:
    """A trained model and its data: normalised 1x16x16 images, as the model was trained on them."""

    model: nn.Module
    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    preprocessing: Preprocessing


def trained_digits(cache_dir: Path) -> Digits:
    """resnet8 trained 4 epochs on 1,400 digits (a few seconds), its weights cached in ``cache_dir``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Values are 0..16 per 8x8 cell: scale to 0..1, upsample to 16x16 as kdpipe's digits source does, normalise.
    pixels = torch.from_numpy(bunch.images).float().div(16.0).unsqueeze(1)
    images = (F.interpolate(pixels, size=16, mode="bilinear", align_corners=False) - DIGITS_MEAN) / DIGITS_STD
    labels = torch.from_numpy(bunch.target).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, val = order[:1400], order[1400:]

    torch.manual_seed(0)
    model = timm.create_model("resnet8", num_classes=10, in_chans=1)
    weights = cache_dir / "digits-resnet8.pt"
    if weights.exists():
        model.load_state_dict(torch.load(weights, weights_only=True))
    else:
        _train(model, images[train], labels[train])
        torch.save(model.state_dict(), weights)
    model.eval()
    pre = Preprocessing(
        mean=(DIGITS_MEAN,),
        std=(DIGITS_STD,),
        image_size=16,
        in_chans=1,
        channel_order="L",
        classes=tuple("0123456789"),
    )
    return Digits(model, images[train], labels[train], images[val], labels[val], pre)


def _train(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
    threads = torch.get_num_threads()
    # One thread: on a shared 2-core machine two threads per step are slower, not faster, for a net this small.
    torch.set_num_threads(1)
    try:
        epochs, batch = 4, 64
        steps = epochs * -(-len(labels) // batch)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=steps)
        gen = torch.Generator().manual_seed(0)
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(labels), generator=gen)
            for i in range(0, len(perm), batch):
                idx = perm[i : i + batch]
                loss = F.cross_entropy(model(images[idx]), labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Digits:
    """Shared by the parity and quantization tests: trained once per session."""
    return trained_digits(tmp_path_factory.getbasetemp())
