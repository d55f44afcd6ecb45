"""SwitOKD: online distillation that pauses the teacher while it runs too far ahead of the student.

Paper: Qian, Wang, Yin, Hong, Wang, "Switchable Online Knowledge Distillation", ECCV 2022, arXiv 2209.04996; official
code hfutqian/SwitOKD (spec: shared/methods/online.md §1, §3, §4).

A teacher T and a student S train together from the same forward of each batch, DML-style, τ = 1, every weight 1:
``L_S = CE(z_s, y) + KL(sg p_t ‖ p_s)``, ``L_T = CE(z_t, y) + KL(sg p_s ‖ p_t)`` (KL summed over classes, batch mean).
The switch, once per batch, from detached fp32 logits at τ = 1: ``a_s = mean‖p_s − y‖₁``, ``a_t = mean‖p_t − y‖₁``,
gap ``G = mean‖p_s − p_t‖₁``, ``ε = exp(−a_t / (a_s + a_t))``, threshold ``δ = a_s − ε·a_t``. Expert mode iff
``G > δ and a_t < a_s``: only the student steps; the teacher takes no optimizer step at all (weights, momentum and
weight decay untouched) but its train-mode forward still moved its BatchNorm running statistics, and the student
learns from that forward. Learning mode: both step from the same pre-update predictions (exactly DML).

Paper vs code (we follow the code, which produced the published numbers): ε has the sum denominator, so ε ∈ [1/e, 1];
the conjunct ``a_t < a_s`` is code-only; τ = 1 everywhere without τ²; teacher and student have their own lr (the
CIFAR-100 recipe: ``teacher_lr: 0.1``, ``student_lr: 0.01``).

Multi-network topologies (§1.5), generic over the teachers T_i and students S_k, one switch per (T_i, S_k) pair:

- 1T2S (``second_student``): ``L_T = w0·CE + Σ_k w_k·KL(sg p_Sk ‖ p_T)``, ``w_k = 0`` iff pair k is in expert mode,
  ``w0 = 0`` iff every pair is; then T takes no step. ``L_Sk = CE + KL(sg p_T ‖ p_Sk) + KL(sg p_Sj ‖ p_Sk)``.
- 2T1S (``second_teacher``): T_i is paused iff its pair with S is in expert mode, else
  ``L_Ti = CE + KL(sg p_S ‖ p_Ti) + KL(sg p_Tj ‖ p_Ti)``; ``L_S = CE + Σ_i KL(sg p_Ti ‖ p_S)``.

Unlike the official multi-net scripts, each pair's ε comes from that pair's own a values, and a paused teacher never
calls ``step()`` (the 1T2S script stepped it with a zero loss, so weight decay and momentum still moved it).

Our choices:

- ``temperature`` τ ≠ 1 (not in the official code; spec pitfall 2): G and the KL terms use ``softmax(z/τ)``, the KL is
  scaled by τ², a_s and a_t keep τ = 1.
- Under DDP the per-pair sums of (a_s, a_t, G) and the sample count are all-reduced before deciding
  (:func:`all_reduce_switch_sums`), so every rank takes the same branch on the global batch, as the original single-
  process DataParallel did.
- ``mode: expert | learning`` forces every pair (ablations: "learning" is DML; "expert" never trains the teachers).
- Logged per epoch for each pair (keys suffixed ``_<teacher>_<student>`` when there are several pairs): expert_frac,
  and the epoch means of gap (G), delta, eps, a_s, a_t; with several networks also ``paused_frac_<teacher>``. The sums
  are buffers, so a run resumed mid-epoch logs what an uninterrupted one would. Per batch: ``ce_<net>`` for every
  network and ``loss_<net>`` for what each network stepped on (0 for a paused teacher); ``loss`` is their sum.
- The deployed network is the distill stage's ``student``; a second network is built with the run's classes and
  input channels, trained from its seeded random initialisation, and uses ``second_lr`` (default: the lr of its role).

Taps: none (logits only). Teacher: joint (trained with the student, from the teacher stage's weights or its seeded
random initialisation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import PositiveFloat, field_validator, model_validator
from torch import Tensor, nn

from kdpipe.distill.methods.base import KDMethod, MethodContext, MethodParams
from kdpipe.distill.methods.kd import kd_loss
from kdpipe.distill.stats import EpochStats
from kdpipe.distill.step import OptimizerSpec
from kdpipe.registry import METHODS

Mode = Literal["switch", "expert", "learning"]
_STATS = ("a_s", "a_t", "gap", "eps", "delta")


class SwitOKDParams(MethodParams):
    name: Literal["switokd"] = "switokd"
    temperature: PositiveFloat = 1.0
    """τ of the gap G and the KL terms (official: 1); the KL is scaled by τ²; a_s, a_t always use τ = 1."""
    teacher_lr: PositiveFloat | None = None
    """Base lr of the teacher (default: the stage's train.lr; CIFAR-100 recipe: 0.1). Follows the stage's schedule."""
    student_lr: PositiveFloat | None = None
    """Base lr of the student (default: the stage's train.lr; CIFAR-100 recipe: 0.01). Follows the schedule."""
    second_student: str | None = None
    """Topology 1T2S: model name of a second student ("student2"), trained with the teacher and the student."""
    second_teacher: str | None = None
    """Topology 2T1S: model name of a second teacher ("teacher2"), trained with the teacher and the student."""
    second_lr: PositiveFloat | None = None
    """Base lr of the second network (default: student_lr for a second student, teacher_lr for a second teacher)."""
    mode: Mode = "switch"
    """"switch" decides per batch (the method); "expert" / "learning" force every pair (ablations)."""

    @field_validator("second_student", "second_teacher")
    @classmethod
    def _known(cls, value: str | None) -> str | None:
        if value is not None:
            from kdpipe.errors import ConfigError
            from kdpipe.models.factory import check_model_name

            try:
                check_model_name(value, "model")
            except ConfigError as exc:
                raise ValueError(exc.message.removeprefix("model: ")) from None
        return value

    @model_validator(mode="after")
    def _one_topology(self) -> SwitOKDParams:
        if self.second_student is not None and self.second_teacher is not None:
            raise ValueError("give second_student (topology 1T2S) or second_teacher (2T1S), not both")
        return self


@dataclass(frozen=True)
class Switch:
    """One teacher–student decision from batch means (floats, computed in float64 from the fp32 sums)."""

    a_s: float
    a_t: float
    gap: float
    eps: float
    delta: float
    expert: bool


def label_distance(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-sample ``‖softmax(z) − y‖₁`` in fp32, detached; ``targets`` are class indices or soft label rows."""
    p = F.softmax(logits.detach().float(), dim=1)
    y = targets.float() if targets.dim() == 2 else F.one_hot(targets, p.shape[1]).float()
    return (p - y).abs().sum(dim=1)


def switch_sums(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """``[Σ a_s, Σ a_t, Σ G, n]`` over the batch (fp32, detached): what ranks add up before :func:`decide`."""
    p_s = F.softmax(student_logits.detach().float() / temperature, dim=1)
    p_t = F.softmax(teacher_logits.detach().float() / temperature, dim=1)
    gap = (p_s - p_t).abs().sum(dim=1)
    a_s, a_t = label_distance(student_logits, targets), label_distance(teacher_logits, targets)
    n = torch.tensor(float(targets.shape[0]), device=gap.device)
    return torch.stack([a_s.sum(), a_t.sum(), gap.sum(), n])


def all_reduce_switch_sums(sums: Tensor) -> Tensor:
    """Sum ``sums`` (any shape, e.g. pairs × 4) over all ranks when torch.distributed is initialised (pitfall 8)."""
    if dist.is_available() and dist.is_initialized():
        sums = sums.clone()
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    return sums


def decide(sums: Tensor) -> list[Switch]:
    """The switch of each pair from its (reduced) sums, a tensor of shape (4,) or (pairs, 4)."""
    switches = []
    for s_as, s_at, s_gap, n in sums.detach().reshape(-1, 4).double().cpu().tolist():
        a_s, a_t, gap = s_as / n, s_at / n, s_gap / n
        eps = math.exp(-a_t / (a_s + a_t)) if a_s + a_t > 0 else 1.0  # both exact on every sample: δ = 0
        delta = a_s - eps * a_t
        switches.append(Switch(a_s, a_t, gap, eps, delta, expert=gap > delta and a_t < a_s))
    return switches


def switokd_losses(
    teachers: Sequence[Tensor],
    students: Sequence[Tensor],
    targets: Tensor,
    expert: Sequence[Sequence[bool]],
    temperature: float = 1.0,
) -> tuple[list[Tensor | None], list[Tensor]]:
    """What each teacher steps on (None: paused, no step) and each student's loss; ``expert[i][k]`` is the mode of
    pair (teacher i, student k). Every KL target is the other network's detached prediction (module docstring)."""
    sg = [z.detach() for z in (*teachers, *students)]
    n_t = len(teachers)
    teacher_losses: list[Tensor | None] = []
    for i, z in enumerate(teachers):
        learning = [not e for e in expert[i]]
        if not any(learning):
            teacher_losses.append(None)
            continue
        terms = [F.cross_entropy(z.float(), targets)]
        terms += [kd_loss(z, sg[n_t + k], temperature) for k, on in enumerate(learning) if on]
        terms += [kd_loss(z, sg[j], temperature) for j in range(n_t) if j != i]
        teacher_losses.append(torch.stack(terms).sum())
    student_losses = []
    for k, z in enumerate(students):
        terms = [F.cross_entropy(z.float(), targets)]
        terms += [kd_loss(z, sg[j], temperature) for j in range(len(sg)) if j != n_t + k]
        student_losses.append(torch.stack(terms).sum())
    return teacher_losses, student_losses


@METHODS.register(
    "switokd", summary="switchable online KD: the teacher pauses while the gap to the student is large (2209.04996)"
)
class SwitOKD(KDMethod):
    """Switchable online knowledge distillation (see module docstring)."""

    Params = SwitOKDParams
    params: SwitOKDParams
    teacher_role = "joint"
    manual_optimization = True
    switch_totals: Tensor
    paused_totals: Tensor
    totals_epoch: Tensor

    def __init__(
        self,
        params: SwitOKDParams,
        student: nn.Module,
        teacher: nn.Module | None = None,
        context: MethodContext | None = None,
    ) -> None:
        super().__init__(params, student, teacher, context)
        self.teacher2: nn.Module | None = None
        self.student2: nn.Module | None = None
        second = params.second_student or params.second_teacher
        if second is not None:
            net = self.build_network(second)
            if params.second_student is not None:
                self.student2 = net
            else:
                self.teacher2 = net
        self.teacher_names = ["teacher"] + (["teacher2"] if self.teacher2 is not None else [])
        self.student_names = ["student"] + (["student2"] if self.student2 is not None else [])
        self.pairs = [(t, s) for t in self.teacher_names for s in self.student_names]
        # Per pair: batches, expert batches, then the sums of _STATS; per teacher: paused batches.
        self.stats = EpochStats({"switch": (len(self.pairs), 2 + len(_STATS)), "paused": (len(self.teacher_names),)})

    def networks(self) -> dict[str, nn.Module]:
        nets: dict[str, nn.Module] = {"teacher": self.joint_teacher}
        if self.teacher2 is not None:
            nets["teacher2"] = self.teacher2
        nets["student"] = self.student
        if self.student2 is not None:
            nets["student2"] = self.student2
        return nets

    def network_arch(self, name: str) -> str:
        if name == "teacher2":
            return self.params.second_teacher or ""
        if name == "student2":
            return self.params.second_student or ""
        return super().network_arch(name)

    def optimizer_specs(self) -> dict[str, OptimizerSpec]:
        p = self.params
        lrs = {"teacher": p.teacher_lr, "student": p.student_lr}
        lrs["teacher2"] = p.second_lr or p.teacher_lr
        lrs["student2"] = p.second_lr or p.student_lr
        return {name: OptimizerSpec(list(net.parameters()), lr=lrs[name]) for name, net in self.networks().items()}

    def switches(self, logits: dict[str, Tensor], targets: Tensor) -> list[Switch]:
        """The decision of every (teacher, student) pair in ``self.pairs`` order, from the global batch."""
        tau = self.params.temperature
        sums = torch.stack([switch_sums(logits[s], logits[t], targets, tau) for t, s in self.pairs])
        return decide(all_reduce_switch_sums(sums))

    def training_step(self, images: Tensor, targets: Tensor) -> dict[str, Tensor]:
        nets = self.networks()
        logits = {name: net(images) for name, net in nets.items()}  # every forward (train mode) before any update
        switches = self.switches(logits, targets)
        mode = self.params.mode
        expert = [sw.expert if mode == "switch" else mode == "expert" for sw in switches]
        n_s = len(self.student_names)
        grid = [expert[i * n_s : (i + 1) * n_s] for i in range(len(self.teacher_names))]
        teacher_losses, student_losses = switokd_losses(
            [logits[t] for t in self.teacher_names],
            [logits[s] for s in self.student_names],
            targets,
            grid,
            self.params.temperature,
        )
        out: dict[str, Tensor] = {}
        stepped: list[Tensor] = []
        names = [*self.teacher_names, *self.student_names]
        for name, loss in zip(names, [*teacher_losses, *student_losses], strict=True):
            if loss is not None:  # a paused teacher: no backward, no step; its graph is dropped with `logits`
                self.backward_step(loss, self.optimizer(name))
                stepped.append(loss.detach())
            out[f"loss_{name}"] = loss.detach() if loss is not None else torch.zeros((), device=images.device)
            out[f"ce_{name}"] = F.cross_entropy(logits[name].detach().float(), targets)
        self._record(switches, expert, [loss is None for loss in teacher_losses])
        out["loss"] = torch.stack(stepped).sum()
        out["logits"] = logits[self.deployed_network].detach()
        return out

    def _record(self, switches: list[Switch], expert: list[bool], paused: list[bool]) -> None:
        rows = [[1.0, float(e), *(getattr(sw, k) for k in _STATS)] for sw, e in zip(switches, expert, strict=True)]
        self.stats.add("switch", rows)
        self.stats.add("paused", [float(p) for p in paused])

    def epoch_metrics(self) -> dict[str, float]:
        totals = self.stats.total("switch").cpu().tolist()
        multi = len(self.pairs) > 1
        metrics: dict[str, float] = {}
        for (t, s), (batches, experts, *sums) in zip(self.pairs, totals, strict=True):
            if batches == 0:
                continue
            suffix = f"_{t}_{s}" if multi else ""
            metrics[f"expert_frac{suffix}"] = experts / batches
            metrics.update({f"{k}{suffix}": v / batches for k, v in zip(_STATS, sums, strict=True)})
        batches = totals[0][0] if totals else 0.0
        if multi and batches > 0:
            for t, paused in zip(self.teacher_names, self.stats.total("paused").cpu().tolist(), strict=True):
                metrics[f"paused_frac_{t}"] = paused / batches
        return metrics
