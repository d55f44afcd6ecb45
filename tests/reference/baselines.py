"""CE, Hinton KD, DKD and DML in float64 numpy, from shared/methods/baselines.md (and Hinton et al. 2015; Zhao et al.,
"Decoupled Knowledge Distillation", CVPR 2022; Zhang et al., "Deep Mutual Learning", CVPR 2018). Inputs are
array-likes of logits (B, C) and integer targets (B,); every function returns a batch mean as a Python float (one per
network for DML)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

Array = NDArray[np.float64]


def softmax(z: ArrayLike, temperature: float = 1.0) -> Array:
    """Row-wise softmax of z/τ with the row maximum subtracted first (no overflow)."""
    x = np.asarray(z, dtype=np.float64) / temperature
    e = np.exp(x - x.max(axis=1, keepdims=True))
    out: Array = e / e.sum(axis=1, keepdims=True)
    return out


def kl_rows(p: ArrayLike, q: ArrayLike) -> Array:
    """KL(p ‖ q) per row, summed over classes; 0·log 0 taken as 0."""
    p64, q64 = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    terms = np.where(p64 > 0, p64 * (np.log(np.where(p64 > 0, p64, 1.0)) - np.log(q64)), 0.0)
    out: Array = terms.sum(axis=1)
    return out


def cross_entropy_rows(z: ArrayLike, targets: ArrayLike) -> Array:
    """−log softmax(z)_y per row."""
    p = softmax(z)
    y = np.asarray(targets, dtype=np.int64)
    out: Array = -np.log(p[np.arange(len(y)), y])
    return out


def cross_entropy(z: ArrayLike, targets: ArrayLike) -> float:
    return float(cross_entropy_rows(z, targets).mean())


def kd_rows(student: ArrayLike, teacher: ArrayLike, temperature: float) -> Array:
    """τ² · KL(softmax(z_t/τ) ‖ softmax(z_s/τ)) per row (Hinton's τ² keeps the gradient scale)."""
    out: Array = temperature**2 * kl_rows(softmax(teacher, temperature), softmax(student, temperature))
    return out


def kd(student: ArrayLike, teacher: ArrayLike, temperature: float) -> float:
    return float(kd_rows(student, teacher, temperature).mean())


def kd_total(
    student: ArrayLike,
    teacher: ArrayLike,
    targets: ArrayLike,
    temperature: float = 4.0,
    ce_weight: float = 0.1,
    kd_weight: float = 0.9,
) -> float:
    """The CRD/mdistiller convention: w_ce · CE + w_kd · τ²·KL."""
    return ce_weight * cross_entropy(student, targets) + kd_weight * kd(student, teacher, temperature)


def dkd_parts(student: ArrayLike, teacher: ArrayLike, targets: ArrayLike, temperature: float) -> tuple[float, float]:
    """(TCKD, NCKD), batch means without τ²: TCKD = KL over the binary [p_y, 1 − p_y]; NCKD = KL over a softmax of
    the non-target logits only (the target entry removed before the softmax)."""
    s, t = np.asarray(student, dtype=np.float64), np.asarray(teacher, dtype=np.float64)
    y = np.asarray(targets, dtype=np.int64)
    rows = np.arange(len(y))
    ps, pt = softmax(s, temperature), softmax(t, temperature)
    bs = np.stack([ps[rows, y], 1.0 - ps[rows, y]], axis=1)
    bt = np.stack([pt[rows, y], 1.0 - pt[rows, y]], axis=1)
    keep = np.ones_like(s, dtype=bool)
    keep[rows, y] = False
    c = s.shape[1]
    s_nt, t_nt = s[keep].reshape(len(y), c - 1), t[keep].reshape(len(y), c - 1)
    nckd = kl_rows(softmax(t_nt, temperature), softmax(s_nt, temperature))
    return float(kl_rows(bt, bs).mean()), float(nckd.mean())


def dkd_total(
    student: ArrayLike,
    teacher: ArrayLike,
    targets: ArrayLike,
    *,
    temperature: float = 4.0,
    alpha: float = 1.0,
    beta: float = 8.0,
    ce_weight: float = 1.0,
    warmup: float = 1.0,
) -> float:
    """``w_ce · CE + warmup · τ² · (α · TCKD + β · NCKD)``, ``warmup`` = min(epoch / warmup_epochs, 1)."""
    tckd, nckd = dkd_parts(student, teacher, targets, temperature)
    return ce_weight * cross_entropy(student, targets) + warmup * temperature**2 * (alpha * tckd + beta * nckd)


def fused_total(
    student: ArrayLike, teacher: ArrayLike, targets: ArrayLike, alpha: ArrayLike, temperature: float
) -> float:
    """TGeo-KD's per-sample fusion (shared/methods/offline.md §3): mean_i[α_i · τ²KL_i + (1 − α_i) · CE_i]."""
    a = np.asarray(alpha, dtype=np.float64)
    rows = a * kd_rows(student, teacher, temperature) + (1.0 - a) * cross_entropy_rows(student, targets)
    return float(rows.mean())


def mutual_losses(
    logits: Sequence[ArrayLike], targets: ArrayLike, temperature: float, kd_weight: float = 1.0
) -> list[float]:
    """DML (Zhang et al., "Deep Mutual Learning", CVPR 2018; shared/methods/baselines.md): for each of the K networks,
    ``L_k = CE(z_k, y) + w_kd · (1/(K−1)) Σ_{j≠k} τ²·KL(softmax(z_j/τ) ‖ softmax(z_k/τ))`` (τ = 1 in the paper)."""
    out = []
    for k, z in enumerate(logits):
        peers = [kd(z, peer, temperature) for j, peer in enumerate(logits) if j != k]
        out.append(cross_entropy(z, targets) + kd_weight * float(np.mean(peers)))
    return out
