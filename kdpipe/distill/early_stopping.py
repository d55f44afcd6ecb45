"""Early stopping on the validation top-1, with the best evaluation's weights kept (``train.early_stopping``).

Training stops once ``patience`` evaluations in a row (one every ``train.eval_every`` epochs) have not beaten the
best top-1 by more than ``min_delta``; the network then gets the weights it had at its best evaluation back
(``restore_best``), as Keras' ``EarlyStopping(restore_best_weights=True)`` and Ultralytics' ``patience`` with
best.pt do. TGeo-KD's protocol is patience 10 on a validation split [paper, App. A.2]; ``start_epoch`` keeps misses
before a given epoch (the last lr decay of a step schedule) from counting, so a run is not stopped at its first,
high lr.

The decision is only as honest as the split it reads: the stages refuse early stopping when ``data.val_fraction`` is
0, where "eval" would be the test split. Its state (best, the count, the best weights) lives in the training
checkpoint, so a resumed run stops at the same epoch with the same weights as an uninterrupted one. Under torchrun
every rank evaluates the whole eval split with the same (broadcast) weights, so every rank stops at the same epoch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from kdpipe.config import EarlyStoppingConfig


class EarlyStopping:
    """Watches one network's evaluations; ``update`` says when to stop, ``finish`` restores the best weights."""

    def __init__(self, cfg: EarlyStoppingConfig, network: nn.Module) -> None:
        self.cfg = cfg
        self.network = network
        self.best = math.nan
        self.best_epoch = -1
        self.evals_since_best = 0
        self.stopped_epoch: int | None = None
        """The epoch (1-based) after which training stopped early; None while it runs or when it ran to the end."""
        self._best_state: dict[str, Tensor] | None = None

    def update(self, top1: float, epoch: int) -> bool:
        """Record the evaluation after ``epoch`` (1-based); True when training should stop now."""
        if math.isnan(self.best) or top1 > self.best + self.cfg.min_delta:
            self.best, self.best_epoch, self.evals_since_best = top1, epoch, 0
            if self.cfg.restore_best:
                self._best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.network.state_dict().items()}
            return False
        if epoch <= self.cfg.start_epoch:  # before start_epoch a miss is not counted (the lr has not decayed yet)
            return False
        self.evals_since_best += 1
        if self.evals_since_best >= self.cfg.patience:
            self.stopped_epoch = epoch
            return True
        return False

    def finish(self) -> bool:
        """Give the network its best evaluation's weights (with ``restore_best``); True when that changed them."""
        if not self.cfg.restore_best or self._best_state is None or self.evals_since_best == 0:
            return False
        self.network.load_state_dict(self._best_state)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_epoch": self.best_epoch,
            "evals_since_best": self.evals_since_best,
            "stopped_epoch": -1 if self.stopped_epoch is None else self.stopped_epoch,
            "best_state": self._best_state or {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch = float(state["best"]), int(state["best_epoch"])
        self.evals_since_best = int(state["evals_since_best"])
        self.stopped_epoch = None if int(state["stopped_epoch"]) < 0 else int(state["stopped_epoch"])
        best_state = state["best_state"]
        self._best_state = {k: torch.as_tensor(v) for k, v in best_state.items()} if best_state else None
