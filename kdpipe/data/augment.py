"""Batched training augmentation as tensor ops on the batch's device: no per-sample PIL, no global RNG.

Every random number comes from the ``torch.Generator`` passed in, and each function draws a fixed number of values
per batch whatever the data, so a batch's augmentation is a pure function of (images, generator seed). That is
what lets a resumed run reproduce an uninterrupted one bit for bit.

- ``cifar``: pad by ``image_size / 8`` pixels of zeros (4 at 32, 2 at 16), crop back to size at a random offset per
  sample, flip half the samples horizontally. Exact on uint8: the output is a gather of input pixels.
- ``cifar-reflect``: ``cifar`` with reflect padding (the border mirrored, edge pixel not repeated: torchvision's
  ``padding_mode="reflect"``), as FFSD's and several CIFAR codebases' ``RandomCrop(32, 4, padding_mode="reflect")``.
- ``crop``: the ``cifar`` crop without the flip, for data where a mirror image is another class (digits, text).
- ``imagenet``: per-sample random resized crop (area 8-100 %, aspect ratio 3/4-4/3, torchvision's ten tries then
  the whole image) and horizontal flip, all samples in one ``grid_sample`` call with per-sample affine grids.
  The crop is never larger than the image, so the output never minifies and bilinear needs no antialiasing.
- ``none``: the batch unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdpipe.errors import ConfigError
from kdpipe.registry import suggest

AUGMENTS = ("cifar", "cifar-reflect", "crop", "imagenet", "none")

RRC_SCALE = (0.08, 1.0)
"""Share of the image area a random resized crop covers (torchvision's default)."""
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
"""Width / height of a random resized crop (torchvision's default)."""
RRC_ATTEMPTS = 10
"""Crop shapes drawn per sample; the first that fits is used (torchvision's rule)."""


def check_augment(name: str) -> str:
    """Return ``name`` if it is a known augmentation, else raise ConfigError listing the choices."""
    if name not in AUGMENTS:
        raise ConfigError(
            f"unknown data.augment {name!r}{suggest(name, AUGMENTS)}; choose one of: {', '.join(AUGMENTS)}"
        )
    return name


def crop_padding(image_size: int) -> int:
    """Zero padding of the cifar crop in pixels: 4 at 32 px, scaled with the image, at least 1."""
    return max(1, round(image_size / 8))


def random_crop_flip(
    images: torch.Tensor, padding: int, generator: torch.Generator, *, flip: bool = True, reflect: bool = False
) -> torch.Tensor:
    """Random crop of ``(B, C, H, W)`` images after ``padding`` on every side (zeros, or the mirrored border with
    ``reflect``), then (``flip``) a random horizontal flip.

    Offsets and flips are drawn per sample; the crop and the flip are one gather, so uint8 stays uint8.
    """
    b, c, h, w = images.shape
    if reflect and padding >= min(h, w):
        raise ConfigError(f"reflect padding of {padding} px needs images larger than {padding} px, got {h}x{w}")
    device = images.device
    padded = images if reflect else F.pad(images, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=device)
    left = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=device)
    # drawn even when unused, so every augmentation consumes the same random stream
    flip_mask = (torch.rand(b, generator=generator, device=device) < 0.5) & flip
    rows = top[:, None] + torch.arange(h, device=device)  # (B, H)
    cols = torch.arange(w, device=device).expand(b, w)
    cols = left[:, None] + torch.where(flip_mask[:, None], w - 1 - cols, cols)  # (B, W), reversed for flipped samples
    if reflect:  # map padded coordinates into the image: -1 -> 1, n -> n - 2 (no padded copy needed)
        rows, cols = _reflect(rows - padding, h), _reflect(cols - padding, w)
    width = w if reflect else w + 2 * padding  # of the plane ``padded`` holds
    # One gather over the flattened (padded) plane: about 6x faster on CPU than 4-D advanced indexing.
    flat = (rows[:, :, None] * width + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return padded.reshape(b, c, -1).gather(2, flat).reshape(b, c, h, w)


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Reflect indices in [-(size - 1), 2 * (size - 1)] into [0, size - 1] about the edge pixels."""
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


def _crop_sizes(b: int, h: int, w: int, generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Per-sample crop width and height in pixels (float), by torchvision's RandomResizedCrop rule, batched."""
    area = float(h * w)
    scale = torch.rand((b, RRC_ATTEMPTS), generator=generator, device=device)
    scale = RRC_SCALE[0] + (RRC_SCALE[1] - RRC_SCALE[0]) * scale
    log_lo, log_hi = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * torch.rand((b, RRC_ATTEMPTS), generator=generator, device=device))
    cw = torch.sqrt(area * scale * ratio).round()
    ch = torch.sqrt(area * scale / ratio).round()
    fits = (cw >= 1) & (cw <= w) & (ch >= 1) & (ch <= h)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first fitting attempt (0 when none)
    cw, ch = cw.gather(1, first).squeeze(1), ch.gather(1, first).squeeze(1)
    # No attempt fitted: the whole image, with its aspect ratio clamped to the allowed range (torchvision's fallback).
    in_ratio = w / h
    fw: float
    fh: float
    if in_ratio < RRC_RATIO[0]:
        fw, fh = float(w), float(round(w / RRC_RATIO[0]))
    elif in_ratio > RRC_RATIO[1]:
        fw, fh = float(round(h * RRC_RATIO[1])), float(h)
    else:
        fw, fh = float(w), float(h)
    none_fit = ~fits.any(dim=1)
    cw = torch.where(none_fit, torch.full_like(cw, fw), cw)
    ch = torch.where(none_fit, torch.full_like(ch, fh), ch)
    return cw, ch


def random_resized_crop_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random resized crop back to the input size plus random horizontal flip; returns float32 0..255.

    One affine grid per sample maps the output square onto the crop (mirrored for flipped samples) and
    ``grid_sample`` does all samples at once with bilinear interpolation.
    """
    b, _, h, w = images.shape
    device = images.device
    cw, ch = _crop_sizes(b, h, w, generator, device)
    left = torch.floor(torch.rand(b, generator=generator, device=device) * (w - cw + 1))
    top = torch.floor(torch.rand(b, generator=generator, device=device) * (h - ch + 1))
    flip = torch.rand(b, generator=generator, device=device) < 0.5
    # In grid_sample's normalised coordinates (align_corners=False, -1/+1 = outer pixel edges), output x in [-1, 1]
    # must land on [left, left + cw] pixels: x_in = (cw / w) * x_out + centre, with the sign flipped for a mirror.
    sx = torch.where(flip, -cw / w, cw / w)
    theta = torch.zeros((b, 2, 3), device=device)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = (2 * left + cw) / w - 1
    theta[:, 1, 1] = ch / h
    theta[:, 1, 2] = (2 * top + ch) / h - 1
    grid = F.affine_grid(theta, [b, images.shape[1], h, w], align_corners=False)
    # "border": output pixels next to the crop edge sample up to half a pixel beyond it.
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


def augment_batch(images: torch.Tensor, name: str, generator: torch.Generator) -> torch.Tensor:
    """Apply augmentation ``name`` (one of ``AUGMENTS``) to a uint8 ``(B, C, H, W)`` batch.

    Returns uint8 for cifar, cifar-reflect, crop and none, float32 in 0..255 for imagenet (interpolated values).
    """
    check_augment(name)
    if name in ("cifar", "cifar-reflect", "crop"):
        padding = crop_padding(images.shape[-1])
        return random_crop_flip(images, padding, generator, flip=name != "crop", reflect=name == "cifar-reflect")
    if name == "imagenet":
        return random_resized_crop_flip(images, generator)
    return images
