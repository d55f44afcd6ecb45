"""FFSD: online distillation of a student leader from fused, diversified common students, with self-distillation.

Paper: Li, Lin, Wang, Wu, Tian, Shao, Ji, "Distilling a Powerful Student Model via Online Knowledge Distillation",
IEEE TNNLS 2022, arXiv 2103.14473; official code SJLeo/FFSD (``CIFARTrainer.py``). Spec:
shared/methods/online.md §2. Behaviour follows the official code, which produced the released numbers.

Networks (one architecture, the distill stage's ``student``): m common students S_0..S_{m−1} (default 2) and a
separate leader S_L (the deployed network; ``self.student``). Training-only modules: the fusion module Φ (depthwise
3x3 + BN + ReLU, pointwise 1x1 m·C→C + BN + ReLU = fused map F_f, adaptive average pooling + Linear → z_f) on the
concatenated detached last taps of the students; a TransFusion head (depthwise 3x3 + BN + ReLU, 1x1 C→m·C + BN + ReLU
→ T_L) on the leader's last tap, kept outside the leader so the deployed model is the plain one; self-distillation
decoders D_1..D_{m−1} and D_L mapping the deepest tap back to the shallower ones.

Helpers: ``AT(F) = mean_c F²``; ``n(v)`` = per-sample unit vector; ``D(a, b) = mean (n(a) − n(b))²`` over batch and
elements; the shift target of a reference map A (N = H·W): ν = ‖A‖, â = n(A), θ = ⌊N/3⌋-th smallest â,
``t = (ν/2 − â)·sign(â − θ) + ν/2``; ``Shift(F) = F + (ν/C)(t − â)``. Warm-up ``λ(e) = λ·exp(−5(1 − e/5)²)`` for the
1-based epoch e ≤ 5, applied to λ_div, λ_fus and λ_sd.

Losses (τ = 2, every KL τ²-scaled and batch-averaged; ``sg`` = detach) and who gets gradient from what:

- Student i: ``CE(z_i, y) + τ²/(m−1) Σ_{j≠i} KL(sg p_j^τ ‖ p_i^τ)``; for i ≥ 1 also
  ``λ_div·[mean (n(AT(F_i^L)) − t(AT(sg F_{i−1}^L)))²  +  Σ_{k<L} D(AT(F_i^k), AT(sg Ď_k))]`` with
  ``Ď = D_i(Shift(sg F_{i−1}^L))`` produced in eval mode. Nothing from Φ, the leader or the decoders' own losses.
- Φ: ``CE(z_f, y) + τ²·KL(sg p̄^τ ‖ p_f^τ)``, p̄ from the students' mean logits; its input is detached.
- Leader (+ TransFusion): ``CE(z_L, y) + τ²·KL(sg p_f^τ ‖ p_L^τ) + λ_fus·[D(AT(F_L^L), AT(sg F_f)) +
  D(AT(T_L), AT(sg cat_i F_i^L)) + Σ_{k<L} D(AT(F_L^k), AT(sg D_L(sg F_f)_k))]``, D_L in eval mode. The leader gives
  nothing back to Φ or the students.
- Decoder D (D_i fitted on student i, D_L on the leader, train mode, the owner's detached taps):
  ``λ_sd·Σ_{k<L} [D(Ď_k, sg F^k) + D(AT(Ď_k), AT(sg F^k))]`` with ``Ď = D(sg F^L)``.

Update order per batch (official): every forward first; students 0..m−1 one after another; Φ; the leader; the
decoders (each with its own Adam). The graphs are disjoint, so the per-network losses are all built in
:meth:`FFSD.losses` and then stepped in that order.

Code vs paper (spec §3): λ_sd only scales the decoders' own (Adam-optimised) reconstruction loss; the students'
self-distillation is weighted by λ_div and the leader's by λ_fus. The TransFusion loss is code-only. Diversity is
chained i−1 → i. Only one leader. The code's logged "Ensemble Acc" (a logical OR) is not reproduced.

Our choices: taps are ``select_stages(stage_specs(model), "stages")`` (timm: one per stage after the stem; kdpipe's
CIFAR nets: layer1..layer3), at least two are required. Φ pools adaptively (not AvgPool2d(8)). Decoder layer k maps
tap k+1 to tap k with the channels of ``feature_info`` and stride r = reduction_{k+1}/reduction_k (ConvTranspose
3x3, padding 1, output padding r−1; a 3x3 conv when r = 1); each output is resized to the tap's size when odd input
sizes make them differ. ``decoder_relu=False`` drops the decoder's final ReLU (for GELU/pre-norm features). Θ guard:
with N < 3 no position is in the "bottom third", so t = ν − â everywhere. Decoder targets are produced under
``no_grad`` (the code detaches them). Φ and TransFusion keep the code's init (convs N(0, √(2/(k²·out))), BN
weight 1 / bias 0: both are built inside the official network, whose init loop covers them); the decoders keep
PyTorch's default. Helpers compute in fp32 (fp64 inputs stay fp64). Logged parts are unweighted terms.

Optimizers: students and leader(+TransFusion) the stage's optimizer (recipe: SGD nesterov, wd 1e-4); Φ the same with
weight decay 1e-5; decoders ``torch.optim.Adam`` (L2 weight decay, not AdamW) lr 1e-3 wd 1e-4. All follow the stage's
lr schedule. Teacher: none. Taps: all stage outputs of every network. Deployed: the leader.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat
from torch import Tensor, nn

from kdpipe.distill.methods.base import KDMethod, MethodContext, MethodParams
from kdpipe.distill.methods.dml import mutual_losses
from kdpipe.distill.methods.kd import kd_loss
from kdpipe.distill.step import OptimizerSpec
from kdpipe.distill.taps import TapError, Taps, TapSpec, resize_to, select_stages, stage_specs
from kdpipe.registry import METHODS


class FFSDParams(MethodParams):
    name: Literal["ffsd"] = "ffsd"
    num_students: int = Field(2, ge=2)
    """m, the common students (the leader is one more network)."""
    temperature: PositiveFloat = 2.0
    """τ of the DML, fusion and leader KL terms (each scaled by τ²)."""
    div_weight: float = Field(1e-5, ge=0.0)
    """λ_div: the students' diversity and self-distillation terms (code)."""
    fus_weight: float = Field(10.0, ge=0.0)
    """λ_fus: the leader's fused-feature, TransFusion and self-distillation terms."""
    sd_weight: float = Field(1000.0, ge=0.0)
    """λ_sd: the decoders' reconstruction loss (code; Adam makes it nearly scale-free)."""
    warmup_epochs: int = Field(5, ge=0)
    """λ(e) = λ·exp(−5(1 − e/W)²) for the 1-based epoch e ≤ W; 0 disables the warm-up."""
    fusion_weight_decay: float = Field(1e-5, ge=0.0)
    decoder_lr: PositiveFloat = 1e-3
    decoder_weight_decay: float = Field(1e-4, ge=0.0)
    decoder_relu: bool = True
    """End each decoder layer with ReLU (post-ReLU taps, as in the code)."""


# -- helper operations (spec §2.5) -------------------------------------------------------------------------------------


def _wide(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def attention_map(f: Tensor) -> Tensor:
    """``AT(F)``: mean over channels of F², (B, 1, H, W)."""
    return _wide(f).pow(2).mean(1, keepdim=True)


def unit(x: Tensor) -> Tensor:
    """Per-sample unit vector of ``x`` flattened to (B, N): ``v / max(‖v‖₂, 1e-12)``."""
    return F.normalize(_wide(x).flatten(1), p=2.0, dim=1, eps=1e-12)


def normalized_mse(a: Tensor, b: Tensor) -> Tensor:
    """``D(a, b)``: mean over batch and elements of (n(a) − n(b))²."""
    return (unit(a) - unit(b)).pow(2).mean()


def shift_target(a: Tensor) -> Tensor:
    """Attention-shift target t (shape of ``a``) of a reference attention map ``a`` (B, 1, H, W)."""
    flat = _wide(a).flatten(1)
    nu = flat.norm(dim=1, keepdim=True)
    a_hat = unit(flat)
    k = flat.shape[1] // 3  # k = 0 (N < 3): no "bottom third", every position is inverted
    theta = a_hat.topk(k, dim=1, largest=False).values[:, -1:] if k else torch.full_like(nu, -math.inf)
    return ((nu / 2 - a_hat) * torch.sign(a_hat - theta) + nu / 2).view_as(a)


def shift_features(f: Tensor) -> Tensor:
    """``Shift(F) = F + (ν / C)·(t − â)``, the (B, 1, H, W) increment broadcast over the C channels."""
    a = attention_map(f)
    nu = a.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    diff = shift_target(a) - unit(a).view_as(a)
    return f + (nu / f.shape[1] * diff).to(f.dtype)


def warmup_factor(epoch: int, warmup_epochs: int = 5) -> float:
    """λ(e)/λ for the 1-based ``epoch``: ``exp(−5(1 − e/W)²)`` while e ≤ W, then 1."""
    if warmup_epochs <= 0 or epoch > warmup_epochs:
        return 1.0
    return math.exp(-5.0 * (1.0 - epoch / warmup_epochs) ** 2)


# -- loss terms (unweighted) -------------------------------------------------------------------------------------------


def diversity_loss(current: Tensor, previous: Tensor) -> Tensor:
    """``mean (n(AT(F_i^L)) − t(AT(sg F_{i−1}^L)))²`` on last-tap feature maps; the target is not normalised."""
    target = shift_target(attention_map(previous.detach())).flatten(1)
    return (unit(attention_map(current)) - target).pow(2).mean()


def self_distillation_loss(shallow: Sequence[Tensor], decoded: Sequence[Tensor]) -> Tensor:
    """``Σ_k D(AT(F^k), AT(sg Ď_k))`` over the shallow taps; gradient reaches only ``shallow``."""
    terms = [normalized_mse(attention_map(f), attention_map(d.detach())) for f, d in zip(shallow, decoded, strict=True)]
    return torch.stack(terms).sum()


def decoder_fit_loss(decoded: Sequence[Tensor], shallow: Sequence[Tensor]) -> Tensor:
    """``Σ_k [D(Ď_k, sg F^k) + D(AT(Ď_k), AT(sg F^k))]``: a decoder's reconstruction of its owner's taps."""
    terms = []
    for d, f in zip(decoded, shallow, strict=True):
        target = f.detach()
        terms.append(normalized_mse(d, target) + normalized_mse(attention_map(d), attention_map(target)))
    return torch.stack(terms).sum()


def fusion_loss(fused_logits: Tensor, mean_logits: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """L_Φ = CE(z_f, y) + τ²·KL(sg softmax(z̄/τ) ‖ softmax(z_f/τ))."""
    return F.cross_entropy(_wide(fused_logits), targets) + kd_loss(fused_logits, mean_logits.detach(), temperature)


def leader_terms(
    logits: Tensor,
    fused_logits: Tensor,
    leader_maps: Sequence[Tensor],
    fused: Tensor,
    trans: Tensor,
    students_last: Tensor,
    decoded: Sequence[Tensor],
    targets: Tensor,
    temperature: float,
) -> dict[str, Tensor]:
    """The leader's unweighted terms: ce, kd (from z_f), fus (F_f), trans (TransFusion), sd (D_L(F_f))."""
    return {
        "ce": F.cross_entropy(_wide(logits), targets),
        "kd": kd_loss(logits, fused_logits.detach(), temperature),
        "fus": normalized_mse(attention_map(leader_maps[-1]), attention_map(fused.detach())),
        "trans": normalized_mse(attention_map(trans), attention_map(students_last.detach())),
        "sd": self_distillation_loss(leader_maps[:-1], decoded),
    }


# -- modules (spec §2.4, §2.12) ----------------------------------------------------------------------------------------


def _dw_pw(c_in: int, c_out: int) -> tuple[nn.Sequential, nn.Sequential]:
    """Depthwise 3x3 + BN + ReLU, then pointwise 1x1 + BN + ReLU, initialised as the official networks initialise
    every conv they own: N(0, √(2/n)) with n = k²·out_channels (He's fan-out normal; BN weight 1, bias 0 is
    PyTorch's default already)."""
    dw_conv = nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False)
    pw_conv = nn.Conv2d(c_in, c_out, 1, bias=False)
    for conv in (dw_conv, pw_conv):
        fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels
        nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / fan_out))
    depthwise = nn.Sequential(dw_conv, nn.BatchNorm2d(c_in), nn.ReLU())
    pointwise = nn.Sequential(pw_conv, nn.BatchNorm2d(c_out), nn.ReLU())
    return depthwise, pointwise


class FusionModule(nn.Module):
    """Φ: (B, m·C, H, W) detached student maps → (z_f, F_f) with F_f (B, C, H, W); any H, W (adaptive pooling)."""

    def __init__(self, channels: int, num_students: int, num_classes: int) -> None:
        super().__init__()
        self.depthwise, self.pointwise = _dw_pw(channels * num_students, channels)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        fused = self.pointwise(self.depthwise(x))
        return self.fc(F.adaptive_avg_pool2d(fused, 1).flatten(1)), fused


class TransFusion(nn.Module):
    """The leader's training-only head: (B, C, H, W) last tap → T_L (B, m·C, H, W)."""

    def __init__(self, channels: int, num_students: int) -> None:
        super().__init__()
        self.depthwise, self.pointwise = _dw_pw(channels, channels * num_students)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.pointwise(self.depthwise(x))
        return out


class SelfDistillationDecoder(nn.Module):
    """Deepest tap → one map per shallower tap (returned shallowest first), one layer per tap boundary."""

    def __init__(self, specs: Sequence[TapSpec], relu: bool = True) -> None:
        super().__init__()
        layers = []
        for k in reversed(range(len(specs) - 1)):  # deep to shallow
            deep, shallow = specs[k + 1], specs[k]
            r = max(1, round(deep.reduction / shallow.reduction))
            conv: nn.Module
            if r > 1:
                conv = nn.ConvTranspose2d(
                    deep.channels, shallow.channels, 3, stride=r, padding=1, output_padding=r - 1, bias=False
                )
            else:
                conv = nn.Conv2d(deep.channels, shallow.channels, 3, padding=1, bias=False)
            layers.append(nn.Sequential(conv, nn.BatchNorm2d(shallow.channels), *([nn.ReLU()] if relu else [])))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor, sizes: Sequence[tuple[int, int]] | None = None) -> list[Tensor]:
        """``sizes``: (H, W) of the shallow taps (shallowest first); each output is resized to its tap's size."""
        outs = []
        for j, layer in enumerate(self.layers):
            x = layer(x)
            if sizes is not None:
                x = resize_to(x, sizes[len(self.layers) - 1 - j])
            outs.append(x)
        return outs[::-1]


# -- the method --------------------------------------------------------------------------------------------------------


@dataclass
class FFSDLosses:
    """Every network's loss of one batch (graphs disjoint), in update order, plus detached logging parts."""

    students: list[Tensor]
    fusion: Tensor
    leader: Tensor
    decoders: dict[str, Tensor]
    """Keyed by optimizer name: decoder1..decoder{m−1}, decoder_leader."""
    leader_logits: Tensor
    fused_logits: Tensor
    parts: dict[str, Tensor] = field(default_factory=dict)


def _sizes(maps: Sequence[Tensor]) -> list[tuple[int, int]]:
    return [(int(f.shape[-2]), int(f.shape[-1])) for f in maps[:-1]]


@METHODS.register("ffsd", summary="FFSD: leader learns from fused diverse students + self-distillation (2103.14473)")
class FFSD(KDMethod):
    """Feature fusion and self-distillation (see module docstring)."""

    Params = FFSDParams
    params: FFSDParams
    teacher_role = "none"
    manual_optimization = True
    deployed_network = "leader"

    def __init__(
        self,
        params: FFSDParams,
        student: nn.Module,
        teacher: nn.Module | None = None,
        context: MethodContext | None = None,
    ) -> None:
        super().__init__(params, student, None, context)
        ctx = self.require_context()
        if not ctx.student_name:
            raise ValueError("ffsd builds its common students from the context's student_name, which is empty")
        m = params.num_students
        self.students = nn.ModuleList(self.build_network(ctx.student_name) for _ in range(m))
        specs = select_stages(stage_specs(student), "stages")
        if len(specs) < 2:
            raise TapError(f"ffsd needs at least two stage taps for self-distillation; {ctx.student_name} has one")
        for s in self.students:
            if [(t.channels, t.reduction) for t in select_stages(stage_specs(s), "stages")] != [
                (t.channels, t.reduction) for t in specs
            ]:
                raise TapError(f"the common students of {ctx.student_name} do not match the leader's taps")
        self.specs = specs
        channels = specs[-1].channels
        self.fusion = FusionModule(channels, m, ctx.num_classes)
        self.trans_fusion = TransFusion(channels, m)
        self.decoders = nn.ModuleList(SelfDistillationDecoder(specs, params.decoder_relu) for _ in range(m - 1))
        self.leader_decoder = SelfDistillationDecoder(specs, params.decoder_relu)
        # Plain attributes: hooks that record only inside Taps.forward.
        self._student_taps = [Taps(s, specs) for s in self.students]
        self._leader_taps = Taps(student, specs)

    def networks(self) -> dict[str, nn.Module]:
        nets: dict[str, nn.Module] = {f"student{i}": s for i, s in enumerate(self.students)}
        nets["leader"] = self.student
        return nets

    def network_arch(self, name: str) -> str:
        return self.context.student_name if self.context is not None else ""

    def optimizer_specs(self) -> dict[str, OptimizerSpec]:
        p = self.params
        specs = {f"student{i}": OptimizerSpec(list(s.parameters())) for i, s in enumerate(self.students)}
        specs["fusion"] = OptimizerSpec(
            list(self.fusion.parameters()), overrides={"weight_decay": p.fusion_weight_decay}
        )
        specs["leader"] = OptimizerSpec([*self.student.parameters(), *self.trans_fusion.parameters()])
        named = {f"decoder{i}": d for i, d in enumerate(self.decoders, start=1)}
        named["decoder_leader"] = self.leader_decoder

        def adam(params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
            return torch.optim.Adam(params, lr=lr, weight_decay=p.decoder_weight_decay)

        for name, decoder in named.items():  # Adam as the official code, on the stage's schedule
            specs[name] = OptimizerSpec(list(decoder.parameters()), lr=p.decoder_lr, build=adam)
        return specs

    def warmup(self) -> float:
        return warmup_factor(self.epoch + 1, self.params.warmup_epochs)

    @staticmethod
    def decoder_targets(decoder: nn.Module, x: Tensor, sizes: list[tuple[int, int]]) -> list[Tensor]:
        """Targets from a decoder applied to a foreign deep map: eval mode (running BN stats), no gradient."""
        decoder.eval()
        with torch.no_grad():
            return decoder(x.detach(), sizes)

    @staticmethod
    def decoder_fit(decoder: nn.Module, maps: Sequence[Tensor]) -> Tensor:
        """A decoder's reconstruction loss on its owner's detached taps, in train mode."""
        decoder.train()
        return decoder_fit_loss(decoder(maps[-1].detach(), _sizes(maps)), maps[:-1])

    def losses(self, images: Tensor, targets: Tensor) -> FFSDLosses:
        """All forwards of one batch and every network's (weighted) loss; nothing is stepped."""
        p, m, tau = self.params, self.params.num_students, self.params.temperature
        w = self.warmup()
        lam_div, lam_fus, lam_sd = w * p.div_weight, w * p.fus_weight, w * p.sd_weight
        leader_logits, leader_maps = self._leader_taps(images)
        trans = self.trans_fusion(leader_maps[-1])
        outs = [taps(images) for taps in self._student_taps]
        logits, maps = [z for z, _ in outs], [f for _, f in outs]
        students_last = torch.cat([f[-1].detach() for f in maps], dim=1)
        fused_logits, fused = self.fusion(students_last)
        mean_logits = torch.stack([_wide(z.detach()) for z in logits]).mean(0)
        parts: dict[str, Tensor] = {}

        student_losses = mutual_losses(logits, targets, tau, 1.0)
        for i in range(1, m):
            previous = maps[i - 1][-1].detach()
            div = diversity_loss(maps[i][-1], previous)
            decoded = self.decoder_targets(self.decoders[i - 1], shift_features(previous), _sizes(maps[i]))
            sd = self_distillation_loss(maps[i][:-1], decoded)
            student_losses[i] = student_losses[i] + lam_div * (div + sd)
            parts |= {f"div_student{i}": div.detach(), f"sd_student{i}": sd.detach()}

        loss_fusion = fusion_loss(fused_logits, mean_logits, targets, tau)

        decoded_leader = self.decoder_targets(self.leader_decoder, fused, _sizes(leader_maps))
        terms = leader_terms(
            leader_logits, fused_logits, leader_maps, fused, trans, students_last, decoded_leader, targets, tau
        )
        loss_leader = terms["ce"] + terms["kd"] + lam_fus * (terms["fus"] + terms["trans"] + terms["sd"])
        parts |= {f"{k}_leader": v.detach() for k, v in terms.items()}

        decoders = {f"decoder{i}": lam_sd * self.decoder_fit(d, maps[i]) for i, d in enumerate(self.decoders, 1)}
        decoders["decoder_leader"] = lam_sd * self.decoder_fit(self.leader_decoder, leader_maps)
        parts["top1_fusion"] = (fused_logits.detach().argmax(1) == targets).float().mean()
        return FFSDLosses(student_losses, loss_fusion, loss_leader, decoders, leader_logits, fused_logits, parts)

    def training_step(self, images: Tensor, targets: Tensor) -> dict[str, Tensor]:
        step = self.losses(images, targets)
        named = {f"student{i}": loss for i, loss in enumerate(step.students)}
        named |= {"fusion": step.fusion, "leader": step.leader, **step.decoders}
        for name, loss in named.items():  # students, Φ, leader, decoders: the official order
            self.backward_step(loss, self.optimizer(name))
        out = {f"loss_{name}": loss.detach() for name, loss in named.items()}
        out["loss"] = torch.stack([_wide(loss.detach()) for loss in named.values()]).sum()
        out["logits"] = step.leader_logits.detach()
        return out | step.parts

    def epoch_metrics(self) -> dict[str, float]:
        return {"lambda_warmup": self.warmup()}

    def deployable(self) -> nn.Module:
        return self.student
