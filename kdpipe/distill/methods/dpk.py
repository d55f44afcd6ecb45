"""Dynamic prior knowledge (DPK): part of the teacher's feature is mixed into the student's before a generator
reconstructs the teacher feature; the teacher share follows the student–teacher feature gap.

Paper: Qiu, Ma, Yang, Liu, Hou, Yi, Ouyang, "Better Teacher Better Student: Dynamic Prior Knowledge for Knowledge
Distillation", ICLR 2023, arXiv 2206.06067. No official code exists; this follows shared/methods/offline.md §1
(tags there: [secondary] = the paper as summarised, [our default] = ours where the sources are silent).

Per distilled stage pair k, with student map S_k (B, Cs, H, W) and raw teacher map T_k (B, Ct, H', W'):

- Ŝ_k = E_k(resize(S_k → H'×W')), E_k = 1x1 conv + BN (Cs → Ct);
- M_k: per sample, exactly round(π_k·N) of the N tokens (p×p patches) are teacher tokens, drawn MAE-style;
- X_k = M_k ⊙ sg(T_k) + (1 − M_k) ⊙ Ŝ_k  (the "prior knowledge" [secondary]);
- L_k = ‖G_k(X_k) − sg(T_k)‖² over the student-visible positions, divided by their count times Ct;
- π_k = clamp(1 − EMA_0.9(CKA(S_k, T_k)), 0.05, 0.95), linear CKA of the raw maps [secondary: π = 1 − CKA].

``L = w_ce·CE(z_s, y) + λ_kd·τ²·KL(softmax(z_t/τ) ‖ softmax(z_s/τ)) + ramp(epoch)·λ_dpk·Σ_k L_k``,
ramp = min((epoch + 1)/warmup, 1) with the 0-based epoch (the DKD/ReviewKD 20-epoch warm-up, as in dkd.py).

Choices that are [our default] (the paper's values were not retrieved; see offline.md §1.3, §1.7):

- Stages: every stage after the stem (``stages="stages"``) whose teacher map is at least ``min_spatial`` (4) on both
  sides; teacher and student taps are paired by :func:`kdpipe.distill.taps.pair_stages` (equal reduction, else
  relative depth), so any timm pair works: CNN or ViT teacher (tokens as a patch-grid map), different stage counts.
- Spatial alignment: the student map goes to the teacher grid with :func:`~kdpipe.distill.taps.resize_to` (bilinear;
  adaptive average pooling when shrinking by ≥ 2, offline.md §4). The target stays on the raw teacher grid.
- Tokens: p = 1 for maps of at most 16x16, else p = 2 (p = 1 when a side is odd); per-sample masks; the count uses
  round-half-up, floor(π·N + 0.5). π is read before this batch's CKA updates it, so the first step uses π = 0.5.
- G_k "vit" (default): a p×p patch embedding (a linear map of each token, Ct·p² → D), D = min(Ct, 256) rounded up
  to a multiple of the 4 heads, a learned 2-D position embedding (interpolated if the grid changes), 2 pre-norm
  timm ``Block``s (MLP ratio 4), a final LayerNorm, and a linear head D → Ct·p² folded back by pixel shuffle.
  "conv": the MGD-style generator 3x3 conv → BN → ReLU → 3x3 conv.
- Reconstruction target: the raw detached teacher map, never a trainable projection (pitfall 1: a learnable target
  can co-adapt with the prediction and collapse).
- Reduction "visible" (default), per pitfall 4: teacher-filled positions can be rebuilt by copying the input, and the
  student's feature reaches the loss only at student-visible positions. Averaging over all positions ("all", TST's
  MSE) scales the student's gradient by (1 − π), so as π falls from 0.95 the feature weight would silently grow up
  to 19x; normalising by the visible count keeps it stable along the curriculum.
- CKA: raw S_k vs raw T_k (the trainable E_k cannot game it), fp32 outside autocast, no grad, from B×B Gram matrices
  of batch-centred features. The estimator is the unbiased HSIC of Nguyen, Raghu & Kornblith (ICLR 2021), whose
  "minibatch CKA" the DPK authors name [secondary]; the EMA stands in for its average over minibatches. The biased
  estimator (``cka_estimator="biased"``) drifts towards 1 for features much wider than the batch: measured here,
  independent 4096-d noise on 32 samples scores > 0.95 (unbiased: < 0.05), which drives π to its floor within an
  epoch and removes the curriculum. EMA momentum 0.9 from π = 0.5; skipped for batches too small for CKA.
- Weights: w_ce = 1, λ_kd = 1, τ = 4, λ_dpk = 1 (offline.md suggests tuning over {1, 2, 5}), warm-up 20 epochs.

Gradients: the student gets its feature gradient through Ŝ_k at student-visible positions (E_k's BatchNorm batch
statistics add a small coupling to the other positions), plus CE/KD on logits. E_k and G_k are submodules (so in the
optimizer) and are never exported: :meth:`DPK.deployable` is the plain student.

Taps: teacher and student stage outputs (``feature_info``). Teacher: frozen. Epoch metrics per stage k: ``pi_k`` (π at
the end of the epoch; it should trend down, pitfall 2), ``cka_k`` and ``recon_k`` (epoch means).
"""

from __future__ import annotations

import logging
import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat, PositiveInt, model_validator
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from kdpipe.distill.methods.base import KDMethod, MethodContext, MethodParams, linear_ramp
from kdpipe.distill.methods.kd import kd_loss
from kdpipe.distill.stats import EpochStats
from kdpipe.distill.taps import ConvAdapter, TapError, Taps, TapSpec, pair_stages, resize_to, select_stages, stage_specs
from kdpipe.registry import METHODS

log = logging.getLogger(__name__)

__all__ = [
    "DPK",
    "ConvGenerator",
    "DPKParams",
    "TokenGenerator",
    "linear_cka",
    "random_token_mask",
    "reconstruction_loss",
    "teacher_token_count",
]

Reduction = Literal["visible", "all"]


class DPKParams(MethodParams):
    name: Literal["dpk"] = "dpk"
    stages: Literal["all", "stages", "last"] | PositiveInt | list[int] = "stages"
    """Stage selector applied to both nets before pairing (see kdpipe.distill.taps.StageSelector)."""
    min_spatial: PositiveInt = 4
    """Pairs whose teacher map is smaller than this (pixels, either side) are not distilled."""
    generator: Literal["vit", "conv"] = "vit"
    """G_k: the ViT-style encoder-decoder, or the cheaper MGD-style conv generator."""
    embed_dim: PositiveInt = 256
    """Cap on the ViT generator width: D = min(Ct, embed_dim), rounded up to a multiple of num_heads."""
    depth: PositiveInt = 2
    """Transformer blocks in the ViT generator."""
    num_heads: PositiveInt = 4
    mlp_ratio: PositiveFloat = 4.0
    patch_size: PositiveInt | None = None
    """Token side p in pixels of the teacher map; None: 1 for maps up to 16x16, else 2."""
    reduction: Reduction = "visible"
    """Reconstruction loss over student-visible positions (normalised by their count) or over all positions."""
    cka_momentum: float = Field(0.9, ge=0.0, lt=1.0)
    """EMA momentum of the per-stage CKA (0: no smoothing)."""
    cka_estimator: Literal["biased", "unbiased"] = "unbiased"
    """HSIC estimator of the CKA: "biased" (offline.md §1.2 step 9) or "unbiased" (Nguyen et al.'s minibatch CKA)."""
    initial_ratio: float = Field(0.5, ge=0.0, le=1.0)
    """π at the start of training (the EMA of CKA starts at 1 − initial_ratio)."""
    min_ratio: float = Field(0.05, ge=0.0, le=1.0)
    max_ratio: float = Field(0.95, ge=0.0, le=1.0)
    ce_weight: float = Field(1.0, ge=0.0)
    kd_weight: float = Field(1.0, ge=0.0)
    """λ_kd of the τ²-scaled logit KL term (0 turns logit KD off)."""
    temperature: PositiveFloat = 4.0
    dpk_weight: float = Field(1.0, ge=0.0)
    """λ_dpk of the summed per-stage reconstruction losses."""
    warmup_epochs: int = Field(20, ge=0)
    """λ_dpk ramps linearly from 1/warmup to 1 over this many epochs (0: no ramp)."""

    @model_validator(mode="after")
    def _ratios(self) -> DPKParams:
        if not self.min_ratio <= self.initial_ratio <= self.max_ratio:
            raise ValueError(
                f"need min_ratio <= initial_ratio <= max_ratio, got {self.min_ratio}, {self.initial_ratio}, "
                f"{self.max_ratio}"
            )
        return self


def linear_cka(x: Tensor, y: Tensor, unbiased: bool = False, eps: float = 1e-12) -> Tensor:
    """Linear CKA between two batches of features, each flattened per sample ((B, ...) to (B, D); D may differ).

    ``CKA = <K̃, L̃>_F / (‖K̃‖_F·‖L̃‖_F)`` with K̃ = X̃X̃ᵀ, L̃ = ỸỸᵀ the B×B Gram matrices of the batch-centred
    features (equal to HSIC(K, L)/sqrt(HSIC(K, K)·HSIC(L, L)) with H = I − 11ᵀ/B). Computed in fp32 outside autocast
    and without grad; each feature matrix is rescaled first (CKA is scale-invariant) so large activations cannot
    overflow. Returns a 0-dim fp32 tensor in [0, 1]; 0 when either side has no variance across the batch.

    ``unbiased=True`` uses the unbiased HSIC estimator of Song et al. (2012) on the uncentred Grams, as the minibatch
    CKA of Nguyen, Raghu & Kornblith (ICLR 2021) does (needs B ≥ 4; may dip slightly below 0). The default biased
    form is close to 1 for any two features when C·H·W >> B and the features are near-isotropic (independent noise
    of 4096 dims on 32 samples scores ≈ 0.99); the unbiased one scores such pairs ≈ 0.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs the same batch on both sides, got {x.shape[0]} and {y.shape[0]} samples")
    if unbiased and x.shape[0] < 4:
        raise ValueError(f"the unbiased CKA estimator needs at least 4 samples, got {x.shape[0]}")
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        a = x.detach().reshape(x.shape[0], -1).float()
        b = y.detach().reshape(y.shape[0], -1).float()
        a = a - a.mean(0, keepdim=True)  # centring the features centres the Grams (H K H), and is exact in fp32
        b = b - b.mean(0, keepdim=True)
        # Two scalings (CKA ignores both): by the largest entry so the norm's sum of squares cannot overflow, then
        # to unit Frobenius norm so the Gram products stay O(1).
        a = a / a.abs().amax().clamp_min(eps)
        b = b / b.abs().amax().clamp_min(eps)
        a = a / a.norm().clamp_min(eps)
        b = b / b.norm().clamp_min(eps)
        k, l_ = a @ a.T, b @ b.T
        if unbiased:
            kl, kk, ll = _hsic_unbiased(k, l_), _hsic_unbiased(k, k), _hsic_unbiased(l_, l_)
            den = (kk * ll).clamp_min(0).sqrt()
            return torch.where(den > eps, kl / den.clamp_min(eps), torch.zeros_like(den))
        den = k.norm() * l_.norm()
        return torch.where(den > eps, (k * l_).sum() / den.clamp_min(eps), torch.zeros_like(den))


def _hsic_unbiased(k: Tensor, l_: Tensor) -> Tensor:
    """Song et al.'s unbiased HSIC from two B×B Grams (their diagonals are dropped); centring the Grams first does not
    change it."""
    n = k.shape[0]
    k = k - torch.diag_embed(torch.diagonal(k))
    l_ = l_ - torch.diag_embed(torch.diagonal(l_))
    cross = k.sum(1) @ l_.sum(1)
    return ((k * l_).sum() + k.sum() * l_.sum() / ((n - 1) * (n - 2)) - 2.0 * cross / (n - 2)) / (n * (n - 3))


def teacher_token_count(ratio: Tensor | float, n_tokens: int) -> Tensor:
    """round(ratio·N), half up, clamped to [0, N]: the exact number of teacher tokens per sample (a long tensor)."""
    ratio_t = torch.as_tensor(ratio, dtype=torch.float32)
    return torch.floor(ratio_t * n_tokens + 0.5).clamp(0, n_tokens).long()


def random_token_mask(
    batch: int, size: tuple[int, int], patch: int, ratio: Tensor | float, device: torch.device | None = None
) -> Tensor:
    """Bool mask (B, 1, H, W), True = teacher: per sample exactly round(ratio·N) of the N = (H/p)·(W/p) tokens,
    chosen uniformly by ranking uniform noise (the MAE shuffle). ``ratio`` may be a tensor: no host sync."""
    h, w = size[0] // patch, size[1] // patch
    if h * patch != size[0] or w * patch != size[1]:
        raise ValueError(f"token size {patch} does not divide the map size {size}")
    count = teacher_token_count(ratio, h * w).to(device)
    ranks = torch.rand(batch, h * w, device=device).argsort(1).argsort(1)
    mask = (ranks < count).view(batch, 1, h, w)
    if patch > 1:
        mask = mask.repeat_interleave(patch, 2).repeat_interleave(patch, 3)
    return mask


def reconstruction_loss(pred: Tensor, target: Tensor, mask: Tensor, reduction: Reduction = "visible") -> Tensor:
    """Squared error of ``pred`` against the (detached) ``target``, both (B, C, H, W), in fp32.

    "all": mean over every element. "visible": sum over the positions where ``mask`` (B, 1, H, W) is False (the
    student's), divided by their count times C; 0 when no position is visible.
    """
    err = (pred.float() - target.detach().float()).pow(2)
    if reduction == "all":
        return err.mean()
    visible = (~mask).to(err.dtype)
    return (err * visible).sum() / (visible.sum() * err.shape[1]).clamp_min(1.0)


class TokenGenerator(nn.Module):
    """G_k "vit": patch embedding, learned 2-D position embedding, pre-norm transformer blocks, linear head to
    ``channels``·p² per token, pixel-shuffled back to the input's (B, channels, H, W)."""

    def __init__(
        self, channels: int, size: tuple[int, int], patch: int, dim: int, depth: int, num_heads: int, mlp_ratio: float
    ) -> None:
        super().__init__()
        self.patch = patch
        self.embed = nn.Conv2d(channels, dim, patch, stride=patch)  # one linear map of each p×p token
        self.pos = nn.Parameter(torch.zeros(1, dim, size[0] // patch, size[1] // patch))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, channels * patch * patch)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.embed(x)
        b, _, h, w = tokens.shape
        pos: Tensor = self.pos
        if pos.shape[-2:] != (h, w):
            pos = F.interpolate(pos, size=(h, w), mode="bilinear", align_corners=False)
        seq = (tokens + pos).flatten(2).transpose(1, 2)
        out = self.head(self.norm(self.blocks(seq)))  # (B, N, C·p²), channel order c·p² + i·p + j
        return F.pixel_shuffle(out.transpose(1, 2).reshape(b, -1, h, w), self.patch)


class ConvGenerator(nn.Sequential):
    """G_k "conv": the MGD generator, 3x3 conv → BN → ReLU → 3x3 conv at ``channels`` width."""

    def __init__(self, channels: int) -> None:
        super().__init__(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1),
        )


def _patch_size(params: DPKParams, size: tuple[int, int]) -> int:
    if params.patch_size is None:
        return 2 if max(size) > 16 and size[0] % 2 == 0 and size[1] % 2 == 0 else 1
    if size[0] % params.patch_size or size[1] % params.patch_size:
        raise ValueError(
            f"dpk patch_size={params.patch_size} does not divide the teacher map {size[0]}x{size[1]}; "
            "leave patch_size unset (auto) or pick a divisor"
        )
    return params.patch_size


def _model_device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.zeros(0)).device


@METHODS.register(
    "dpk", summary="dynamic prior knowledge: teacher tokens mixed into student features, π = 1 − CKA (arXiv 2206.06067)"
)
class DPK(KDMethod):
    """Dynamic prior knowledge distillation (see module docstring)."""

    provenance: ClassVar[str] = (
        "a reconstruction: the official repository is empty and the full paper was not readable, so the training step "
        "follows its abstract and secondary summaries of it (shared/methods/offline.md §1); choices marked "
        "[our default] are kdpipe's, and no published CIFAR number exists to check it against"
    )

    Params = DPKParams
    params: DPKParams
    cka_ema: Tensor

    def __init__(
        self,
        params: DPKParams,
        student: nn.Module,
        teacher: nn.Module | None = None,
        context: MethodContext | None = None,
    ) -> None:
        super().__init__(params, student, teacher, context)
        assert teacher is not None  # the base class raises for a missing frozen teacher
        p = self.params
        input_shape = self.require_context().input_shape
        t_specs, s_specs = select_stages(stage_specs(teacher), p.stages), select_stages(stage_specs(student), p.stages)
        pairs = pair_stages(t_specs, s_specs)
        t_shapes = self._dry_shapes(teacher, [t for t, _ in pairs], input_shape)
        s_shapes = self._dry_shapes(student, [s for _, s in pairs], input_shape)
        keep = [i for i, (_, h, w) in enumerate(t_shapes) if min(h, w) >= p.min_spatial]
        if not keep:
            sizes = ", ".join(f"{h}x{w}" for _, h, w in t_shapes)
            raise TapError(
                f"dpk: no teacher stage map is at least {p.min_spatial}x{p.min_spatial} at input "
                f"{input_shape} (paired teacher maps: {sizes}); lower min_spatial or use larger inputs"
            )
        self.stage_pairs: list[tuple[TapSpec, TapSpec]] = [pairs[i] for i in keep]
        self.patch_sizes: list[int] = []
        encoders: list[nn.Module] = []
        generators: list[nn.Module] = []
        for i in keep:
            ct, h, w = t_shapes[i]
            patch = _patch_size(p, (h, w))
            self.patch_sizes.append(patch)
            encoders.append(ConvAdapter(s_shapes[i][0], ct))
            if p.generator == "vit":
                dim = math.ceil(min(ct, p.embed_dim) / p.num_heads) * p.num_heads
                generators.append(TokenGenerator(ct, (h, w), patch, dim, p.depth, p.num_heads, p.mlp_ratio))
            else:
                generators.append(ConvGenerator(ct))
        self.encoders = nn.ModuleList(encoders)
        self.generators = nn.ModuleList(generators)
        k = len(keep)
        # The EMA of CKA is state: a buffer, so checkpoints (and therefore resumes) carry it.
        self.register_buffer("cka_ema", torch.full((k,), 1.0 - p.initial_ratio))
        # Epoch sums of (CKA, reconstruction loss) per stage and the step count.
        self.stats = EpochStats({"cka": (k,), "recon": (k,), "steps": ()})
        # Plain attributes: hooks only, so the teacher stays out of the module tree.
        self._teacher_taps = Taps(teacher, [t for t, _ in self.stage_pairs])
        self._student_taps = Taps(student, [s for _, s in self.stage_pairs])
        for (t, s), patch in zip(self.stage_pairs, self.patch_sizes, strict=True):
            log.info(
                "dpk: student %s (%d ch) -> teacher %s (%d ch), token %dx%d",
                s.module,
                s.channels,
                t.module,
                t.channels,
                patch,
                patch,
            )

    @staticmethod
    def _dry_shapes(
        model: nn.Module, specs: list[TapSpec], input_shape: tuple[int, int, int]
    ) -> list[tuple[int, int, int]]:
        taps = Taps(model, specs)
        try:
            return taps.shapes(input_shape, device=_model_device(model))
        finally:
            taps.close()

    def ratios(self) -> Tensor:
        """π_k per distilled stage: 1 − EMA(CKA), clamped to [min_ratio, max_ratio]."""
        return (1.0 - self.cka_ema).clamp(self.params.min_ratio, self.params.max_ratio)

    def warmup_factor(self) -> float:
        return linear_ramp(self.epoch, self.params.warmup_epochs)

    def update_ratios(self, student_maps: list[Tensor], teacher_maps: list[Tensor]) -> Tensor:
        """Fold this batch's CKA per stage into the EMA (no grad, fp32); returns the batch CKAs (K,). A batch too small
        for CKA (1 sample; < 4 for the unbiased estimator) leaves π unchanged and returns the current EMA."""
        with torch.no_grad():
            batch, unbiased = student_maps[0].shape[0], self.params.cka_estimator == "unbiased"
            if batch < (4 if unbiased else 2):
                return self.cka_ema.clone()
            pairs = zip(student_maps, teacher_maps, strict=True)
            cka = torch.stack([linear_cka(s, t, unbiased=unbiased) for s, t in pairs])
            m = self.params.cka_momentum
            self.cka_ema.mul_(m).add_(cka.to(self.cka_ema), alpha=1.0 - m)
        return cka

    def stage_loss(self, k: int, student_map: Tensor, teacher_map: Tensor, ratio: Tensor | float) -> Tensor:
        """L_k for one stage: encode, mask, mix with the raw teacher map, generate, reconstruct."""
        size = (int(teacher_map.shape[-2]), int(teacher_map.shape[-1]))
        s_hat = self.encoders[k](resize_to(student_map, size))
        mask = random_token_mask(s_hat.shape[0], size, self.patch_sizes[k], ratio, s_hat.device)
        mixed = torch.where(mask, teacher_map.detach().to(s_hat.dtype), s_hat)
        return reconstruction_loss(self.generators[k](mixed), teacher_map, mask, self.params.reduction)

    def combine(
        self, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, recon: Tensor
    ) -> dict[str, Tensor]:
        """The total loss from logits and the per-stage reconstruction losses ``recon`` (K,), with the logged parts:
        ``w_ce·CE + λ_kd·τ²·KL + ramp(epoch)·λ_dpk·Σ_k L_k``."""
        p = self.params
        ce = F.cross_entropy(student_logits.float(), targets)
        kd = kd_loss(student_logits, teacher_logits, p.temperature) if p.kd_weight > 0 else ce.new_zeros(())
        dpk = recon.sum()
        loss = p.ce_weight * ce + p.kd_weight * kd + self.warmup_factor() * p.dpk_weight * dpk
        return {"loss": loss, "ce": ce.detach(), "kd": kd.detach(), "dpk": dpk.detach()}

    def training_step(self, images: Tensor, targets: Tensor) -> dict[str, Tensor]:
        t_logits, t_maps = self.teacher_features(self._teacher_taps, images)
        s_logits, s_maps = self._student_taps(images)
        ratios = self.ratios()  # π before this batch's CKA: the first step uses initial_ratio
        pairs = enumerate(zip(s_maps, t_maps, strict=True))
        recon = torch.stack([self.stage_loss(k, s, t, ratios[k]) for k, (s, t) in pairs])
        if self.training:
            cka = self.update_ratios(s_maps, t_maps)
            self.stats.add("cka", cka)
            self.stats.add("recon", recon)
            self.stats.add("steps", 1.0)
        out = self.combine(s_logits, t_logits, targets, recon)
        out["logits"] = s_logits.detach()
        return out

    def epoch_metrics(self) -> dict[str, float]:
        steps = max(float(self.stats.total("steps")), 1.0)
        out: dict[str, float] = {}
        for k, (pi, cka, recon) in enumerate(
            zip(
                self.ratios().tolist(),
                self.stats.total("cka").tolist(),
                self.stats.total("recon").tolist(),
                strict=True,
            )
        ):
            out.update({f"pi_{k}": pi, f"cka_{k}": cka / steps, f"recon_{k}": recon / steps})
        return out

    def deployable(self) -> nn.Module:
        return self.student
