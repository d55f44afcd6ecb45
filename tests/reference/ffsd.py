"""FFSD, feature fusion and self-distillation (Li et al., "Distilling a Powerful Student Model via Online Knowledge
Distillation", IEEE TNNLS 2022, arXiv 2103.14473): its helpers and unweighted loss terms in float64 numpy, from
shared/methods/online.md §2.5–2.7 (the official SJLeo/FFSD code's formulas). Feature maps are array-likes
(B, C, H, W), attention maps (B, 1, H, W), logits (B, K); losses are Python floats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from .baselines import Array, cross_entropy, kd


def attention_map(f: ArrayLike) -> Array:
    """``AT(F) = mean_c F²``, shape (B, 1, H, W) (§2.5)."""
    out: Array = np.square(np.asarray(f, dtype=np.float64)).mean(axis=1, keepdims=True)
    return out


def unit(x: ArrayLike) -> Array:
    """``n(v) = v / max(‖v‖₂, 1e-12)`` per sample, flattened to (B, N) (§2.5)."""
    v = np.asarray(x, dtype=np.float64)
    v = v.reshape(v.shape[0], -1)
    out: Array = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return out


def normalized_mse(a: ArrayLike, b: ArrayLike) -> float:
    """``D(a, b) = mean over batch and elements of (n(a) − n(b))²``, i.e. divided by B·N (§2.5)."""
    return float(np.square(unit(a) - unit(b)).mean())


def shift_target(a: ArrayLike) -> Array:
    """The attention-shift target t of a reference map A (§2.5), shape of A: with ν = ‖A‖₂ per sample (un-normalised),
    â = n(A) and θ the ⌊N/3⌋-th smallest value of â, ``t = ν − â`` where â > θ, ``â`` where â < θ, ``ν/2`` where â = θ.
    For N < 3 there is no bottom third (pitfall 7 only says "guard"): every position is inverted, as if θ = −∞."""
    a64 = np.asarray(a, dtype=np.float64)
    flat = a64.reshape(a64.shape[0], -1)
    nu = np.linalg.norm(flat, axis=1, keepdims=True)
    a_hat = unit(flat)
    k = flat.shape[1] // 3
    theta = np.sort(a_hat, axis=1)[:, k - 1 : k] if k else np.full_like(nu, -np.inf)
    nu_full = np.broadcast_to(nu, a_hat.shape)
    t = np.select([a_hat > theta, a_hat < theta], [nu_full - a_hat, a_hat], default=0.0)
    t = np.where(a_hat == theta, nu_full / 2, t)
    out: Array = t.reshape(a64.shape)
    return out


def shift_features(f: ArrayLike) -> Array:
    """``Shift(F) = F + (ν / C)·(t − â)`` with A = AT(F), the (B, 1, H, W) increment broadcast over C (§2.5)."""
    f64 = np.asarray(f, dtype=np.float64)
    a = attention_map(f64)
    nu = np.linalg.norm(a.reshape(a.shape[0], -1), axis=1).reshape(-1, 1, 1, 1)
    increment = nu / f64.shape[1] * (shift_target(a) - unit(a).reshape(a.shape))
    out: Array = f64 + increment
    return out


def warmup_factor(epoch: int, warmup_epochs: int = 5) -> float:
    """λ(e)/λ = ``exp(−5(1 − e/W)²)`` for the 1-indexed epoch e ≤ W, else 1 (§2.7)."""
    return math.exp(-5.0 * (1.0 - epoch / warmup_epochs) ** 2) if epoch <= warmup_epochs else 1.0


def diversity_loss(current: ArrayLike, previous: ArrayLike) -> float:
    """``mean((n(AT(F_i^L)) − t(AT(F_{i−1}^L)))²)`` on last-tap maps; the target t is not normalised (§2.6 step 2)."""
    target = shift_target(attention_map(previous)).reshape(np.shape(previous)[0], -1)
    return float(np.square(unit(attention_map(current)) - target).mean())


def self_distillation_loss(shallow: Sequence[ArrayLike], decoded: Sequence[ArrayLike]) -> float:
    """``Σ_k D(AT(F^k), AT(Ď_k))`` over the shallow taps (§2.6 steps 2 and 4)."""
    return sum(normalized_mse(attention_map(f), attention_map(d)) for f, d in zip(shallow, decoded, strict=True))


def decoder_fit_loss(decoded: Sequence[ArrayLike], shallow: Sequence[ArrayLike]) -> float:
    """``Σ_k [D(Ď_k, F^k) + D(AT(Ď_k), AT(F^k))]``, a decoder's reconstruction of its owner's taps (§2.6 step 5)."""
    return sum(
        normalized_mse(d, f) + normalized_mse(attention_map(d), attention_map(f))
        for d, f in zip(decoded, shallow, strict=True)
    )


def fusion_loss(fused_logits: ArrayLike, mean_logits: ArrayLike, targets: ArrayLike, temperature: float) -> float:
    """``L_Φ = CE(z_f, y) + τ²·KL(softmax(z̄/τ) ‖ softmax(z_f/τ))`` (§2.6 step 3)."""
    return cross_entropy(fused_logits, targets) + kd(fused_logits, mean_logits, temperature)


def leader_terms(
    logits: ArrayLike,
    fused_logits: ArrayLike,
    leader_maps: Sequence[ArrayLike],
    fused: ArrayLike,
    trans: ArrayLike,
    students_last: ArrayLike,
    decoded: Sequence[ArrayLike],
    targets: ArrayLike,
    temperature: float,
) -> dict[str, float]:
    """The leader's unweighted terms (§2.6 step 4): ce = CE(z_L, y); kd = τ²·KL(softmax(z_f/τ) ‖ softmax(z_L/τ));
    fus = D(AT(F_L^L), AT(F_f)); trans = D(AT(T_L), AT(concat_i F_i^L)); sd = Σ_k D(AT(F_L^k), AT(D_L(F_f)_k))."""
    return {
        "ce": cross_entropy(logits, targets),
        "kd": kd(logits, fused_logits, temperature),
        "fus": normalized_mse(attention_map(leader_maps[-1]), attention_map(fused)),
        "trans": normalized_mse(attention_map(trans), attention_map(students_last)),
        "sd": self_distillation_loss(leader_maps[:-1], decoded),
    }
