"""Interactive knowledge distillation: train the student with teacher stages randomly swapped in.

Paper: Fu, Li, Xu, Cheng, Liu, Yang, "Interactive Knowledge Distillation" (for Image Classification), Neurocomputing
2021, arXiv 2007.01476. Only the abstract was readable and no official code exists, so the training step below is
the reconstruction of shared/methods/offline.md §2.2; every choice marked [our default] is ours, not the paper's.

Both networks are cut into stem | stage_1..stage_N | head by a stage executor (``_stages``: kdpipe's CIFAR nets and
any timm CNN whose ``forward_features`` chains its ``feature_info`` stages on NCHW maps — ResNet, MobileNetV3,
EfficientNet, ConvNeXt, RegNet, ...), and student and teacher stages are grouped into K swappable pairs of spans that
end at the same stride (``_stage_pairs``). Per mini-batch, with b_k ~ Bernoulli(p_t):

    h_0 = stem_s(x);  h_k = T̃_k(h_{k−1}) if b_k else S_k(h_{k−1});  z_h = head_s(tail_s(h_K))
    L = w_ce · CE(z_h, y) + w_kd · τ² · KL(softmax(z_t/τ) ‖ softmax(z_h/τ))     (+ w_hint · hint during warm-up)

and, with ``student_mix`` μ > 0 (our extension), L = (1 − μ)·L(z_h) + μ·L(z_s) on steps that swap a stage, z_s the
pure student's logits;

with z_t from a separate full teacher forward under inference mode. Teacher stages are frozen and in eval mode, but
autograd runs THROUGH them: the gradient that reaches upstream student stages via a swapped teacher stage is the
teacher's "feedback". S_k and T_k are the student and teacher spans of pair k; where shapes differ,
T̃_k = A_out ∘ T_k ∘ A_in with 1x1 conv + BN adapters and a resize (§2.6, our extension); the adapters are owned
here, trained with the student and never exported.

[our default] choices:

- Stages end at the ``feature_info`` stage modules; the stride-2 stem level of a five-level pyramid (ResNet's
  ``act1``, EfficientNet's ``blocks.0``) belongs to the stem (``_stages``).
- Blocks are spans of whole stages, paired by stride (``_stage_pairs``): at each stride both networks' stages reach,
  a pair ends after the last stage of either network at that stride; stages before the first common stride join
  the first pair (whose A_in resizes when the stems differ in stride), student stages after the last one (the tail
  S_tail) are never swapped, teacher stages there never run. Networks of one stride layout (two timm ImageNet CNNs,
  two CIFAR ResNets) pair stage for stage. A pair of networks where no swap would leave a student stage in the
  hybrid is refused (CIFAR resnet8 with timm resnet18: their one common stride is the student's last).
- One draw per pair per mini-batch, shared by all samples; if every pair would be swapped and the student has no
  tail, one pair chosen uniformly at random stays the student's (otherwise the student trunk gets no direct
  training signal).
- The student's stem and head are always used: they must be trained and the head is the deployed one.
- Loss weights w_ce = 1, w_kd = 1, τ = 4 (kd_weight = 0 is the "pure swapping" ablation).
- Swap probability per epoch e of E: linear p_t = p0·max(0, 1 − e/(γ·E)) with p0 = 0.5, γ = 0.75, so the last
  25 % of epochs train the pure student and its BN statistics settle on student activations (pitfall 3);
  "cosine" is p0·(1 + cos(π·min(1, e/(γ·E))))/2 and "constant" is p0 (no pure-student finish: an ablation).
- Adapter warm-up (only for pairs that need adapters): no swapping for the first 2 epochs, during which the adapters
  learn FitNet-style hints from the teacher's own features — MSE(A_in(h_{k−1}), t_in) maps student inputs into the
  teacher's space and MSE(A_out(t_out), h_k) maps the teacher's outputs back (t_in, t_out: the teacher's maps at the
  start and end of T_k) — with the student features detached, so the student itself trains exactly as plain KD
  meanwhile. The schedule then starts at p0 and reaches 0 at γ·E (e is shifted by the warm-up). Hint weight 1.
  Pairs that need no adapters have no warm-up.
- Resizes keep the dry-run ratio of the two maps (avg-pool down by ≥ 2, else bilinear); A_in is conv then resize,
  A_out likewise.
- Teacher activations of swapped stages are kept for backward; ``checkpoint_teacher`` recomputes them instead.

Taps: none (stage executors, not hooks). Teacher: frozen. Logged per epoch: ``swap_p``, ``swap_fraction`` (swapped
pairs / all pairs over the epoch's steps) and ``hybrid_top1``; ``eval_top1`` is the pure student.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import ClassVar, Literal

import timm
import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from kdpipe.distill.methods._stage_pairs import StagePair, pair_by_stride, unpairable_message, usable
from kdpipe.distill.methods._stages import StageExecutor, create_executor
from kdpipe.distill.methods.base import KDMethod, MethodContext, MethodParams
from kdpipe.distill.methods.kd import kd_loss
from kdpipe.distill.stats import EpochStats
from kdpipe.distill.taps import ConvAdapter, resize_to
from kdpipe.registry import METHODS

__all__ = [
    "IAKD",
    "IAKDParams",
    "StageExecutor",
    "StagePair",
    "create_executor",
    "iakd_loss",
    "pair_by_stride",
    "swap_probability",
]

log = logging.getLogger(__name__)

Schedule = Literal["linear", "constant", "cosine"]
Shape = tuple[int, int, int]

SUPPORTED = (
    "iakd needs CNNs whose forward_features runs the feature_info stages one after another on NCHW maps: kdpipe's "
    "CIFAR nets and timm's ResNet, MobileNetV3, EfficientNet, ConvNeXt, RegNet (and alike) families"
)
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
    student_mix: float = Field(0.0, ge=0.0, le=1.0)
    """μ: on steps that swap a stage, the loss is (1 − μ)·L(hybrid) + μ·L(pure student), the same w_ce/w_kd loss on
    the student's own forward, so the deployed network also trains as a whole while teacher stages are swapped in
    (our extension, not in the reconstruction; 0 keeps it). Steps without a swap are L(student) either way."""


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


def _meta_executor(name: str, role: str, pair: str) -> StageExecutor | None:
    """The executor of model ``name`` built on the meta device (no memory, no weights); None when the name is a
    hub/folder source that cannot be resolved offline or timm cannot build it there (the constructor checks it)."""
    arch = name
    if name.startswith(_SOURCE_PREFIXES):
        arch = name.split(":", 1)[1].rstrip("/").rsplit("/", 1)[-1]
        if not timm.is_model(arch):
            log.info("iakd: cannot check the stages of %s %r before building it", role, name)
            return None
    if not timm.is_model(arch):
        raise ValueError(f"{role} {name!r} is not a model timm knows")
    try:
        with torch.device("meta"):
            model = timm.create_model(arch)
    except Exception as exc:  # a model that cannot be built on meta is checked when it is really built
        log.info("iakd: cannot build %s %r on the meta device to check it (%s)", role, name, exc)
        return None
    try:
        return create_executor(model)
    except ValueError as exc:
        raise ValueError(f"{pair}: it cannot cut the {role} {name!r} into stages ({exc}). {SUPPORTED}") from exc


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

    provenance: ClassVar[str] = (
        "a reconstruction: only the paper's abstract was readable and no official code exists, so the swapping "
        "step follows shared/methods/offline.md §2; choices marked [our default] are kdpipe's, and no published "
        "CIFAR number exists to check it against"
    )

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
        ctx = self.require_context()
        self.student_exec = create_executor(student, ctx.input_shape)
        self.teacher_exec = create_executor(self.teacher, ctx.input_shape)
        s_red, t_red = self.student_exec.reductions, self.teacher_exec.reductions
        self.pairs: tuple[StagePair, ...] = tuple(pair_by_stride(s_red, t_red))
        if not usable(self.pairs, len(s_red)):
            names = ctx.student_name or type(student).__name__, ctx.teacher_name or type(self.teacher).__name__
            raise ValueError(unpairable_message(names[0], s_red, names[1], t_red))
        self.has_tail = self.pairs[-1].student[1] < len(s_red)
        s_shapes, t_shapes = self._dry_shapes(student), self._dry_shapes(self.teacher)
        self.adapters = nn.ModuleList(
            StageAdapter(
                s_shapes[pair.student[0]],
                t_shapes[pair.teacher[0]],
                t_shapes[pair.teacher[1]],
                s_shapes[pair.student[1]],
            )
            for pair in self.pairs
        )
        self.has_adapters = any(a.maps_in or a.maps_out for a in self.adapters)
        self.stats = EpochStats({"steps": (), "swapped": (), "correct": (), "seen": ()})

    @classmethod
    def check_pair(cls, params: MethodParams, student: str, teacher: str | None) -> None:
        if teacher is None:
            raise ValueError("iakd swaps teacher stages into the student and needs a teacher")
        pair = f"iakd cannot pair student {student!r} with teacher {teacher!r}"
        s, t = _meta_executor(student, "student", pair), _meta_executor(teacher, "teacher", pair)
        if s is not None and t is not None and not usable(pair_by_stride(s.reductions, t.reductions), len(s.stages)):
            raise ValueError(unpairable_message(student, s.reductions, teacher, t.reductions))

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
        """b_k ~ Bernoulli(p) per stage pair (p defaults to p_t); all True only when the student keeps a tail of its
        own stages, else one random pair stays the student's."""
        p = self.swap_p if p is None else p
        n = len(self.pairs)
        if p <= 0.0:
            return [False] * n
        swaps = (torch.rand(n) < p).tolist()
        if all(swaps) and not self.has_tail:
            swaps[int(torch.randint(n, (1,)))] = False
        return swaps

    # -- forward passes --------------------------------------------------------------------------------------------

    def teacher_span(self, k: int, h: Tensor) -> Tensor:
        """A_out ∘ T_k ∘ A_in on the student map ``h`` (T_k: the teacher stages of pair k), with autograd through
        the frozen teacher stages."""
        adapter = self.adapters[k]
        assert isinstance(adapter, StageAdapter)
        x = adapter.to_teacher(h)
        span = self.teacher_exec.span(*self.pairs[k].teacher)
        if self.params.checkpoint_teacher and torch.is_grad_enabled():
            y = checkpoint(span, x, use_reentrant=False)
            assert isinstance(y, Tensor)
        else:
            y = span(x)
        return adapter.to_student(y)

    def hybrid_forward(self, images: Tensor, swaps: Sequence[bool]) -> tuple[Tensor, list[Tensor]]:
        """Hybrid logits and [h_0, ..., h_K], the maps at the pairs' boundaries; pair k runs the teacher's stages
        where ``swaps[k]``, the student's otherwise; the student's tail stages always follow h_K."""
        if len(swaps) != len(self.pairs):
            raise ValueError(f"{len(swaps)} swap flags for {len(self.pairs)} stage pairs")
        student = self.student_exec
        feats = [student.stem(images)]
        for k, swap in enumerate(swaps):
            h = feats[-1]
            feats.append(self.teacher_span(k, h) if swap else student.span(*self.pairs[k].student)(h))
        tail = student.span(self.pairs[-1].student[1], len(student.stages))
        return student.head(tail(feats[-1])), feats

    def teacher_pass(self, images: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Teacher logits and stage maps under inference mode, cloned so autograd may save them as targets."""
        with torch.inference_mode():
            feats = self.teacher_exec.features(images)
            logits = self.teacher_exec.head(feats[-1])
        return logits.clone(), [f.clone() for f in feats]

    def hint_loss(self, student_feats: list[Tensor], teacher_feats: list[Tensor]) -> Tensor:
        """Mean FitNet MSE of the adapters (student maps detached): A_in(h_{k−1}) ≈ t_in and A_out(t_out) ≈ h_k, with
        ``student_feats`` the pair boundaries of :meth:`hybrid_forward` and ``teacher_feats`` every teacher stage
        boundary (:meth:`teacher_pass`)."""
        terms = []
        for k, (adapter, pair) in enumerate(zip(self.adapters, self.pairs, strict=True)):
            assert isinstance(adapter, StageAdapter)
            if adapter.maps_in:
                target = teacher_feats[pair.teacher[0]]
                mapped = resize_to(adapter.into(student_feats[k].detach()), _hw(target))
                terms.append(F.mse_loss(mapped, target))
            if adapter.maps_out:
                target = student_feats[k + 1].detach()
                back = adapter.back(teacher_feats[pair.teacher[1]])
                terms.append(F.mse_loss(resize_to(back, _hw(target)), target))
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
        mix = self.params.student_mix
        if mix > 0 and any(swaps):
            alone = iakd_loss(self.student(images), teacher_logits, targets, self.params)
            out["hybrid_loss"] = out["loss"].detach()
            out["student_loss"] = alone["loss"].detach()
            out["loss"] = (1.0 - mix) * out["loss"] + mix * alone["loss"]
        if hint is not None:
            out["loss"] = out["loss"] + self.params.hint_weight * hint
            out["hint"] = hint.detach()
        out["logits"] = logits.detach()
        self.stats.add("steps", 1.0)
        self.stats.add("swapped", float(sum(swaps)))
        self.stats.add("correct", (out["logits"].argmax(1) == targets).sum())
        self.stats.add("seen", float(targets.numel()))
        return out

    # -- logging ---------------------------------------------------------------------------------------------------

    def on_epoch_start(self, epoch: int, epochs: int) -> None:
        super().on_epoch_start(epoch, epochs)
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
        n = len(self.pairs)
        return {
            "swap_p": self.swap_p,
            "swap_fraction": float(self.stats.total("swapped")) / max(1.0, float(self.stats.total("steps")) * n),
            "hybrid_top1": float(self.stats.total("correct")) / max(1.0, float(self.stats.total("seen"))),
        }
