"""The trainer's side of a training step, handed to the method it trains.

The trainer owns loss scaling (fp16), gradient averaging over data-parallel ranks and the learning-rate schedule;
a method that steps optimizers itself (online methods, a meta-learned controller) does so through
``StepControl.apply``, and reads the schedule's current student lr from it, instead of the trainer
writing attributes into the method. A method built outside a trainer (a test, a notebook) holds an unbound
``StepControl``: fp32, one process, ``lr`` as set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kdpipe import distributed

Build = Callable[[list[nn.Parameter], float], torch.optim.Optimizer]
"""``build(params, lr)``: an optimizer of a method's own kind (Adam for FFSD's decoders, fusion_ratio's controller)."""


@dataclass
class OptimizerSpec:
    """An optimizer a method steps itself, as the method declares it (``KDMethod.optimizer_specs``); the trainer
    builds it, schedules its lr, checkpoints it and hands it back in ``StepControl.optimizers``."""

    params: list[nn.Parameter]
    lr: float | None = None
    """Base lr (None: the stage's train.lr)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """TrainConfig fields for this optimizer (weight_decay, optimizer, momentum, nesterov)."""
    build: Build | None = None
    """An optimizer of the method's own kind instead of the stage's."""
    scheduled: bool = True
    """Its lr follows the stage's schedule (False: a fixed lr, e.g. a meta-learned controller's)."""


@dataclass
class StepControl:
    """Loss scaling, gradient averaging and the schedule's position, as the trainer sets them."""

    scaler: torch.amp.GradScaler | None = None
    """The trainer's fp16 loss scaler (None or disabled: no scaling)."""
    lr: float = 0.0
    """The student's learning rate in the current epoch (the schedule's base lr times its factor)."""
    optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    """The method's own optimizers (from its ``optimizer_specs``), built by the trainer, by name."""
    bound: bool = False
    """True once a trainer owns this control; an unbound one builds the optimizers itself (``plain_optimizers``)."""

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


def plain_optimizers(specs: dict[str, OptimizerSpec], lr: float) -> dict[str, torch.optim.Optimizer]:
    """The optimizers of ``specs`` for a method used without a trainer (a test, a notebook): ``build`` where a spec
    has one, else SGD with momentum 0.9 at the spec's lr (or ``lr``)."""
    out: dict[str, torch.optim.Optimizer] = {}
    for name, spec in specs.items():
        rate = spec.lr if spec.lr is not None else lr
        out[name] = spec.build(spec.params, rate) if spec.build else torch.optim.SGD(spec.params, lr=rate, momentum=0.9)
    return out
