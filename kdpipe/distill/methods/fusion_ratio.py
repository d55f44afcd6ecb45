"""TGeo-KD: a sample-wise fusion ratio between the teacher and the labels, learned from trilateral geometry.

Paper: Hu, Wu, Li, Ma, Chen, Yan, Wang, Liu, "Less or More From Teacher: Exploiting Trilateral Geometry For Knowledge
Distillation", ICLR 2024, arXiv 2312.15112 (spec: shared/methods/offline.md §3).

Loss, per sample i with ``KD_i = τ²·KL(softmax(z_t/τ) ‖ softmax(z_s/τ))`` and ``CE_i = CE(z_s, y)`` (τ = 1):
``L = mean_i[α_i·KD_i + (1 − α_i)·CE_i]`` with ``α_i = σ(f_ω(Δ_i))``. Δ_i (9C) holds the signed edges and the vertices
of the triangle student S / teacher T / label G plus the teacher's class-mean prediction T̄_y, all probabilities at
temperature 1 and S detached: ``[G−S, G−T, T−S, G−T̄_y, T̄_y−S, S, T, T̄_y, G]``. f_ω is Linear(9C→hidden)–ReLU–
Linear(hidden→1); the sigmoid gives α. ω is trained by a bilevel objective: the plain CE on held-out validation data of
the student after one virtual SGD step ``θ' = θ − η_t·∇_θ L(θ, ω)`` (one-step unrolled hypergradient via
``torch.func.functional_call``, exact second order or DARTS' finite difference, see below); then the real student
step uses α from the updated ω, detached.

Choices that are ours (the paper is silent; spec §3 [our default]):

- T̄ is the teacher's mean softmax per class over the *training* split with eval transforms, computed once at
  construction and kept as a C×C buffer (checkpointed). A class without training samples gets a uniform row.
- The virtual step is plain SGD with η_t = the student's current lr (no momentum or weight decay), whatever the real
  optimizer; the outer loss uses the k-th batch of the validation stream, k = a checkpointed meta-step counter.
- The virtual and validation passes run in fp32 with autocast off, in the student's current mode (train: batch
  statistics) on *cloned* buffers, so only the real step's forward moves BatchNorm running statistics.
- ``meta_scope="head"`` puts only ``get_classifier()``'s parameters in θ' and treats the rest as constants (the spec's
  cheaper approximation); ``meta_every=k`` runs the meta step on every k-th training step only.
- The controller is Adam (lr 1e-3, no weight decay); the official toy code's lr 0.1 saturates α (spec §3.7 pitfall 4).
- The real step reuses the training batch of the meta step; ``kd``, ``ce`` and ``alpha`` are logged per step, and the
  distribution of α (mean, std, p10/p50/p90, mean on teacher-right / teacher-wrong samples, and on the top / bottom
  20 % of student–teacher distance ‖T − S‖ among teacher-right samples, as in the paper's Table 4) per epoch.

Hypergradient (``hypergradient``; code in ``_hypergradient.py``). "exact" differentiates through θ' and needs a
double backward through every student op between the loss and θ''s parameters; timm's Hardswish / Hardsigmoid
(MobileNetV3, EfficientNet-lite, LCNet) have none ("derivative for aten::hardsigmoid_backward is not implemented").
"finite_difference" is DARTS' (Liu et al., ICLR 2019, eq. 7/8) central difference ``∇_ω L_val(θ') ≈ −η·[∇_ω L(θ+εv)
− ∇_ω L(θ−εv)]/(2ε)``, v = ∇_θ' L_val(θ'), ε = 0.01/‖v‖, with α's input S held at θ (it is detached in ∇_θ L, so
the mixed derivative treats α as constant in θ; letting S move drops the cosine to 0.5–0.7). "auto" (default) probes
a double backward at construction, over θ''s scope only, and logs its choice: exact on resnet8 (and on MobileNetV3
with meta_scope "head", whose θ' is a Linear), finite_difference on MobileNetV3 with "full".

Agreement of finite_difference with exact, dL_val/dω over all of ω: resnet8 student at 32x32 on a real digits batch
(64 train, 64 val; resnet14 teacher), η = 0.05, train mode, 7 cases (4 student seeds at init with 16→32 px upsampled
digits and a 16 px teacher; init, 30 and 100 SGD steps with digits resized to 32 px and a 32 px teacher).
"full": cosine 0.954–0.9998, relative L2 error 0.03–0.30 (median 0.05; 0.30 is seed 0, the test's case). Float64
gives the same error within 0.005, so it is not rounding but ReLU kinks inside the ±0.01 interval (with SiLU in place
of ReLU the error falls as ε², 1.3e-3 at DARTS' ε). Float64 converges to exact as the step shrinks (seed 0: rel
1.5e-3 at ε·‖v‖ = 1e-6, 2e-7 at 1e-8). In float32 a smaller step helps until rounding takes over (seeds 0–3, rel at
ε·‖v‖ = 1e-3: 0.01–0.13, 1e-4: 0.004–0.03, 1e-6: 0.08–0.42); ``FD_STEP`` keeps DARTS' 0.01. "head": rel
1.4e-5–3.2e-5 in float32 (a linear map of fixed features, no kinks), cosine 1 to 8 digits.

Cost per step (meta_every 1), CPU, one thread, batch 64 at 32x32, resnet8 student, resnet14 teacher, a step =
training_step + backward + SGD, median of 10–15 steps, two runs: "full" exact 4.1–4.3× a KD step, finite_difference
2.7–2.8× (0.67× exact: two first-order backward passes and two graph-free forwards instead of a double backward);
"head" exact 1.4–1.5×, finite_difference 2.0× (it still runs four full forwards; "auto" picks exact wherever the
probe passes).
MobileNetV3-small-050 student (finite_difference, resnet8 teacher): 2.6–2.9× a KD step. meta_every=k divides the
extra cost by k.

Taps: none (logits only). Teacher: frozen. Needs a validation split (data.val_fraction > 0).
"""

from __future__ import annotations

import logging
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat, PositiveInt
from torch import Tensor, nn

from kdpipe.distill.methods._hypergradient import (
    double_backward_error,
    exact_hypergradient,
    finite_difference_hypergradient,
)
from kdpipe.distill.methods._hypergradient import widen as _wide
from kdpipe.distill.methods.base import Batch, KDMethod, MethodContext, MethodParams
from kdpipe.distill.stats import EpochStats
from kdpipe.distill.step import OptimizerSpec
from kdpipe.registry import METHODS

log = logging.getLogger(__name__)

MetaScope = Literal["full", "head"]
Hypergradient = Literal["auto", "exact", "finite_difference"]


class FusionRatioParams(MethodParams):
    name: Literal["fusion_ratio"] = "fusion_ratio"
    temperature: PositiveFloat = 4.0
    """Softmax temperature τ of the KL term (paper: 4 on CIFAR-100, 1.5 on ImageNet). Δ always uses τ = 1."""
    hidden: PositiveInt = 128
    """Hidden width of the ratio network f_ω (paper Table 7: 128 on CIFAR-100 and ImageNet)."""
    controller_lr: PositiveFloat = 1e-3
    """Adam lr of f_ω (spec default; 0.1 from the official tabular code saturates α on image data)."""
    controller_weight_decay: float = Field(0.0, ge=0.0)
    """Adam (L2) weight decay of f_ω."""
    meta_every: PositiveInt = 1
    """Run the meta step on every k-th training step (1: every step, the faithful setting; 5–10 to save time)."""
    meta_scope: MetaScope = "full"
    """Parameters of the virtual step θ': "full" = all student parameters; "head" = only get_classifier()'s."""
    hypergradient: Hypergradient = "auto"
    """How dL_val(θ')/dω is computed. "exact": differentiate through θ' (second order; needs a double backward
    through every student op in θ''s scope, which Hardswish/Hardsigmoid of MobileNetV3, EfficientNet-lite and LCNet
    lack; "full" ≈ 4.2× a KD step on resnet8). "finite_difference": DARTS' central difference of ∇_ω L at θ ± εv
    (first order only, any student; "full" ≈ 2.8× a KD step; on resnet8 cosine ≥ 0.95 to exact, relative error
    0.03–0.30 from ReLU kinks, see the module docstring). "auto": a one-time probe at construction tries a double
    backward through the student on 4 training samples and picks "exact" if it works, else "finite_difference";
    "exact" where the probe fails is refused with a ValueError."""


def relation_features(student_probs: Tensor, teacher_probs: Tensor, targets: Tensor, class_mean: Tensor) -> Tensor:
    """Δ (B, 9C) = [G−S, G−T, T−S, G−T̄, T̄−S, S, T, T̄, G] from probabilities at τ = 1 (S should be detached)."""
    s, t = student_probs, teacher_probs
    g = F.one_hot(targets, s.shape[1]).to(s.dtype)
    t_bar = class_mean[targets].to(s.dtype)
    return torch.cat([g - s, g - t, t - s, g - t_bar, t_bar - s, s, t, t_bar, g], dim=1)


def per_sample_losses(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """(KD_i, CE_i), each (B,): τ²·KL(softmax(z_t/τ) ‖ softmax(z_s/τ)) summed over classes, and CE at τ = 1."""
    z_s, z_t = _wide(student_logits), _wide(teacher_logits)
    log_p_s = F.log_softmax(z_s / temperature, dim=1)
    log_p_t = F.log_softmax(z_t / temperature, dim=1)
    kd = (log_p_t.exp() * (log_p_t - log_p_s)).sum(1) * temperature**2
    ce = F.cross_entropy(z_s, targets, reduction="none")
    return kd, ce


def fused_loss(kd: Tensor, ce: Tensor, alpha: Tensor) -> Tensor:
    """``mean_i[α_i·KD_i + (1 − α_i)·CE_i]``."""
    return (alpha * kd + (1.0 - alpha) * ce).mean()


@METHODS.register(
    "fusion_ratio",
    summary="TGeo-KD: per-sample α·KD + (1−α)·CE, α from a bilevel-trained ratio "
    "network on trilateral geometry (arXiv 2312.15112)",
)
class FusionRatioKD(KDMethod):
    """TGeo-KD (see module docstring)."""

    Params = FusionRatioParams
    params: FusionRatioParams
    needs_val_split: ClassVar[bool] = True

    class_mean: Tensor
    """T̄ (C×C): row c = the teacher's mean softmax over the training samples of class c."""
    meta_steps: Tensor
    """Meta steps done so far (the index of the next validation batch), a long scalar."""
    train_steps: Tensor
    """Training steps done so far (decides which steps run a meta step when meta_every > 1), a long scalar."""

    def __init__(
        self,
        params: MethodParams,
        student: nn.Module,
        teacher: nn.Module | None = None,
        context: MethodContext | None = None,
    ) -> None:
        super().__init__(params, student, teacher, context)
        p = self.params
        ctx = self.require_context()
        if ctx.val_batch is None or ctx.train_eval_batches is None:
            raise ValueError(
                "method 'fusion_ratio' needs the validation stream and the train split with eval "
                "transforms in its MethodContext; set data.val_fraction > 0"
            )
        if p.meta_scope == "head" and not callable(getattr(student, "get_classifier", None)):
            raise ValueError(
                f"meta_scope 'head' needs a timm-style student with get_classifier(); "
                f"{type(student).__name__} has none: use meta_scope 'full'"
            )
        num_classes = ctx.num_classes
        self.controller = nn.Sequential(nn.Linear(9 * num_classes, p.hidden), nn.ReLU(), nn.Linear(p.hidden, 1))
        device = next(student.parameters()).device
        self.controller.to(device)
        self.register_buffer("class_mean", self._teacher_class_mean(ctx).to(device))
        self.register_buffer("meta_steps", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("train_steps", torch.zeros((), dtype=torch.long, device=device))
        self.stats = EpochStats({})  # α's distribution over the epoch is collected, not summed
        self._warned_lr = False
        self.hypergradient_mode = self._choose_hypergradient(ctx)
        """"exact" or "finite_difference": what ``params.hypergradient`` resolved to for this student."""

    # -- construction --------------------------------------------------------------------------------------------

    def _teacher_class_mean(self, ctx: MethodContext) -> Tensor:
        """T̄ over the training split with eval transforms, in float64 then stored as fp32 (C×C, rows sum to 1).

        Keeps the first batch's first samples in ``self._probe_batch`` for the hypergradient probe."""
        teacher = self.teacher
        assert teacher is not None and ctx.train_eval_batches is not None
        num_classes = ctx.num_classes
        device = next(iter(teacher.parameters()), torch.empty(0)).device
        sums = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
        counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self._probe_batch: Batch | None = None
        with torch.no_grad():
            for images, labels in ctx.train_eval_batches():
                if self._probe_batch is None:
                    self._probe_batch = (images[:4].clone(), labels[:4].clone())  # not a view of the batch
                logits = teacher(images.to(device))
                if logits.shape[1] != num_classes:
                    raise ValueError(
                        f"fusion_ratio: the teacher predicts {logits.shape[1]} classes but the data has "
                        f"{num_classes}; teacher and student must share the label space"
                    )
                labels = labels.to(device)
                sums.index_add_(0, labels, torch.softmax(logits.double(), dim=1))
                counts += torch.bincount(labels, minlength=num_classes).double()
        missing = counts == 0
        if bool(missing.any()):
            log.warning(
                "fusion_ratio: classes %s have no training samples; their T̄ row is uniform",
                missing.nonzero().flatten().tolist(),
            )
            sums[missing] = 1.0 / num_classes
            counts[missing] = 1.0
        return (sums / counts[:, None]).float()

    def _choose_hypergradient(self, ctx: MethodContext) -> Literal["exact", "finite_difference"]:
        """Resolve ``params.hypergradient`` for this student: probe the double backward unless told finite_difference.

        A probe rather than a list of module types: the failure comes from autograd ops (hardsigmoid_backward, a
        custom ``once_differentiable`` Function, a functional call inside some block's forward), which a module-type
        list cannot see and would go stale with new timm models; the probe asks the exact question once, on 4 real
        samples (one extra forward, backward and double backward, on the moved parameters only, so
        ``meta_scope="head"`` is probed on the head alone)."""
        wanted = self.params.hypergradient
        probe, self._probe_batch = self._probe_batch, None
        if wanted == "finite_difference":
            log.info("fusion_ratio: hypergradient finite_difference (as configured)")
            return "finite_difference"
        assert ctx.val_batch is not None
        images, targets = probe if probe is not None else ctx.val_batch(0)  # val_batch is pure in k: no state moves
        param = next(self.student.parameters())
        error = double_backward_error(
            self.student, self._virtual_param_names(), images.to(param.device, param.dtype), targets.to(param.device)
        )
        student = f"{ctx.student_name or 'student'} ({type(self.student).__name__})"
        scope = self.params.meta_scope
        if error is None:
            log.info(
                "fusion_ratio: hypergradient exact (%s: %s has a double backward over meta_scope %r)",
                wanted,
                student,
                scope,
            )
            return "exact"
        if wanted == "exact":
            raise ValueError(
                f"fusion_ratio: hypergradient 'exact' needs a double backward through the student {student} over "
                f"meta_scope {scope!r}, which it does not support ({error}); set the method's hypergradient to "
                f"'finite_difference' (or 'auto')" + (", or meta_scope to 'head'" if scope == "full" else "")
            )
        log.info(
            "fusion_ratio: hypergradient finite_difference (auto: %s has no double backward over meta_scope %r: %s)",
            student,
            scope,
            error,
        )
        return "finite_difference"

    # -- the ratio -----------------------------------------------------------------------------------------------

    def ratio(self, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> Tensor:
        """α (B,) = σ(f_ω(Δ)); S is detached, so gradients reach only ω."""
        s = torch.softmax(_wide(student_logits.detach()), dim=1)
        t = torch.softmax(_wide(teacher_logits), dim=1)
        delta = relation_features(s, t, targets, self.class_mean).to(next(self.controller.parameters()).dtype)
        return torch.sigmoid(self.controller(delta)).squeeze(1)

    # -- bilevel step --------------------------------------------------------------------------------------------

    def _virtual_param_names(self) -> set[str]:
        """Names (in student.named_parameters()) of the parameters that the virtual step moves."""
        trainable = {name for name, p in self.student.named_parameters() if p.requires_grad}
        if self.params.meta_scope == "full":
            return trainable
        head = self.student.get_classifier()  # type: ignore[operator]
        head_ids = {id(p) for p in head.parameters()}
        return {name for name, p in self.student.named_parameters() if id(p) in head_ids and name in trainable}

    def hypergradient(
        self,
        images: Tensor,
        targets: Tensor,
        teacher_logits: Tensor,
        val_images: Tensor,
        val_targets: Tensor,
        mode: Literal["exact", "finite_difference"] | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        """``L_out = CE(f_θ'(x_v), y_v)`` with ``θ' = θ − η·∇_θ L(θ, ω)``, and dL_out/dω per controller parameter.

        ``mode`` (default: ``hypergradient_mode``) picks the exact or the finite-difference path (see
        :mod:`kdpipe.distill.methods._hypergradient`). Runs with autocast off on cloned buffers; gradients go through
        ``torch.autograd.grad``, so no ``.grad`` of the student (or of ω) is touched here.
        """
        temperature = self.params.temperature

        def inner_loss(z_s: Tensor, z_ref: Tensor) -> Tensor:
            kd, ce = per_sample_losses(z_s, teacher_logits, targets, temperature)
            return fused_loss(kd, ce, self.ratio(z_ref, teacher_logits, targets))

        solve = exact_hypergradient if (mode or self.hypergradient_mode) == "exact" else finite_difference_hypergradient
        moved, omega = self._virtual_param_names(), list(self.controller.parameters())
        return solve(self.student, moved, inner_loss, images, val_images, val_targets, self.lr, omega)

    def meta_step(self, images: Tensor, targets: Tensor, teacher_logits: Tensor) -> Tensor:
        """One controller update on the next validation batch; leaves the hypergradient in ω's ``.grad``."""
        if self.lr <= 0.0 and not self._warned_lr:
            log.warning("fusion_ratio: the student lr is %s, so the hypergradient is zero", self.lr)
            self._warned_lr = True
        ctx = self.require_context()
        assert ctx.val_batch is not None
        val_images, val_targets = ctx.val_batch(int(self.meta_steps))
        val_images, val_targets = val_images.to(images.device), val_targets.to(images.device)
        outer, grads = self.hypergradient(images, targets, teacher_logits, val_images, val_targets)
        for w, g in zip(self.controller.parameters(), grads, strict=True):
            w.grad = g.detach()
        self.step_control.average(self.controller.parameters())  # data parallel: the mean over ranks' shards
        self.optimizer("controller").step()
        self.meta_steps += 1
        return outer

    # -- KDMethod ------------------------------------------------------------------------------------------------

    def optimizer_specs(self) -> dict[str, OptimizerSpec]:
        p = self.params

        def adam(params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
            return torch.optim.Adam(params, lr=lr, weight_decay=p.controller_weight_decay)

        # Adam at a fixed lr (spec §3.7): the controller is not on the student's schedule
        return {
            "controller": OptimizerSpec(
                list(self.controller.parameters()), lr=p.controller_lr, build=adam, scheduled=False
            )
        }

    def training_step(self, images: Tensor, targets: Tensor) -> dict[str, Tensor]:
        teacher_logits = _wide(self.teacher_logits(images))
        if int(self.train_steps) % self.params.meta_every == 0:
            self.stats.collect("meta_val_ce", self.meta_step(images, targets, teacher_logits).reshape(1))
        self.train_steps += 1
        student_logits = self.student(images)  # the only forward that moves BatchNorm running statistics
        with torch.autocast(images.device.type, enabled=False):
            kd, ce = per_sample_losses(student_logits, teacher_logits, targets, self.params.temperature)
            with torch.no_grad():
                alpha = self.ratio(student_logits, teacher_logits, targets).to(kd.dtype)
            loss = fused_loss(kd, ce, alpha)
            self._record_alpha(alpha, student_logits.detach(), teacher_logits, targets)
        return {
            "loss": loss,
            "logits": student_logits.detach(),
            "kd": kd.detach().mean(),
            "ce": ce.detach().mean(),
            "alpha": alpha.mean(),
        }

    # -- per-epoch α statistics ----------------------------------------------------------------------------------

    def _record_alpha(self, alpha: Tensor, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> None:
        s = torch.softmax(_wide(student_logits), dim=1)
        t = torch.softmax(teacher_logits, dim=1)
        self.stats.collect("alpha", alpha.float())
        self.stats.collect("teacher_right", teacher_logits.argmax(1) == targets)
        self.stats.collect("st_distance", (t - s).norm(dim=1).float())

    def epoch_metrics(self) -> dict[str, float]:
        """α distribution of the epoch's real steps, and the mean validation CE of its meta steps (nan if none)."""
        if not self.stats.collected("alpha"):
            return {}
        alpha = torch.cat(self.stats.collected("alpha")).cpu()
        right = torch.cat(self.stats.collected("teacher_right")).cpu()
        dist = torch.cat(self.stats.collected("st_distance")).cpu()
        q = torch.quantile(alpha, torch.tensor([0.1, 0.5, 0.9]))
        out = {
            "alpha_mean": float(alpha.mean()),
            "alpha_std": float(alpha.std(correction=0)),
            "alpha_p10": float(q[0]),
            "alpha_p50": float(q[1]),
            "alpha_p90": float(q[2]),
            "alpha_teacher_right": _mean(alpha[right]),
            "alpha_teacher_wrong": _mean(alpha[~right]),
        }
        # Table 4 of the paper: teacher-right samples split by student–teacher distance (top / bottom 20 %).
        a_right, d_right = alpha[right], dist[right]
        k = len(a_right) // 5
        if k > 0:
            order = d_right.argsort()
            out["alpha_right_small_st"] = _mean(a_right[order[:k]])
            out["alpha_right_large_st"] = _mean(a_right[order[-k:]])
        else:
            out["alpha_right_small_st"] = out["alpha_right_large_st"] = float("nan")
        meta = self.stats.collected("meta_val_ce")
        out["meta_val_ce"] = float(torch.cat(meta).mean()) if meta else float("nan")
        return out


def _mean(t: Tensor) -> float:
    return float(t.mean()) if t.numel() else float("nan")
