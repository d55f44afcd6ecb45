"""BatchLoader determinism and resumption, batch counts, normalisation, and the batched augmentations."""

from __future__ import annotations

import itertools

import pytest
import torch

from kdpipe.data import AUGMENTS, BatchLoader, TensorSplit, augment_batch
from kdpipe.data.augment import crop_padding, random_crop_flip, random_resized_crop_flip
from kdpipe.errors import ConfigError, DataError

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def _split(n: int = 50, size: int = 16) -> TensorSplit:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)
    return TensorSplit(images, torch.arange(n))  # label = sample index, so batches reveal the order


def _loader(split: TensorSplit, **kwargs: object) -> BatchLoader:
    options: dict[str, object] = {"batch_size": 8, "mean": MEAN, "std": STD, "train": True, "seed": 0}
    options.update(kwargs)
    return BatchLoader(split, **options)  # type: ignore[arg-type]


def _epoch(loader: BatchLoader, epoch: int, step: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader.iter_from(step))


def _same(a: list[tuple[torch.Tensor, torch.Tensor]], b: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("augment", AUGMENTS)
def test_same_seed_and_epoch_give_identical_batches(augment: str) -> None:
    split = _split()
    a = _epoch(_loader(split, augment=augment), 3)
    torch.manual_seed(999)  # the global RNG must not matter
    b = _epoch(_loader(split, augment=augment), 3)
    assert _same(a, b)
    assert all(x.dtype == torch.float32 and y.dtype == torch.int64 for x, y in a)


def test_epoch_and_seed_change_the_order() -> None:
    split = _split()
    loader = _loader(split)
    orders = [torch.cat([y for _, y in _epoch(loader, e)]) for e in range(3)]
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])
    for order in orders:  # each epoch is a permutation: every sample exactly once
        assert torch.equal(torch.sort(order).values, torch.arange(50))
    other_seed = torch.cat([y for _, y in _epoch(_loader(split, seed=1), 0)])
    assert not torch.equal(orders[0], other_seed)


@pytest.mark.parametrize(("augment", "step"), itertools.product(AUGMENTS, [0, 1, 4, 7]))
def test_iter_from_is_the_tail_of_a_full_epoch(augment: str, step: int) -> None:
    split = _split()
    full = _epoch(_loader(split, augment=augment), 2)
    resumed = _epoch(_loader(split, augment=augment), 2, step)  # a fresh loader, as after a restart
    assert len(full) == 7 and _same(full[step:], resumed)


def test_iter_from_rejects_out_of_range_and_keeps_epoch_during_iteration() -> None:
    loader = _loader(_split())
    assert list(loader.iter_from(len(loader))) == []
    with pytest.raises(ValueError):
        loader.iter_from(len(loader) + 1)
    loader.set_epoch(1)
    expected = _epoch(_loader(_split()), 1)
    got = []
    for batch in loader:
        loader.set_epoch(5)  # a trainer bumping the epoch mid-loop must not change this loop's batches
        got.append(batch)
    assert _same(expected, got)


def test_global_rng_state_is_untouched() -> None:
    loader = _loader(_split(), augment="imagenet")
    torch.manual_seed(1)
    state = torch.get_rng_state()
    list(loader)
    assert torch.equal(state, torch.get_rng_state())


def test_eval_loader_is_ordered_unaugmented_and_keeps_last_batch() -> None:
    split = _split(n=17)
    loader = _loader(split, train=False, augment="cifar")
    batches = list(loader)
    assert len(loader) == 3 and [len(y) for _, y in batches] == [8, 8, 1]
    assert torch.equal(torch.cat([y for _, y in batches]), torch.arange(17))
    expected = (split.images.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(torch.cat([x for x, _ in batches]), expected, atol=1e-6)
    loader.set_epoch(4)
    assert _same(batches, list(loader))


@pytest.mark.parametrize(
    ("n", "train", "drop_last", "sizes"),
    [
        (17, True, None, [8, 8]),  # last batch of one sample dropped (BatchNorm)
        (18, True, None, [8, 8, 2]),  # larger remainders kept
        (16, True, None, [8, 8]),
        (17, False, None, [8, 8, 1]),
        (18, True, True, [8, 8]),
        (17, True, False, [8, 8, 1]),
    ],
)
def test_batch_counts(n: int, train: bool, drop_last: bool | None, sizes: list[int]) -> None:
    loader = _loader(_split(n), train=train, drop_last=drop_last)
    assert len(loader) == len(sizes) and [len(y) for _, y in loader] == sizes


def test_invalid_arguments() -> None:
    with pytest.raises(DataError, match="not one batch"):
        _loader(_split(1))
    with pytest.raises(ValueError, match="batch_size"):
        _loader(_split(), batch_size=0)
    with pytest.raises(ValueError, match="mean/std"):
        _loader(_split(), mean=(0.5,), std=(0.5,))
    with pytest.raises(ConfigError, match="did you mean 'cifar'"):
        _loader(_split(), augment="cifa")


def test_none_is_identity_and_shapes() -> None:
    images = _split(6).images
    generator = torch.Generator().manual_seed(0)
    assert augment_batch(images, "none", generator) is images
    cifar = augment_batch(images, "cifar", generator)
    assert cifar.shape == images.shape and cifar.dtype == torch.uint8
    rrc = augment_batch(images, "imagenet", generator)
    assert rrc.shape == images.shape and rrc.dtype == torch.float32
    assert float(rrc.min()) >= 0 and float(rrc.max()) <= 255


def test_crop_padding_scales_with_size() -> None:
    assert [crop_padding(s) for s in (32, 16, 8, 64, 4)] == [4, 2, 1, 8, 1]


def test_cifar_crop_is_a_shifted_maybe_flipped_window() -> None:
    images = _split(12, size=8).images
    out = random_crop_flip(images, 2, torch.Generator().manual_seed(5))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    flips = 0
    for i in range(len(images)):
        windows = [
            (padded[i, :, dy : dy + 8, dx : dx + 8], flip)
            for dy in range(5)
            for dx in range(5)
            for flip in (False, True)
        ]
        matches = [flip for w, flip in windows if torch.equal(out[i], w.flip(-1) if flip else w)]
        assert matches, f"sample {i} is not a padded crop"
        flips += matches[0]
    assert 0 < flips < len(images)  # both flipped and unflipped samples occur


def test_random_resized_crop_geometry() -> None:
    # A horizontal ramp: crops of it stay monotonic, increasing or (when flipped) decreasing along x.
    ramp = torch.arange(16, dtype=torch.uint8).mul(16).expand(32, 3, 16, 16).contiguous()
    out = random_resized_crop_flip(ramp, torch.Generator().manual_seed(0))
    steps = out[:, 0, 8, 1:] - out[:, 0, 8, :-1]
    increasing, decreasing = (steps >= -1e-3).all(dim=1), (steps <= 1e-3).all(dim=1)
    assert torch.all(increasing | decreasing) and increasing.any() and decreasing.any()
    assert torch.allclose(out, out[:, :, :1, :].expand_as(out), atol=1e-3)  # no vertical structure appears
    # Constant images stay constant (no zero padding leaks in from outside the image).
    flat = torch.full((8, 3, 16, 16), 200, dtype=torch.uint8)
    assert torch.allclose(random_resized_crop_flip(flat, torch.Generator().manual_seed(1)), flat.float())


def test_augmentation_differs_between_batches_and_epochs() -> None:
    split = TensorSplit(_split(1).images.expand(16, -1, -1, -1).contiguous(), torch.zeros(16, dtype=torch.int64))
    loader = _loader(split, augment="cifar", batch_size=16)
    a, b = _epoch(loader, 0)[0][0], _epoch(loader, 1)[0][0]
    assert not torch.equal(a, b)
    assert len({x.sum().item() for x in a}) > 1  # per-sample offsets, not one per batch


@pytest.mark.gpu
def test_cuda_loader_matches_cpu_order() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    split = _split()
    cpu = _epoch(_loader(split, augment="none"), 1)
    gpu_loader = _loader(split, augment="cifar", device="cuda")
    assert gpu_loader.images.device.type == "cuda"
    gpu = _epoch(gpu_loader, 1)
    assert all(x.device.type == "cuda" for x, _ in gpu)
    assert all(torch.equal(u, v.cpu()) for (_, u), (_, v) in zip(cpu, gpu, strict=True))
    assert _same(gpu, _epoch(_loader(split, augment="cifar", device="cuda"), 1))
    assert _same(_epoch(gpu_loader, 2, 3), _epoch(gpu_loader, 2)[3:])
    rrc = _epoch(_loader(split, augment="imagenet", device="cuda"), 0)
    assert _same(rrc, _epoch(_loader(split, augment="imagenet", device="cuda"), 0))


def test_crop_is_cifar_without_the_flip() -> None:
    images = _split(12, size=8).images
    crop = random_crop_flip(images, 2, torch.Generator().manual_seed(5), flip=False)
    cifar = random_crop_flip(images, 2, torch.Generator().manual_seed(5))
    flipped = 0
    for i in range(len(images)):
        if torch.equal(cifar[i], crop[i]):
            continue
        assert torch.equal(cifar[i], crop[i].flip(-1)), "same offsets; cifar may only add a mirror"
        flipped += 1
    assert 0 < flipped < len(images)
    expected = random_crop_flip(images, crop_padding(8), torch.Generator().manual_seed(5), flip=False)
    assert torch.equal(augment_batch(images, "crop", torch.Generator().manual_seed(5)), expected)


def test_cifar_reflect_is_the_cifar_crop_of_a_reflect_padded_image() -> None:
    """Same offsets and flips as ``cifar`` (same random stream), but the window reads torch's reflect padding
    (edge pixel not repeated, as torchvision's padding_mode="reflect") instead of zeros."""
    images = _split(12, size=8).images
    out = augment_batch(images, "cifar-reflect", torch.Generator().manual_seed(5))
    assert out.dtype == torch.uint8
    pad = crop_padding(8)
    reflected = torch.nn.functional.pad(images.float(), (pad,) * 4, mode="reflect").to(torch.uint8)
    # The zero-padded crop with the same generator tells where each window is: compare at the same offsets.
    probe = torch.arange(1, 1 + 8 * 8, dtype=torch.float32).reshape(1, 1, 8, 8).expand(12, 1, 8, 8)
    where = random_crop_flip(probe.to(torch.int64), pad, torch.Generator().manual_seed(5))
    for i in range(len(images)):
        hits = [
            (dy, dx, flip)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            for flip in (False, True)
            if torch.equal(
                where[i, 0],
                (lambda w: w.flip(-1) if flip else w)(
                    torch.nn.functional.pad(probe[i].to(torch.int64), (pad,) * 4)[0, dy : dy + 8, dx : dx + 8]
                ),
            )
        ]
        assert len(hits) == 1, f"sample {i}: window not unique"
        dy, dx, flip = hits[0]
        window = reflected[i, :, dy : dy + 8, dx : dx + 8]
        assert torch.equal(out[i], window.flip(-1) if flip else window), f"sample {i}"
    assert not torch.equal(out, augment_batch(images, "cifar", torch.Generator().manual_seed(5)))
    with pytest.raises(ConfigError, match="reflect padding"):
        random_crop_flip(images[:, :, :2, :2], 2, torch.Generator(), reflect=True)
