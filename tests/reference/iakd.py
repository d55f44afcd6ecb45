"""IAKD (Fu et al., "Interactive Knowledge Distillation", arXiv 2007.01476; Neurocomputing 2021) in float64: the
swap-probability schedule and the loss of shared/methods/offline.md §2.2 steps 4–5. Both are [our default] in the spec
(the paper's values were not retrieved), so this encodes the spec's reconstruction, not a published formula.
"""

from __future__ import annotations

import math

from numpy.typing import ArrayLike

from .baselines import kd_total


def swap_probability(
    epoch: int, epochs: int, p0: float = 0.5, gamma: float = 0.75, schedule: str = "linear", warmup: int = 0
) -> float:
    """p_t of the 0-based epoch e of E (§2.2 step 5): ``p0·max(0, 1 − e/(γ·E))`` ("linear"), its cosine form
    ``p0·½(1 + cos(π·min(1, e/(γ·E))))`` (the spec's cosine-decay ablation), or ``p0`` ("constant"). With ``warmup``
    epochs without swapping first (§2.5 pitfall 4, adapters warmed up), p_t = 0 for e < warmup and the decay runs over
    the epochs left before γ·E: e → e − warmup, γ·E → γ·E − warmup."""
    if epoch < warmup:
        return 0.0
    if schedule == "constant":
        return p0
    span = gamma * epochs - warmup
    progress = min(1.0, (epoch - warmup) / span) if span > 0 else 1.0
    if schedule == "cosine":
        return p0 * 0.5 * (1.0 + math.cos(math.pi * progress))
    return p0 * max(0.0, 1.0 - progress)


def total_loss(
    hybrid: ArrayLike,
    teacher: ArrayLike,
    targets: ArrayLike,
    *,
    temperature: float = 4.0,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
) -> float:
    """§2.2 step 4: ``w_ce·CE(logits_h, y) + λ_kd·τ²·KL(softmax(z_t/τ) ‖ softmax(logits_h/τ))`` (defaults 1, 1, τ = 4)."""
    return kd_total(hybrid, teacher, targets, temperature, ce_weight, kd_weight)
