"""The trainer's side of a training step, handed to the method it trains.

The trainer owns loss scaling (fp16), gradient averaging over data-parallel ranks and the learning-rate schedule;
a method that steps optimizers itself (online methods, a meta-learned controller) does so through
``StepControl.apply``, and reads the schedule's current student lr and epoch from it, instead of the trainer
writing attributes into the method. A method built outside a trainer (a test, a notebook) holds an unbound
``StepControl``: fp32, one process, ``lr`` as set.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kdpipe import distributed


@dataclass
class StepControl:
    """Loss scaling, gradient averaging and the schedule's position, as the trainer sets them."""

    scaler: torch.amp.GradScaler | None = None
    """The trainer's fp16 loss scaler (None or disabled: no scaling)."""
    lr: float = 0.0
    """The student's learning rate in the current epoch (the schedule's base lr times its factor)."""
    epoch: int = 0
    """The current epoch, 0-based."""
    epochs: int = 1

    def average(self, params: Iterable[nn.Parameter]) -> None:
        """Average ``params``' gradients over data-parallel ranks (nothing in one process): before every step."""
        distributed.average_gradients(params)

    def apply(self, loss: Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Backpropagate ``loss`` and step ``optimizer``: zero its gradients, scale the loss (fp16), backward, average
        the gradients over ranks, step (unscaling, skipping the step on inf/nan under fp16)."""
        optimizer.zero_grad(set_to_none=True)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self.scaler is not None and self.scaler.is_enabled():
            self.scaler.scale(loss).backward()
            self.average(params)
            self.scaler.step(optimizer)
        else:
            loss.backward()
            self.average(params)
            optimizer.step()
