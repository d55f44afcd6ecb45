"""Per-epoch statistics a KD method logs beside the trainer's losses (swap fractions, switch decisions, fusion
ratios): one accumulator for every method.

``EpochStats`` keeps named running sums as float64 tensors on the method's device, so recording a step never
waits for the GPU, and in the method's ``state_dict`` with the epoch they belong to, so a run stopped and resumed
in the middle of an epoch reports that epoch's statistics exactly as an uninterrupted one. Values whose whole
distribution is reported (percentiles) are ``collect``ed instead: kept for the epoch, not checkpointed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class EpochStats(nn.Module):
    """Running sums ``name -> float64 tensor of a fixed shape``, reset at each new epoch; see the module docstring."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        super().__init__()
        self.names = tuple(shapes)
        for name, shape in shapes.items():
            self.register_buffer(f"sum_{name}", torch.zeros(shape, dtype=torch.float64))
        self.epoch_of: Tensor
        self.register_buffer("epoch_of", torch.tensor(-1))
        self._collected: dict[str, list[Tensor]] = {}

    def begin(self, epoch: int) -> None:
        """Start ``epoch``: zero the sums, unless they already belong to it (a run resumed mid-epoch)."""
        if int(self.epoch_of.item()) != epoch:
            for name in self.names:
                self.total(name).zero_()
            self.epoch_of.fill_(epoch)
        self._collected = {}

    def total(self, name: str) -> Tensor:
        """The running sum ``name`` (a live buffer)."""
        value: Tensor = getattr(self, f"sum_{name}")
        return value

    def add(self, name: str, value: Tensor | float | list[float] | list[list[float]]) -> None:
        """Add ``value`` (broadcast to the sum's shape) to the running sum ``name``, on the device."""
        target = self.total(name)
        if isinstance(value, Tensor):
            target += value.detach().to(device=target.device, dtype=torch.float64)
        else:
            target += torch.as_tensor(value, dtype=torch.float64, device=target.device)

    def collect(self, name: str, value: Tensor) -> None:
        """Keep ``value`` (detached) for this epoch's distribution of ``name``."""
        self._collected.setdefault(name, []).append(value.detach())

    def collected(self, name: str) -> list[Tensor]:
        return self._collected.get(name, [])
