"""Decoupled knowledge distillation (DKD).

Paper: Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge Distillation", CVPR 2022, arXiv 2203.08679.

Loss, with ``p^τ = softmax(z/τ)`` and y the label:

- TCKD = KL(b_t ‖ b_s) over the binary distributions ``b = [p^τ_y, 1 − p^τ_y]`` (target vs all other classes);
- NCKD = KL(p̂_t ‖ p̂_s) over the non-target distributions ``p̂^τ`` = softmax over the classes ≠ y;
- ``L = w_ce · CE(z_s, y) + min(epoch / warmup, 1) · τ² · (α · TCKD + β · NCKD)``, KLs averaged over the batch.

Defaults are mdistiller's CIFAR-100 settings: w_ce = 1, α = 1, β = 8, τ = 4, warm-up 20 epochs. The warm-up factor
uses the 0-based epoch plus one, so the first epoch already distils at 1/warmup (mdistiller: ``min(epoch /
warmup, 1)`` with 1-based epochs). Everything runs in fp32; the non-target softmax drops the target column by
masking it with -inf in fp32 (a large negative constant overflows in bf16/fp16), so p̂ is exact, and the
binary part is taken in log space (log(1 − p_y) = logsumexp of the other logits − logsumexp of all), finite even
where p_y rounds to 1.

Taps: none (logits only). Teacher: frozen.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat
from torch import Tensor

from kdpipe.distill.methods.base import KDMethod, MethodParams, linear_ramp
from kdpipe.registry import METHODS


class DKDParams(MethodParams):
    name: Literal["dkd"] = "dkd"
    temperature: PositiveFloat = 4.0
    """Softmax temperature τ of both KL terms."""
    alpha: float = Field(1.0, ge=0.0)
    """Weight of the target-class term TCKD."""
    beta: float = Field(8.0, ge=0.0)
    """Weight of the non-target term NCKD (mdistiller uses 8 for most CIFAR-100 pairs; see its per-pair configs)."""
    ce_weight: float = Field(1.0, ge=0.0)
    """Weight of the cross-entropy on labels."""
    warmup_epochs: int = Field(20, ge=0)
    """The KD part ramps linearly from 1/warmup to 1 over this many epochs (0: no ramp)."""


def dkd_parts(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """(TCKD, NCKD) at temperature τ, each a batch-mean KL without the τ² factor, computed in fp32."""
    z_s = student_logits.float() / temperature
    z_t = teacher_logits.float() / temperature
    target = F.one_hot(targets, z_s.shape[1]).bool()
    # Non-target logits: the target column masked out with -inf (exact; a finite constant overflows in bf16/fp16).
    masked_s = z_s.masked_fill(target, float("-inf"))
    masked_t = z_t.masked_fill(target, float("-inf"))
    # Binary part in log space: log p_y = z_y − lse(z), log(1 − p_y) = lse(z_{≠y}) − lse(z). Exact even where p_y
    # rounds to 1, where log(1 − softmax) would give −inf and the KL inf.
    log_b_s = torch.stack([z_s.masked_select(target), masked_s.logsumexp(1)], 1) - z_s.logsumexp(1, keepdim=True)
    log_b_t = torch.stack([z_t.masked_select(target), masked_t.logsumexp(1)], 1) - z_t.logsumexp(1, keepdim=True)
    tckd = (log_b_t.exp() * (log_b_t - log_b_s)).sum(1).mean()
    # Non-target part: KL of the softmaxes over the other classes.
    log_q_s = F.log_softmax(masked_s, 1).masked_fill(target, 0.0)
    log_q_t = F.log_softmax(masked_t, 1).masked_fill(target, 0.0)
    nckd = (log_q_t.exp() * (log_q_t - log_q_s)).sum(1).mean()
    return tckd, nckd


@METHODS.register("dkd", summary="decoupled KD: CE + τ²(α·TCKD + β·NCKD) with warm-up (arXiv 2203.08679)")
class DKD(KDMethod):
    """Decoupled KD (see module docstring)."""

    Params = DKDParams
    params: DKDParams

    def warmup_factor(self) -> float:
        return linear_ramp(self.epoch, self.params.warmup_epochs)

    def loss(self, student_out: Tensor, teacher_out: Tensor | None, targets: Tensor) -> dict[str, Tensor]:
        assert teacher_out is not None
        p = self.params
        ce = F.cross_entropy(student_out.float(), targets)
        tckd, nckd = dkd_parts(student_out, teacher_out, targets, p.temperature)
        kd = p.temperature**2 * (p.alpha * tckd + p.beta * nckd)
        loss = p.ce_weight * ce + self.warmup_factor() * kd
        return {"loss": loss, "ce": ce.detach(), "tckd": tckd.detach(), "nckd": nckd.detach(), "kd": kd.detach()}
