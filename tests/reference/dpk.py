"""DPK (Qiu et al., "Better Teacher Better Student: Dynamic Prior Knowledge for Knowledge Distillation", ICLR 2023,
arXiv 2206.06067) loss pieces in float64 numpy, from shared/methods/offline.md §1.2: linear CKA with the biased HSIC
(step 9) or the unbiased one of the minibatch CKA (Nguyen, Raghu & Kornblith, ICLR 2021; Song et al., JMLR 2012),
the teacher-token count (step 5), the reconstruction loss (step 8) and the total loss (step 10). Feature batches are
array-likes (B, ...) flattened per sample; results are Python floats.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

from .baselines import Array, kd_total


def gram(x: ArrayLike) -> Array:
    """The B×B linear-kernel Gram matrix ``K = X Xᵀ`` of the uncentred features, flattened per sample."""
    x64 = np.asarray(x, dtype=np.float64)
    x64 = x64.reshape(x64.shape[0], -1)
    out: Array = x64 @ x64.T
    return out


def hsic_biased(k: ArrayLike, l_: ArrayLike) -> float:
    """``HSIC(K, L) = tr(K H L H) / (B − 1)²`` with ``H = I − 11ᵀ/B`` (Gretton et al. 2005)."""
    k64, l64 = np.asarray(k, dtype=np.float64), np.asarray(l_, dtype=np.float64)
    n = k64.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(k64 @ h @ l64 @ h)) / (n - 1) ** 2


def hsic_unbiased(k: ArrayLike, l_: ArrayLike) -> float:
    """Song et al.'s unbiased HSIC_1 on Grams with zeroed diagonals K̃, L̃ (needs n ≥ 4):
    ``[tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1/((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1] / (n(n−3))``."""
    kt, lt = np.array(k, dtype=np.float64), np.array(l_, dtype=np.float64)
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(lt, 0.0)
    n = kt.shape[0]
    ones = np.ones(n)
    trace = float(np.trace(kt @ lt))
    sums = float(ones @ kt @ ones) * float(ones @ lt @ ones) / ((n - 1) * (n - 2))
    cross = 2.0 / (n - 2) * float(ones @ kt @ lt @ ones)
    return (trace + sums - cross) / (n * (n - 3))


def linear_cka(x: ArrayLike, y: ArrayLike, unbiased: bool = False) -> float:
    """``CKA = HSIC(K, L) / sqrt(HSIC(K, K)·HSIC(L, L))`` with K = XXᵀ, L = YYᵀ (offline.md §1.2 step 9)."""
    hsic = hsic_unbiased if unbiased else hsic_biased
    k, l_ = gram(x), gram(y)
    return hsic(k, l_) / math.sqrt(hsic(k, k) * hsic(l_, l_))


def teacher_token_count(ratio: float, n_tokens: int) -> int:
    """``round(π·N)`` teacher tokens per sample (step 5), halves rounded up, within [0, N]."""
    return min(max(math.floor(ratio * n_tokens + 0.5), 0), n_tokens)


def reconstruction_loss(pred: ArrayLike, target: ArrayLike, mask: ArrayLike, reduction: str = "visible") -> float:
    """Step 8: ``(Y − T)²`` averaged over every element ("all"), or summed over the student-visible positions (mask
    False; mask (B, 1, H, W), True = teacher-filled) and divided by their count times C ("visible")."""
    err = np.square(np.asarray(pred, dtype=np.float64) - np.asarray(target, dtype=np.float64))
    if reduction == "all":
        return float(err.mean())
    visible = ~np.asarray(mask, dtype=bool)
    return float((err * visible).sum()) / (int(visible.sum()) * err.shape[1])


def warmup_ramp(epoch: int, warmup_epochs: int) -> float:
    """The linear λ_dpk ramp of step 10 (DKD/ReviewKD's 20 epochs): ``min((epoch + 1)/W, 1)``, 0-based epoch."""
    return min((epoch + 1) / warmup_epochs, 1.0) if warmup_epochs > 0 else 1.0


def total_loss(
    student: ArrayLike,
    teacher: ArrayLike,
    targets: ArrayLike,
    recon: ArrayLike,
    *,
    epoch: int,
    warmup_epochs: int = 20,
    temperature: float = 4.0,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    dpk_weight: float = 1.0,
) -> float:
    """Step 10: ``w_ce·CE(z_s, y) + λ_kd·τ²·KL(softmax(z_t/τ) ‖ softmax(z_s/τ)) + ramp(epoch)·λ_dpk·Σ_k L_k``."""
    stages = float(np.sum(np.asarray(recon, dtype=np.float64)))
    return (
        kd_total(student, teacher, targets, temperature, ce_weight, kd_weight)
        + warmup_ramp(epoch, warmup_epochs) * dpk_weight * stages
    )
