"""SwitOKD (Qian et al., "Switchable Online Knowledge Distillation", ECCV 2022, arXiv 2209.04996) in float64 numpy,
from shared/methods/online.md §1.2–1.5 (the official code's formulas). Inputs are array-likes of logits (B, C) and
integer targets (B,); statistics are batch means of per-sample values, returned as Python floats.

Where the spec leaves τ ≠ 1 open (pitfall 2), this follows its advice: G and the KL terms use softmax(z/τ) with τ²
on the KL, a_s and a_t keep τ = 1. Each multi-network pair has its own ε (not the official scripts' copy-paste bug).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from .baselines import Array, cross_entropy, kd, softmax


class Switch(NamedTuple):
    """One teacher–student decision (§1.2–1.3)."""

    a_s: float
    a_t: float
    gap: float
    eps: float
    delta: float
    expert: bool


def label_distance_rows(z: ArrayLike, targets: ArrayLike) -> Array:
    """``‖softmax(z) − onehot(y)‖₁`` per row, at τ = 1 (§1.2; equals 2·(1 − p_y) for one-hot labels)."""
    p = softmax(z)
    y = np.asarray(targets, dtype=np.int64)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    out: Array = np.abs(p - onehot).sum(axis=1)
    return out


def gap(student: ArrayLike, teacher: ArrayLike, temperature: float = 1.0) -> float:
    """Distillation gap ``G = mean_b ‖softmax(z_s/τ) − softmax(z_t/τ)‖₁`` (§1.2), in [0, 2]."""
    return float(np.abs(softmax(student, temperature) - softmax(teacher, temperature)).sum(axis=1).mean())


def epsilon(a_s: float, a_t: float) -> float:
    """``ε = exp(−a_t / (a_s + a_t))`` from the batch means (§1.2, the code/equation form: ε ∈ [1/e, 1])."""
    return math.exp(-a_t / (a_s + a_t))


def switch(student: ArrayLike, teacher: ArrayLike, targets: ArrayLike, temperature: float = 1.0) -> Switch:
    """a_s, a_t, G, ε, the threshold ``δ = a_s − ε·a_t``, and the mode: expert iff ``G > δ and a_t < a_s`` (§1.3)."""
    a_s = float(label_distance_rows(student, targets).mean())
    a_t = float(label_distance_rows(teacher, targets).mean())
    g = gap(student, teacher, temperature)
    eps = epsilon(a_s, a_t)
    delta = a_s - eps * a_t
    return Switch(a_s, a_t, g, eps, delta, g > delta and a_t < a_s)


def pair_losses(
    student: ArrayLike, teacher: ArrayLike, targets: ArrayLike, temperature: float = 1.0
) -> tuple[float, float]:
    """Two networks (§1.4): ``L_S = CE(z_s, y) + KL(sg p_t ‖ p_s)``, ``L_T = CE(z_t, y) + KL(sg p_s ‖ p_t)``."""
    loss_s = cross_entropy(student, targets) + kd(student, teacher, temperature)
    loss_t = cross_entropy(teacher, targets) + kd(teacher, student, temperature)
    return loss_s, loss_t


def one_teacher_two_students(
    teacher: ArrayLike,
    student1: ArrayLike,
    student2: ArrayLike,
    targets: ArrayLike,
    expert: tuple[bool, bool],
    temperature: float = 1.0,
) -> tuple[float | None, float, float]:
    """1T2S (§1.5): ``L_T = w0·CE + w1·KL(sg p_S1 ‖ p_T) + w2·KL(sg p_S2 ‖ p_T)``, ``w_k = 0`` iff pair k is expert,
    ``w0 = 0`` iff both are (then None: no step); ``L_Sk = CE + KL(sg p_T ‖ p_Sk) + KL(sg p_Sj ‖ p_Sk)``."""
    w1, w2 = (0.0 if e else 1.0 for e in expert)
    loss_t = None
    if not all(expert):
        loss_t = cross_entropy(teacher, targets) + w1 * kd(teacher, student1, temperature)
        loss_t += w2 * kd(teacher, student2, temperature)
    loss_s1 = (
        cross_entropy(student1, targets) + kd(student1, teacher, temperature) + kd(student1, student2, temperature)
    )
    loss_s2 = (
        cross_entropy(student2, targets) + kd(student2, teacher, temperature) + kd(student2, student1, temperature)
    )
    return loss_t, loss_s1, loss_s2


def two_teachers_one_student(
    teacher1: ArrayLike,
    teacher2: ArrayLike,
    student: ArrayLike,
    targets: ArrayLike,
    expert: tuple[bool, bool],
    temperature: float = 1.0,
) -> tuple[float | None, float | None, float]:
    """2T1S (§1.5): T_i is paused (None) iff its pair with S is expert, else
    ``L_Ti = CE + KL(sg p_S ‖ p_Ti) + KL(sg p_Tj ‖ p_Ti)``; always ``L_S = CE + KL(sg p_T1 ‖ p_S) + KL(sg p_T2 ‖ p_S)``."""
    teachers = (teacher1, teacher2)
    losses: list[float | None] = []
    for i, (z, paused) in enumerate(zip(teachers, expert, strict=True)):
        other = teachers[1 - i]
        own = cross_entropy(z, targets) + kd(z, student, temperature) + kd(z, other, temperature)
        losses.append(None if paused else own)
    loss_s = cross_entropy(student, targets) + kd(student, teacher1, temperature) + kd(student, teacher2, temperature)
    return losses[0], losses[1], loss_s
