"""Interactive knowledge distillation: train the student with teacher stages randomly swapped in.

Paper: Fu, Li, Xu, Cheng, Liu, Yang, "Interactive Knowledge Distillation" (for Image Classification), Neurocomputing
2021, arXiv 2007.01476. Only the abstract was readable and no official code exists, so the training step below is
the reconstruction of shared/methods/offline.md §2.2; every choice marked [our default] is ours, not the paper's.

Both networks are cut into stem | stage_1..stage_N | head by a per-family executor (kdpipe's CIFAR nets and timm's
ResNet family; anything else is refused by :meth:`IAKD.check_pair`). Per mini-batch, with b_i ~ Bernoulli(p_t):

    h_0 = stem_s(x);  h_i = T̃_i(h_{i−1}) if b_i else S_i(h_{i−1});  z_h = head_s(h_N)
    L = w_ce · CE(z_h, y) + w_kd · τ² · KL(softmax(z_t/τ) ‖ softmax(z_h/τ))     (+ w_hint · hint during warm-up)

with z_t from a separate full teacher forward under inference mode. Teacher stages are frozen and in eval mode, but
autograd runs THROUGH them: the gradient that reaches upstream student stages via a swapped teacher stage is the
teacher's "feedback". Where stage shapes differ, T̃_i = A_out ∘ T_i ∘ A_in with 1x1 conv + BN adapters and a resize
(§2.6, our extension); the adapters are owned here, trained with the student and never exported.

[our default] choices:

- Blocks are whole stages; student stage i pairs with teacher stage i, so both must have the same stage count.
- One draw per stage per mini-batch, shared by all samples; if every stage would be swapped, one stage chosen
  uniformly at random stays the student's (otherwise the student trunk gets no direct training signal).
- The student's stem and head are always used: they must be trained and the head is the deployed one.
- Loss weights w_ce = 1, w_kd = 1, τ = 4 (kd_weight = 0 is the "pure swapping" ablation).
- Swap probability per epoch e of E: linear p_t = p0·max(0, 1 − e/(γ·E)) with p0 = 0.5, γ = 0.75, so the last
  25 % of epochs train the pure student and its BN statistics settle on student activations (pitfall 3);
  "cosine" is p0·(1 + cos(π·min(1, e/(γ·E))))/2 and "constant" is p0 (no pure-student finish: an ablation).
- Adapter warm-up (only for pairs that need adapters): no swapping for the first 2 epochs, during which the adapters
  learn FitNet-style hints from the teacher's own features — MSE(A_in(h_{i−1}), t_{i−1}) maps student inputs into
  the teacher's space and MSE(A_out(t_i), h_i) maps the teacher's outputs back — with the student features detached,
  so the student itself trains exactly as plain KD meanwhile. The schedule then starts at p0 and reaches 0 at γ·E
  (e is shifted by the warm-up). Hint weight 1. Pairs that need no adapters have no warm-up.
- Resizes keep the dry-run ratio of the two maps (avg-pool down by ≥ 2, else bilinear); A_in is conv then resize,
  A_out likewise.
- Teacher activations of swapped stages are kept for backward; ``checkpoint_teacher`` recomputes them instead.

Taps: none (stage executors, not hooks). Teacher: frozen. Logged per epoch: ``swap_p``, ``swap_fraction`` (swapped
stages / all stages over the epoch's steps) and ``hybrid_top1``; ``eval_top1`` is the pure student.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import timm
import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat
from timm.models.resnet import ResNet
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from kdpipe.distill.methods.base import KDMethod, MethodContext, MethodParams
from kdpipe.distill.methods.kd import kd_loss
from kdpipe.distill.taps import ConvAdapter, resize_to
from kdpipe.models._base import CifarNet
from kdpipe.registry import METHODS

__all__ = ["IAKD", "IAKDParams", "StageExecutor", "create_executor", "iakd_loss", "swap_probability"]

log = logging.getLogger(__name__)

Schedule = Literal["linear", "constant", "cosine"]
Shape = tuple[int, int, int]
Fn = Callable[[Tensor], Tensor]

SUPPORTED_FAMILIES = (
    "kdpipe CIFAR nets (CifarNet: resnet8..resnet110, resnet8x4, resnet32x4, resnet50_cifar, wrn_*, vgg*_cifar, "
    "mobilenetv2_x0_5_cifar, shufflenet_v1/v2) and timm's ResNet family (timm.models.resnet.ResNet: "
    "resnet18/34/50/..., resnet*d, seresnet*, resnext*, wide_resnet*)"
)
# Entrypoint modules whose models can be ResNet/CifarNet; anything else is refused before building a model.
_FAMILY_MODULES = ("timm.models.resnet", "kdpipe.models.")
_SOURCE_PREFIXES = ("hf-hub:", "local-dir:")


class IAKDParams(MethodParams):
    name: Literal["iakd"] = "iakd"
    temperature: PositiveFloat = 4.0
    """Softmax temperature τ of the KL term."""
    ce_weight: float = Field(1.0, ge=0.0)
    """Weight of CE(hybrid logits, labels)."""
    kd_weight: float = Field(1.0, ge=0.0)
    """Weight of τ²·KL(teacher ‖ hybrid); 0 gives the pure-swapping ablation."""
    p0: float = Field(0.5, ge=0.0, le=1.0)
    """Swap probability per stage at the first swapping epoch."""
    schedule: Schedule = "linear"
    """How p_t decays: linear or cosine to 0 at γ·E, or constant p0 (an ablation without a pure-student finish)."""
    gamma: float = Field(0.75, gt=0.0, le=1.0)
    """Fraction of the epochs after which p_t reaches 0 (linear, cosine)."""
    adapter_warmup_epochs: int = Field(2, ge=0)
    """Epochs without swapping while adapters learn hints; only for pairs whose stage shapes differ."""
    hint_weight: float = Field(1.0, ge=0.0)
    """Weight of the adapters' FitNet-style MSE hints during the warm-up."""
    checkpoint_teacher: bool = False
    """Recompute swapped teacher stages in backward instead of storing their activations (saves memory)."""


def swap_probability(epoch: int, epochs: int, params: IAKDParams, warmup: int = 0) -> float:
    """p_t of 0-based ``epoch`` of ``epochs``: 0 during ``warmup`` epochs, then the params' schedule, its epoch count
    shifted by the warm-up so swapping starts at p0 and ends at γ·E."""
    if epoch < warmup:
        return 0.0
    if params.schedule == "constant":
        return params.p0
    span = params.gamma * epochs - warmup
    if span <= 0:
        return 0.0
    progress = min(1.0, (epoch - warmup) / span)
    if params.schedule == "cosine":
        return params.p0 * 0.5 * (1.0 + math.cos(math.pi * progress))
    return params.p0 * (1.0 - progress)


def iakd_loss(hybrid_logits: Tensor, teacher_logits: Tensor, targets: Tensor, params: IAKDParams) -> dict[str, Tensor]:
    """``w_ce·CE(z_h, y) + w_kd·τ²·KL(p_t ‖ p_h)`` (fp32); returns ``loss`` and the detached parts ``ce``, ``kd``."""
    ce = F.cross_entropy(hybrid_logits.float(), targets)
    kd = kd_loss(hybrid_logits, teacher_logits, params.temperature)
    return {"loss": params.ce_weight * ce + params.kd_weight * kd, "ce": ce.detach(), "kd": kd.detach()}


# --- stage executors ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageExecutor:
    """A network run piecewise: ``head(stages[N-1](...stages[0](stem(x))))`` equals ``model(x)``.

    A plain object, not a module: wrapping the teacher in one registers none of its parameters anywhere.
    """

    family: str
    stem: Fn
    stages: tuple[Fn, ...]
    head: Fn

    def __call__(self, x: Tensor) -> Tensor:
        return self.head(self.features(x)[-1])

    def features(self, x: Tensor) -> list[Tensor]:
        """[stem output, stage_1 output, ..., stage_N output]: the inputs and outputs of every stage."""
        feats = [self.stem(x)]
        for stage in self.stages:
            feats.append(stage(feats[-1]))
        return feats


def _chain(modules: Sequence[nn.Module]) -> Fn:
    def run(x: Tensor) -> Tensor:
        for module in modules:
            x = module(x)
        return x

    return run


def create_executor(model: nn.Module) -> StageExecutor:
    """The stem | stages | head executor of a supported model; ``ValueError`` naming the supported families else."""
    if isinstance(model, CifarNet):
        neck = _chain(model._neck())
        head: Fn = lambda h: model.forward_head(neck(h))  # noqa: E731
        return StageExecutor("cifar", _chain(model._stem()), tuple(_chain(s) for s in model._tap_stages()), head)
    if isinstance(model, ResNet):
        stem = _chain([model.conv1, model.bn1, model.act1, model.maxpool])
        stages = tuple(_chain([getattr(model, f"layer{i}")]) for i in range(1, 5))
        return StageExecutor("timm-resnet", stem, stages, model.forward_head)
    raise ValueError(f"iakd has no stage executor for {type(model).__name__}; it supports {SUPPORTED_FAMILIES}")


def _family_of(name: str, role: str) -> tuple[str, int] | None:
    """(family, stage count) of model ``name`` from a meta-device build (no memory, no weights); None when the name
    is a hub/folder source that cannot be resolved offline (the constructor checks it then)."""
    arch = name
    if name.startswith(_SOURCE_PREFIXES):
        arch = name.split(":", 1)[1].rstrip("/").rsplit("/", 1)[-1]
        if not timm.is_model(arch):
            log.info("iakd: cannot check the family of %s %r before building it", role, name)
            return None
    if not timm.is_model(arch):
        raise ValueError(f"{role} {name!r} is not a model timm knows")
    module = timm.models.model_entrypoint(arch).__module__
    if not module.startswith(_FAMILY_MODULES):
        raise ValueError(
            f"iakd swaps whole stages and needs a stage executor for the {role} {name!r} ({module}); "
            f"supported families: {SUPPORTED_FAMILIES}. Pick a {role} from these families or another KD method"
        )
    try:
        with torch.device("meta"):
            model = timm.create_model(arch)
        executor = create_executor(model)
    except ValueError as exc:
        raise ValueError(f"{role} {name!r}: {exc}") from exc
    return executor.family, len(executor.stages)


# --- adapters -----------------------------------------------------------------------------------------------------


def _scale(src: Shape, dst: Shape) -> tuple[float, float] | None:
    return None if src[1:] == dst[1:] else (dst[1] / src[1], dst[2] / src[2])


def _hw(x: Tensor) -> tuple[int, int]:
    return int(x.shape[-2]), int(x.shape[-1])


def _rescale(x: Tensor, scale: tuple[float, float] | None) -> Tensor:
    if scale is None:
        return x
    size = (max(1, round(x.shape[-2] * scale[0])), max(1, round(x.shape[-1] * scale[1])))
    return resize_to(x, size)


class StageAdapter(nn.Module):
    """A_in (student map -> teacher stage input) and A_out (teacher stage output -> student map) of one stage:
    1x1 conv + BN where channels differ, a resize where the resolution differs, identity otherwise."""

    def __init__(self, s_in: Shape, t_in: Shape, t_out: Shape, s_out: Shape) -> None:
        super().__init__()
        self.into: nn.Module = ConvAdapter(s_in[0], t_in[0]) if s_in[0] != t_in[0] else nn.Identity()
        self.back: nn.Module = ConvAdapter(t_out[0], s_out[0]) if t_out[0] != s_out[0] else nn.Identity()
        self.in_scale, self.out_scale = _scale(s_in, t_in), _scale(t_out, s_out)

    @property
    def maps_in(self) -> bool:
        return not isinstance(self.into, nn.Identity) or self.in_scale is not None

    @property
    def maps_out(self) -> bool:
        return not isinstance(self.back, nn.Identity) or self.out_scale is not None

    def to_teacher(self, h: Tensor) -> Tensor:
        return _rescale(self.into(h), self.in_scale)

    def to_student(self, y: Tensor) -> Tensor:
        return _rescale(self.back(y), self.out_scale)


# --- the method ---------------------------------------------------------------------------------------------------


@METHODS.register("iakd", summary="interactive KD: teacher stages randomly swapped into the student (arXiv 2007.01476)")
class IAKD(KDMethod):
    """Interactive KD by stage swapping (see module docstring)."""

    Params = IAKDParams
    params: IAKDParams

    def __init__(
        self,
        params: MethodParams,
        student: nn.Module,
        teacher: nn.Module | None = None,
        context: MethodContext | None = None,
    ) -> None:
        super().__init__(params, student, teacher, context)
        assert self.teacher is not None  # teacher_role "frozen": the base class refused a missing teacher
        self.student_exec = create_executor(student)
        self.teacher_exec = create_executor(self.teacher)
        n_s, n_t = len(self.student_exec.stages), len(self.teacher_exec.stages)
        if n_s != n_t:
            raise ValueError(_stage_count_message(type(student).__name__, n_s, type(self.teacher).__name__, n_t))
        s_shapes, t_shapes = self._dry_shapes(student), self._dry_shapes(self.teacher)
        self.adapters = nn.ModuleList(
            StageAdapter(s_shapes[i], t_shapes[i], t_shapes[i + 1], s_shapes[i + 1]) for i in range(n_s)
        )
        self.has_adapters = any(a.maps_in or a.maps_out for a in self.adapters)
        self._reset_stats()

    @classmethod
    def check_pair(cls, params: MethodParams, student: str, teacher: str | None) -> None:
        if teacher is None:
            raise ValueError("iakd swaps teacher stages into the student and needs a teacher")
        s, t = _family_of(student, "student"), _family_of(teacher, "teacher")
        if s is not None and t is not None and s[1] != t[1]:
            raise ValueError(_stage_count_message(student, s[1], teacher, t[1]))

    def _dry_shapes(self, model: nn.Module) -> list[Shape]:
        """(C, H, W) of the stem output and every stage output for one input of the context's shape."""
        executor = self.student_exec if model is self.student else self.teacher_exec
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                feats = executor.features(torch.zeros(1, *self.require_context().input_shape, device=device))
        finally:
            model.train(was_training)
        return [(int(f.shape[1]), int(f.shape[2]), int(f.shape[3])) for f in feats]

    # -- schedule and swaps ----------------------------------------------------------------------------------------

    @property
    def warmup_epochs(self) -> int:
        return self.params.adapter_warmup_epochs if self.has_adapters else 0

    @property
    def swap_p(self) -> float:
        """p_t of the current epoch."""
        return swap_probability(self.epoch, self.epochs, self.params, self.warmup_epochs)

    def draw_swaps(self, p: float | None = None) -> list[bool]:
        """b_i ~ Bernoulli(p) per stage (p defaults to p_t), never all True: then one random stage stays the
        student's."""
        p = self.swap_p if p is None else p
        n = len(self.student_exec.stages)
        if p <= 0.0:
            return [False] * n
        swaps = (torch.rand(n) < p).tolist()
        if all(swaps):
            swaps[int(torch.randint(n, (1,)))] = False
        return swaps

    # -- forward passes --------------------------------------------------------------------------------------------

    def teacher_stage(self, i: int, h: Tensor) -> Tensor:
        """A_out ∘ T_i ∘ A_in on the student map ``h``, with autograd through the frozen teacher stage."""
        adapter = self.adapters[i]
        assert isinstance(adapter, StageAdapter)
        x = adapter.to_teacher(h)
        stage = self.teacher_exec.stages[i]
        if self.params.checkpoint_teacher and torch.is_grad_enabled():
            y = checkpoint(stage, x, use_reentrant=False)
            assert isinstance(y, Tensor)
        else:
            y = stage(x)
        return adapter.to_student(y)

    def hybrid_forward(self, images: Tensor, swaps: Sequence[bool]) -> tuple[Tensor, list[Tensor]]:
        """Hybrid logits and [h_0, ..., h_N]; stage i is the teacher's where ``swaps[i]``."""
        if len(swaps) != len(self.student_exec.stages):
            raise ValueError(f"{len(swaps)} swap flags for {len(self.student_exec.stages)} stages")
        feats = [self.student_exec.stem(images)]
        for i, swap in enumerate(swaps):
            feats.append(self.teacher_stage(i, feats[-1]) if swap else self.student_exec.stages[i](feats[-1]))
        return self.student_exec.head(feats[-1]), feats

    def teacher_pass(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Teacher logits and stage maps under inference mode, cloned so autograd may save them as targets."""
        with torch.inference_mode():
            feats = self.teacher_exec.features(images)
            logits = self.teacher_exec.head(feats[-1])
        return logits.clone(), [f.clone() for f in feats]

    def hint_loss(self, student_feats: list[Tensor], teacher_feats: list[Tensor]) -> Tensor:
        """Mean FitNet MSE of the adapters (student maps detached): A_in(h_{i−1}) ≈ t_{i−1}, A_out(t_i) ≈ h_i."""
        terms = []
        for i, adapter in enumerate(self.adapters):
            assert isinstance(adapter, StageAdapter)
            if adapter.maps_in:
                target = teacher_feats[i]
                mapped = resize_to(adapter.into(student_feats[i].detach()), _hw(target))
                terms.append(F.mse_loss(mapped, target))
            if adapter.maps_out:
                target = student_feats[i + 1].detach()
                terms.append(F.mse_loss(resize_to(adapter.back(teacher_feats[i + 1]), _hw(target)), target))
        return torch.stack([t.float() for t in terms]).mean()

    def training_step(self, images: Tensor, targets: Tensor) -> dict[str, Tensor]:
        swaps = self.draw_swaps()
        logits, feats = self.hybrid_forward(images, swaps)
        hint: Tensor | None = None
        if self.epoch < self.warmup_epochs and self.params.hint_weight > 0:
            teacher_logits, teacher_feats = self.teacher_pass(images)
            hint = self.hint_loss(feats, teacher_feats)
        else:
            teacher_logits = self.teacher_logits(images)
        out = iakd_loss(logits, teacher_logits, targets, self.params)
        if hint is not None:
            out["loss"] = out["loss"] + self.params.hint_weight * hint
            out["hint"] = hint.detach()
        out["logits"] = logits.detach()
        self._steps += 1
        self._swapped += sum(swaps)
        self._correct += int((out["logits"].argmax(1) == targets).sum())
        self._seen += targets.numel()
        return out

    # -- logging ---------------------------------------------------------------------------------------------------

    def _reset_stats(self) -> None:
        self._steps = self._swapped = self._correct = self._seen = 0

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        super().on_epoch_start(epoch, epochs)
        self._reset_stats()
        never = all(swap_probability(e, epochs, self.params, self.warmup_epochs) == 0 for e in range(epochs))
        if epoch == 0 and self.params.p0 > 0 and never:
            log.warning(
                "iakd: no epoch of %d swaps a stage (warm-up %d epochs, gamma %.2f); raise epochs or "
                "lower adapter_warmup_epochs",
                epochs,
                self.warmup_epochs,
                self.params.gamma,
            )

    def epoch_metrics(self) -> dict[str, float]:
        n = len(self.student_exec.stages)
        return {
            "swap_p": self.swap_p,
            "swap_fraction": self._swapped / max(1, self._steps * n),
            "hybrid_top1": self._correct / max(1, self._seen),
        }


def _stage_count_message(student: str, n_s: int, teacher: str, n_t: int) -> str:
    return (
        f"iakd swaps student stage i with teacher stage i, so both need the same number of stages: student "
        f"{student!r} has {n_s}, teacher {teacher!r} has {n_t}. Pair CIFAR ResNets/WRNs (3 stages) with each other "
        "and timm ResNets or mobilenetv2_x0_5_cifar (4 stages) with each other"
    )
