"""Plain cross-entropy training: the student alone (the "vanilla" row of KD tables) and teacher training."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from kdpipe.distill.methods.base import KDMethod, MethodParams, TeacherRole
from kdpipe.registry import METHODS


class CEParams(MethodParams):
    name: Literal["ce"] = "ce"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    """Label smoothing of the cross-entropy target (0 = hard labels, the KD papers' setting)."""


@METHODS.register("ce", summary="cross-entropy on labels only; no teacher (baseline, and teacher training)")
class CrossEntropy(KDMethod):
    """Cross-entropy on the labels. ``L = CE(z_s, y)``. Needs no teacher and no taps."""

    Params = CEParams
    teacher_role: ClassVar[TeacherRole] = "none"
    params: CEParams

    def loss(self, student_out: Tensor, teacher_out: Tensor | None, targets: Tensor) -> dict[str, Tensor]:
        ce = F.cross_entropy(student_out.float(), targets, label_smoothing=self.params.label_smoothing)
        return {"loss": ce, "ce": ce.detach()}
