"""Hinton knowledge distillation.

Paper: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", NIPS 2014 Deep Learning Workshop,
arXiv 1503.02531.

Loss: ``L = w_ce · CE(z_s, y) + w_kd · τ² · KL(softmax(z_t/τ) ‖ softmax(z_s/τ))``, KL summed over classes and
averaged over the batch; the τ² factor keeps the soft-target gradient scale independent of τ. Defaults are the
CIFAR-100 convention of CRD / mdistiller (τ = 4, w_ce = 0.1, w_kd = 0.9). ``alpha`` is the other common
parametrisation, ``alpha·KD + (1 − alpha)·CE``.

Taps: none (logits only). Teacher: frozen.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field, PositiveFloat, model_validator
from torch import Tensor

from kdpipe.distill.methods.base import KDMethod, MethodParams
from kdpipe.registry import METHODS


class KDParams(MethodParams):
    name: Literal["kd"] = "kd"
    temperature: PositiveFloat = 4.0
    """Softmax temperature τ for both teacher and student."""
    ce_weight: float = Field(0.1, ge=0.0)
    """Weight of the cross-entropy on labels (CRD/mdistiller: 0.1)."""
    kd_weight: float = Field(0.9, ge=0.0)
    """Weight of the τ²-scaled KL term (CRD/mdistiller: 0.9)."""
    alpha: float | None = Field(None, ge=0.0, le=1.0)
    """Shorthand: kd_weight = alpha, ce_weight = 1 - alpha. Do not combine with the explicit weights."""

    @model_validator(mode="before")
    @classmethod
    def _alpha(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("alpha") is not None:
            if "ce_weight" in data or "kd_weight" in data:
                raise ValueError("give either alpha or ce_weight/kd_weight, not both")
            alpha = data["alpha"]
            if isinstance(alpha, (int, float)):
                data = {**data, "kd_weight": float(alpha), "ce_weight": 1.0 - float(alpha)}
        return data


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """``τ² · KL(softmax(z_t/τ) ‖ softmax(z_s/τ))`` averaged over the batch, computed in fp32."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


@METHODS.register("kd", summary="Hinton KD: CE + τ²·KL(teacher ‖ student) at temperature τ (arXiv 1503.02531)")
class HintonKD(KDMethod):
    """Hinton KD (see module docstring)."""

    Params = KDParams
    params: KDParams

    def loss(self, student_out: Tensor, teacher_out: Tensor | None, targets: Tensor) -> dict[str, Tensor]:
        assert teacher_out is not None
        p = self.params
        ce = F.cross_entropy(student_out.float(), targets)
        kd = kd_loss(student_out, teacher_out, p.temperature)
        return {"loss": p.ce_weight * ce + p.kd_weight * kd, "ce": ce.detach(), "kd": kd.detach()}
