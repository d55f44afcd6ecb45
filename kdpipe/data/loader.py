"""``BatchLoader``: deterministic, resumable batches from an in-memory uint8 split on a device.

Reproducibility contract (the trainer resumes mid-epoch after SIGTERM and must match an uninterrupted run):
- the order of epoch ``e`` is ``randperm`` from a CPU generator seeded with ``(seed, e)``: it never touches the
  global RNG, and it is the same on every device, so CPU and GPU runs see the same samples in each batch;
- the augmentation of batch ``k`` of epoch ``e`` uses a generator on the loader's device seeded with
  ``(seed, e, k)``: batch ``k`` is the same whether iteration started at 0 or resumed at ``k``. On CPU the result
  is bitwise reproducible; a GPU draws its own (equally reproducible) stream, so CPU and GPU crops differ.

The split is moved to ``device`` once, in ``__init__``; a step only gathers, augments and normalises on the device.
Data parallel (``rank``/``world_size``, see ``kdpipe.distributed``): a train loader still walks the global batches
of ``batch_size``; each is augmented whole with its own seed, then split into ``world_size`` contiguous shards and
this rank keeps shard ``rank``. N processes together see exactly the samples and crops one process sees.

Eval loaders (``train=False``) never shuffle or augment and keep the last partial batch. Train loaders keep the last
partial batch too, unless it holds a single sample: BatchNorm cannot compute batch statistics from one sample and
raises in train mode, and dropping one sample per epoch costs nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from kdpipe.data.augment import augment_batch, check_augment
from kdpipe.data.tensor_split import TensorSplit, derive_seed
from kdpipe.errors import DataError

Batch = tuple[torch.Tensor, torch.Tensor]


def normalize(
    images: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """uint8 (or 0..255 float) ``(B, C, H, W)`` images -> what models see. The same arithmetic as torchvision's
    ToTensor + Normalize: x / 255, then (x - mean) / std per channel. Used for training, evaluation, export
    calibration and parity, so every consumer feeds a model identical inputs."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return images.to(torch.float32).div_(255.0).sub_(mean_t).div_(std_t)


class BatchLoader:
    """Iterable of ``(images, labels)``: float32 normalised ``(B, C, H, W)`` and int64 ``(B,)`` on ``device``.

    Args:
        split: the samples (uint8 images, int64 labels).
        batch_size: samples per batch.
        mean, std: per-channel normalisation in [0, 1] units (``Splits.mean`` / ``Splits.std``).
        train: shuffle every epoch and apply ``augment``; False gives the fixed eval order with no augmentation.
        augment: "cifar" | "imagenet" | "none" (train loaders only).
        seed: run seed; with the epoch it fixes the order and the augmentation.
        device: where the split is kept and batches are produced.
        drop_last: None (default) drops the last partial batch only for train loaders and only if it has one sample
            (under data parallelism: if some rank would get fewer than two); True / False force it either way.
        rank, world_size: this process's shard of every train batch (eval loaders are never sharded).
    """

    def __init__(
        self,
        split: TensorSplit,
        *,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        augment: str = "none",
        seed: int = 0,
        device: torch.device | str = "cpu",
        drop_last: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.rank, self.world_size = (rank, world_size) if train else (0, 1)
        if batch_size < 2 * self.world_size and self.world_size > 1:
            raise DataError(
                f"batch_size {batch_size} cannot be split over {self.world_size} processes with at least 2 samples "
                "each (BatchNorm needs 2)",
                hint=f"set train.batch_size to at least {2 * self.world_size} (it is the global batch)",
            )
        channels = split.images.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean/std have {len(mean)}/{len(std)} values for {channels}-channel images")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.device = torch.device(device)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.batch_size = batch_size
        self.train = train
        self.augment = check_augment(augment) if train else "none"
        self.seed = seed
        self.epoch = 0
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        n = len(split)
        remainder = n % batch_size
        if drop_last is None:
            drop_last = train and 0 < remainder < 2 * self.world_size
        self.drop_last = drop_last
        self._num_batches = n // batch_size + (1 if remainder and not drop_last else 0)
        if train and self._num_batches == 0:
            raise DataError(
                f"the train split has {n} sample(s): not one batch of {batch_size} (drop_last={drop_last})",
                hint="use more data, a smaller batch_size, or a smaller data.val_fraction",
            )

    def __len__(self) -> int:
        """Batches per epoch."""
        return self._num_batches

    @property
    def num_samples(self) -> int:
        """Samples in the split (including any the last dropped batch leaves out)."""
        return int(self.labels.shape[0])

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration produces."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch

    def order(self, epoch: int | None = None) -> torch.Tensor:
        """Sample indices of ``epoch`` (default: the current one) in batch order, on the loader's device."""
        epoch = self.epoch if epoch is None else epoch
        n = self.num_samples
        if not self.train:
            return torch.arange(n, device=self.device)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "shuffle", epoch))
        return torch.randperm(n, generator=generator).to(self.device)

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(images, self._mean, self._std)

    def iter_from(self, step: int) -> Iterator[Batch]:
        """Batches ``step``, ``step + 1``, ... of the current epoch: exactly the tail of a full iteration."""
        if not 0 <= step <= self._num_batches:
            raise ValueError(f"step must be in [0, {self._num_batches}], got {step}")
        return self._iterate(self.epoch, step)

    def _iterate(self, epoch: int, step: int) -> Iterator[Batch]:
        # The epoch is fixed when iteration starts, so set_epoch() during a loop does not change its batches.
        order = self.order(epoch)
        for k in range(step, self._num_batches):
            index = order[k * self.batch_size : (k + 1) * self.batch_size]
            images = self.images[index]
            if self.augment != "none":
                generator = torch.Generator(device=self.device).manual_seed(derive_seed(self.seed, "augment", epoch, k))
                images = augment_batch(images, self.augment, generator)
            labels = self.labels[index]
            if self.world_size > 1:
                images = images.tensor_split(self.world_size)[self.rank]
                labels = labels.tensor_split(self.world_size)[self.rank]
            yield self._normalize(images), labels

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)

    def batch(self, epoch: int, step: int) -> Batch:
        """Batch ``step`` of ``epoch``, exactly as a full iteration of that epoch would produce it."""
        if not 0 <= step < self._num_batches:
            raise ValueError(f"step must be in [0, {self._num_batches}), got {step}")
        return next(self._iterate(epoch, step))

    def __repr__(self) -> str:
        return (
            f"BatchLoader(samples={self.num_samples}, batch_size={self.batch_size}, batches={len(self)}, "
            f"train={self.train}, augment={self.augment!r}, seed={self.seed}, epoch={self.epoch}, "
            f"device={self.device}, rank={self.rank}/{self.world_size})"
        )
