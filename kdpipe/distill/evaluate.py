"""Accuracy of a classifier on a split: top-1, top-5, mean loss, per-class accuracy and the predictions
(so two models can be compared sample by sample, e.g. student-teacher agreement)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class EvalResult:
    top1: float
    top5: float
    loss: float
    num_samples: int
    per_class: list[float] = field(default_factory=list)
    predictions: Tensor | None = field(default=None, repr=False)
    """Top-1 class per sample, in loader order (CPU int64)."""

    def metrics(self) -> dict[str, float]:
        return {"top1": self.top1, "top5": self.top5, "loss": self.loss}


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], num_classes: int) -> EvalResult:
    """Evaluate ``model`` (switched to eval mode and restored afterwards) on ``batches`` of (images, labels)."""
    was_training = model.training
    model.eval()
    k = min(5, num_classes)
    correct1 = correct5 = 0
    loss_sum = 0.0
    n = 0
    hits = torch.zeros(num_classes, dtype=torch.float64)
    counts = torch.zeros(num_classes, dtype=torch.float64)
    preds = []
    try:
        for images, labels in batches:
            logits = model(images).float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            topk = logits.topk(k, dim=1).indices
            ok1 = topk[:, 0] == labels
            correct1 += int(ok1.sum())
            correct5 += int((topk == labels[:, None]).any(dim=1).sum())
            n += labels.numel()
            labels_cpu = labels.cpu()
            hits.index_add_(0, labels_cpu, ok1.cpu().double())
            counts.index_add_(0, labels_cpu, torch.ones_like(labels_cpu, dtype=torch.float64))
            preds.append(topk[:, 0].cpu())
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("evaluate() got no samples")
    per_class = torch.where(counts > 0, hits / counts.clamp(min=1), torch.nan).tolist()
    return EvalResult(
        top1=correct1 / n,
        top5=correct5 / n,
        loss=loss_sum / n,
        num_samples=n,
        per_class=per_class,
        predictions=torch.cat(preds),
    )
