"""Deep mutual learning (DML): two or more networks trained together, each learning from the others.

Paper: Zhang, Xiang, Hospedales, Lu, "Deep Mutual Learning", CVPR 2018, arXiv 1706.00384.

Loss of network k among K: ``L_k = CE(z_k, y) + (τ² / (K − 1)) · Σ_{j≠k} KL(sg p_j^τ ‖ p_k^τ)``, KL summed over classes
and averaged over the batch, the peers' predictions detached. The original uses τ = 1 (then τ² = 1); FFSD's common
students use τ = 2. Every network has its own optimizer (the stage's optimizer settings, its own base lr); all
forwards precede the updates of an iteration, so every network learns from the same pre-update predictions. With
K = 2 this is SwitOKD's learning mode exactly.

Networks: "teacher" (the teacher stage's architecture, trained jointly from the weights it saved: its random
initialisation when the stage gives no weights), "student" (deployed) and any ``extra_peers`` (model names, built
for the run's data). Taps: none. Teacher: joint.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat
from torch import Tensor, nn

from kdpipe.distill.methods.base import KDMethod, MethodContext, MethodParams
from kdpipe.distill.methods.kd import kd_loss
from kdpipe.distill.step import OptimizerSpec
from kdpipe.registry import METHODS


class DMLParams(MethodParams):
    name: Literal["dml"] = "dml"
    temperature: PositiveFloat = 1.0
    """Softmax temperature of the mutual KL terms (the paper: 1); the KL is scaled by τ²."""
    kd_weight: float = Field(1.0, ge=0.0)
    """Weight of the mutual-learning term against the CE (the paper: 1)."""
    teacher_lr: PositiveFloat | None = None
    """Base lr of the teacher-stage network (default: the stage's train.lr)."""
    extra_peers: list[str] = Field(default_factory=list)
    """More networks to train mutually (timm or kdpipe model names), named peer1, peer2, ..."""


def mutual_losses(logits: list[Tensor], targets: Tensor, temperature: float, kd_weight: float) -> list[Tensor]:
    """DML loss of each network: CE + kd_weight · τ² · mean over peers of KL(sg p_peer ‖ p_self)."""
    detached = [z.detach() for z in logits]
    losses = []
    for k, z in enumerate(logits):
        peers = [kd_loss(z, detached[j], temperature) for j in range(len(logits)) if j != k]
        losses.append(F.cross_entropy(z.float(), targets) + kd_weight * torch.stack(peers).mean())
    return losses


@METHODS.register("dml", summary="deep mutual learning of the teacher, student and extra peers (arXiv 1706.00384)")
class DML(KDMethod):
    """Deep mutual learning (see module docstring)."""

    Params = DMLParams
    params: DMLParams
    teacher_role = "joint"
    manual_optimization = True

    def __init__(
        self,
        params: DMLParams,
        student: nn.Module,
        teacher: nn.Module | None = None,
        context: MethodContext | None = None,
    ) -> None:
        super().__init__(params, student, teacher, context)
        self.peers = nn.ModuleList(self.build_network(arch) for arch in params.extra_peers)

    def networks(self) -> dict[str, nn.Module]:
        nets: dict[str, nn.Module] = {"teacher": self.joint_teacher, "student": self.student}
        nets.update({f"peer{i + 1}": peer for i, peer in enumerate(self.peers)})
        return nets

    def network_arch(self, name: str) -> str:
        if name.startswith("peer"):
            return self.params.extra_peers[int(name[4:]) - 1]
        return super().network_arch(name)

    def optimizer_specs(self) -> dict[str, OptimizerSpec]:
        return {
            name: OptimizerSpec(list(net.parameters()), lr=self.params.teacher_lr if name == "teacher" else None)
            for name, net in self.networks().items()
        }

    def training_step(self, images: Tensor, targets: Tensor) -> dict[str, Tensor]:
        nets = self.networks()
        logits = [net(images) for net in nets.values()]  # every forward before any update
        losses = mutual_losses(logits, targets, self.params.temperature, self.params.kd_weight)
        for name, loss in zip(nets, losses, strict=True):
            self.backward_step(loss, self.optimizer(name))
        out = {f"loss_{name}": loss.detach() for name, loss in zip(nets, losses, strict=True)}
        out["loss"] = torch.stack([loss.detach() for loss in losses]).sum()
        out["logits"] = logits[list(nets).index(self.deployed_network)].detach()
        return out
