"""DPK (dynamic prior knowledge): golden values of its loss pieces, CKA properties, masks, the π curriculum,
gradient routing, timm pairs, and a short real-data run on digits.

Golden numbers come from tests/reference/dpk.py (float64 numpy, independent of kdpipe and torch) on the exact
decimal rows below:

- CKA: the HSIC form of offline.md §1.2 step 9, ``HSIC(K, L) = tr(K H L H)/(B − 1)²`` with ``H = I − 11ᵀ/B``,
  ``K = X Xᵀ``, ``L = Y Yᵀ`` (no centring of the features, no scaling), CKA = HSIC(K, L)/sqrt(HSIC(K, K)·HSIC(L, L)).
- Unbiased CKA: Song et al.'s HSIC_1 on the uncentred Grams with zeroed diagonals, ``[tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1/((n−1)
  (n−2)) − 2/(n−2)·1ᵀK̃L̃1] / (n(n−3))``, normalised like the biased CKA.
- Reconstruction: ``(pred − target)²`` averaged over all 8 elements ("all"), or summed over the two positions where
  the mask is False and divided by 2 positions × 2 channels ("visible").
- Total: the CE (0.1754563805893112) and τ²·KL at τ = 4 (1.1132193410196323) of tests/distill/test_methods.py's
  logits, combined by the formula of offline.md §1.2 step 10 with the ramp (epoch + 1)/warmup.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import kdpipe  # noqa: F401  (registers the CIFAR nets with timm)
from kdpipe.distill.methods.base import MethodContext
from kdpipe.distill.methods.dpk import (
    DPK,
    DPKParams,
    linear_cka,
    random_token_mask,
    reconstruction_loss,
    teacher_token_count,
)
from kdpipe.distill.taps import TapError
from kdpipe.models.factory import create_model
from tests.reference import dpk as ref

X_ROWS = [[1.0, 2.0, 0.5], [0.0, -1.0, 1.5], [2.0, 0.5, -0.5], [-1.0, 1.0, 1.0]]  # exact decimals for the reference
Y_ROWS = [[0.3, 1.2], [1.0, -0.4], [-0.7, 0.9], [0.2, 0.1]]
X, Y = torch.tensor(X_ROWS), torch.tensor(Y_ROWS)
GOLDEN_CKA = 0.8191706175051088
X5_ROWS, Y5_ROWS = [*X_ROWS, [0.5, 0.5, 2.0]], [*Y_ROWS, [1.5, -1.0]]
X5, Y5 = torch.tensor(X5_ROWS), torch.tensor(Y5_ROWS)
GOLDEN_CKA_UNBIASED = 0.6498580707466278  # X5, Y5: 5 samples (the unbiased estimator needs B >= 4)

PRED = torch.tensor([[[[0.5, -1.0], [2.0, 0.0]], [[1.0, 1.0], [-0.5, 0.25]]]])
TARGET = torch.tensor([[[[0.0, -0.5], [1.0, 1.0]], [[2.0, 0.0], [0.5, 0.5]]]])
MASK = torch.tensor([[[[True, False], [False, True]]]])  # True: teacher-filled
GOLDEN_RECON = {"all": 0.6953125, "visible": 0.8125}
TOKEN_COUNTS = [(0.5, 16, 8), (0.05, 16, 1), (0.95, 16, 15), (0.3, 64, 19), (0.25, 2, 1), (0.0, 9, 0), (1.0, 9, 9)]

STUDENT_ROWS = [[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]]
TEACHER_ROWS = [[1.5, 0.0, -0.5], [-1.0, 2.5, 1.0]]
STUDENT_LOGITS, TEACHER_LOGITS = torch.tensor(STUDENT_ROWS), torch.tensor(TEACHER_ROWS)
TARGETS = torch.tensor([0, 2])
RECON_VALUES = [0.3, 0.7]
RECON = torch.tensor(RECON_VALUES)
GOLDEN_TOTAL_DEFAULT_EPOCH4 = 1.5386757216089435  # CE + τ²KL + (5/20)·1·(0.3 + 0.7)
GOLDEN_TOTAL_WEIGHTED_EPOCH30 = 5.31416687233392  # 0.5·CE + 2·τ²KL + 1·3·(0.3 + 0.7)

DIGITS = MethodContext(input_shape=(1, 16, 16), num_classes=10)


def digits_method(**params: object) -> DPK:
    """DPK on fresh resnet14 -> resnet8 digits nets (maps 16x16/8x8/4x4 with 16/32/64 channels)."""
    torch.manual_seed(0)
    teacher = create_model("resnet14", num_classes=10, in_chans=1)
    student = create_model("resnet8", num_classes=10, in_chans=1)
    return DPK(DPKParams.model_validate(params), student, teacher, DIGITS)


# -- golden values ------------------------------------------------------------------------------------------------


def test_linear_cka_golden() -> None:
    assert linear_cka(X, Y).item() == pytest.approx(GOLDEN_CKA, abs=1e-6)
    # Maps are flattened per sample: a (B, C, 1, 1) view gives the same number.
    assert linear_cka(X.view(4, 3, 1, 1), Y.view(4, 1, 2, 1)).item() == pytest.approx(GOLDEN_CKA, abs=1e-6)
    assert linear_cka(X5, Y5, unbiased=True).item() == pytest.approx(GOLDEN_CKA_UNBIASED, abs=1e-6)
    with pytest.raises(ValueError, match="at least 4 samples"):
        linear_cka(X[:3], Y[:3], unbiased=True)


@pytest.mark.parametrize("reduction", ["all", "visible"])
def test_reconstruction_loss_golden(reduction: str) -> None:
    got = reconstruction_loss(PRED, TARGET, MASK, reduction)  # type: ignore[arg-type]
    assert got.item() == pytest.approx(GOLDEN_RECON[reduction], abs=1e-7)


def test_total_loss_golden() -> None:
    method = digits_method()
    method.on_epoch_start(4, 100)  # ramp (4 + 1)/20
    out = method.combine(STUDENT_LOGITS, TEACHER_LOGITS, TARGETS, RECON)
    assert out["loss"].item() == pytest.approx(GOLDEN_TOTAL_DEFAULT_EPOCH4, abs=1e-6)
    assert out["dpk"].item() == pytest.approx(1.0, abs=1e-7)
    weighted = digits_method(ce_weight=0.5, kd_weight=2.0, dpk_weight=3.0)
    weighted.on_epoch_start(30, 100)  # past the ramp
    out = weighted.combine(STUDENT_LOGITS, TEACHER_LOGITS, TARGETS, RECON)
    assert out["loss"].item() == pytest.approx(GOLDEN_TOTAL_WEIGHTED_EPOCH30, abs=1e-6)


def test_goldens_match_the_float64_reference() -> None:
    """The literals above (and the token counts of test_teacher_token_count) are what tests/reference/dpk.py gives."""
    assert ref.linear_cka(X_ROWS, Y_ROWS) == pytest.approx(GOLDEN_CKA, abs=1e-12)
    assert ref.linear_cka(X5_ROWS, Y5_ROWS, unbiased=True) == pytest.approx(GOLDEN_CKA_UNBIASED, abs=1e-12)
    for reduction, golden in GOLDEN_RECON.items():
        want = ref.reconstruction_loss(PRED.double().numpy(), TARGET.double().numpy(), MASK.numpy(), reduction)
        assert want == pytest.approx(golden, abs=1e-12), reduction
    y = TARGETS.tolist()
    want = ref.total_loss(STUDENT_ROWS, TEACHER_ROWS, y, RECON_VALUES, epoch=4)
    assert want == pytest.approx(GOLDEN_TOTAL_DEFAULT_EPOCH4, abs=1e-12)
    want = ref.total_loss(
        STUDENT_ROWS, TEACHER_ROWS, y, RECON_VALUES, epoch=30, ce_weight=0.5, kd_weight=2.0, dpk_weight=3.0
    )
    assert want == pytest.approx(GOLDEN_TOTAL_WEIGHTED_EPOCH30, abs=1e-12)
    for ratio, n, count in TOKEN_COUNTS:
        assert ref.teacher_token_count(ratio, n) == count, (ratio, n)


# -- CKA properties -----------------------------------------------------------------------------------------------


def test_cka_invariances_and_channel_mismatch() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(32, 24, generator=g)
    b = a[:, :10] @ torch.randn(10, 10, generator=g) + 0.5 * torch.randn(32, 10, generator=g)
    base = linear_cka(a, b).item()
    assert 0.05 < base < 0.99  # a real, non-trivial similarity between 24- and 10-dim features
    assert linear_cka(a, a).item() == pytest.approx(1.0, abs=1e-6)
    assert linear_cka(7.5 * a, b).item() == pytest.approx(base, abs=1e-5)
    assert linear_cka(a, 1e-3 * b).item() == pytest.approx(base, abs=1e-5)
    q, _ = torch.linalg.qr(torch.randn(24, 24, generator=g))
    assert linear_cka(a @ q, b).item() == pytest.approx(base, abs=1e-5)
    # Symmetric, and unrelated features score far lower than related ones.
    assert linear_cka(b, a).item() == pytest.approx(base, abs=1e-6)
    assert linear_cka(torch.randn(256, 24, generator=g), torch.randn(256, 10, generator=g)).item() < 0.3


def test_biased_cka_saturates_on_wide_noise_and_unbiased_does_not() -> None:
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(32, 16, 16, 16, generator=g), torch.randn(32, 64, 8, 8, generator=g)
    assert linear_cka(a, b).item() > 0.95  # independent features, yet near 1: the biased estimator at D >> B
    assert abs(linear_cka(a, b, unbiased=True).item()) < 0.05
    assert linear_cka(a, 3.0 * a, unbiased=True).item() == pytest.approx(1.0, abs=1e-5)


def test_cka_is_fp32_without_grad_under_bf16_and_autocast() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(16, 3, 4, 4, generator=g), torch.randn(16, 5, 2, 2, generator=g)
    ref = linear_cka(a, b).item()
    low = linear_cka(a.bfloat16(), b.bfloat16())
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(ref, abs=2e-2)
    a.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = linear_cka(a * 1.0, b)
    assert auto.dtype == torch.float32 and not auto.requires_grad
    assert auto.item() == pytest.approx(ref, abs=1e-6)
    # Huge activations do not overflow, constant features give 0 instead of nan.
    assert linear_cka(a.detach() * 1e18, b).item() == pytest.approx(ref, abs=1e-5)
    assert linear_cka(torch.ones(8, 4), torch.randn(8, 4)).item() == 0.0


# -- masks and the ratio ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("ratio", "n", "count"), TOKEN_COUNTS)
def test_teacher_token_count(ratio: float, n: int, count: int) -> None:
    assert int(teacher_token_count(ratio, n)) == count


@pytest.mark.parametrize(("size", "patch", "ratio"), [((8, 8), 1, 0.3), ((32, 32), 2, 0.5), ((4, 6), 1, 0.95)])
def test_mask_exact_count_per_sample_and_random(size: tuple[int, int], patch: int, ratio: float) -> None:
    torch.manual_seed(0)
    mask = random_token_mask(16, size, patch, torch.tensor(ratio))
    assert mask.shape == (16, 1, *size) and mask.dtype == torch.bool
    n = (size[0] // patch) * (size[1] // patch)
    expected = int(teacher_token_count(ratio, n)) * patch * patch
    assert mask.flatten(1).sum(1).tolist() == [expected] * 16
    # Per-sample draws (a shared mask would give 1); at 23 of 24 tokens only 24 masks exist, so allow repeats.
    assert len({tuple(m.flatten().tolist()) for m in mask}) >= 8, "every sample draws its own mask"
    if patch > 1:  # whole p×p tokens are teacher or student
        blocks = mask.float().unfold(2, patch, patch).unfold(3, patch, patch)
        assert torch.all(blocks.amin((-1, -2)) == blocks.amax((-1, -2)))


def test_ratio_falls_as_cka_rises_and_stays_clamped() -> None:
    method = digits_method()
    assert method.ratios().tolist() == pytest.approx([0.5] * 3)
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(32, c, s, s, generator=g) for c, s in [(16, 16), (32, 8), (64, 4)]]
    trace = []
    for _ in range(60):  # CKA = 1: the student matches the teacher, so less prior knowledge
        method.update_ratios(maps, [2.0 * m for m in maps])
        trace.append(method.ratios().tolist())
    assert all(b[k] <= a[k] for a, b in itertools.pairwise(trace) for k in range(3))
    assert trace[0] == pytest.approx([0.45] * 3, abs=1e-6)  # 1 − (0.9·0.5 + 0.1·1)
    assert trace[-1] == pytest.approx([0.05] * 3)  # clamped
    # CKA ≈ 0: a large gap, so more prior knowledge. Low-dimensional features on a large batch: the biased linear
    # CKA of independent noise is near 1 when C·H·W >> B (Gram matrices near-isotropic), so not those.
    student = [torch.randn(512, 4, generator=g) for _ in range(3)]
    for _ in range(60):
        cka = method.update_ratios(student, [torch.randn(512, 6, generator=g) for _ in range(3)])
        assert cka.max().item() < 0.1
    pis = method.ratios()
    assert torch.all(pis > 0.5) and torch.all(pis <= 0.95)


# -- gradients, teacher hygiene, deployable -----------------------------------------------------------------------


@pytest.mark.parametrize(("generator", "reduction"), [("vit", "visible"), ("conv", "visible"), ("vit", "all")])
def test_student_feature_gets_no_gradient_at_teacher_positions(generator: str, reduction: str) -> None:
    method = digits_method(generator=generator, reduction=reduction)
    method.encoders[0].eval()  # BN batch statistics would couple positions; eval isolates the mixing
    student_map = torch.randn(4, 16, 16, 16, requires_grad=True)
    teacher_map = torch.randn(4, 16, 16, 16)
    torch.manual_seed(3)
    loss = method.stage_loss(0, student_map, teacher_map, 0.5)
    torch.manual_seed(3)  # the mask is the only random draw of stage_loss: draw it again
    mask = random_token_mask(4, (16, 16), 1, 0.5).expand(-1, 16, -1, -1)
    loss.backward()
    grad = student_map.grad
    assert grad is not None
    assert torch.count_nonzero(grad[mask]) == 0, "teacher-filled positions must not pass gradient to the student"
    assert (grad[~mask] != 0).float().mean() > 0.9


def test_teacher_frozen_adapters_optimized_and_deployable_plain() -> None:
    method = digits_method().train()
    teacher = method.teacher
    assert teacher is not None and not teacher.training
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    method.on_epoch_start(0, 2)
    out = method.training_step(torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,)))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items()), "teacher BN stats moved"
    optimized = {id(p) for p in method.optimized_parameters()}
    for part in (method.encoders, method.generators):
        assert part.parameters() and all(id(p) in optimized for p in part.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert {k.split(".")[0] for k in method.state_dict()} == {"student", "encoders", "generators", "cka_ema", "stats"}
    deploy = method.deployable()
    assert deploy is method.student
    assert set(deploy.state_dict()) == set(create_model("resnet8", num_classes=10, in_chans=1).state_dict())


def test_cka_ema_is_checkpointed() -> None:
    method = digits_method().train()
    method.on_epoch_start(0, 1)
    for _ in range(3):
        method.training_step(torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,)))
    state = method.state_dict()
    fresh = digits_method()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.ratios(), method.ratios()) and not torch.equal(fresh.ratios(), torch.full((3,), 0.5))


# -- timm pairs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("teacher_name", "teacher_kw", "student_name", "student_kw", "size", "generator", "stages"),
    [
        ("resnet18", {}, "mobilenetv3_small_050", {}, 32, "vit", 2),  # 8x8 and 4x4 teacher maps survive min_spatial
        ("vit_tiny_patch16_224", {"img_size": 64}, "resnet18", {}, 64, "vit", 4),  # ViT teacher, 4x4 token grid
        ("resnet18", {}, "mobilenetv3_small_050", {}, 80, "conv", 3),  # 20x20 layer1 map: 2x2 tokens; 3x3 dropped
    ],
)
def test_timm_pairs_one_step(
    teacher_name: str,
    teacher_kw: dict[str, object],
    student_name: str,
    student_kw: dict[str, object],
    size: int,
    generator: str,
    stages: int,
) -> None:
    torch.manual_seed(0)
    teacher = timm.create_model(teacher_name, pretrained=False, num_classes=10, **teacher_kw)
    student = timm.create_model(student_name, pretrained=False, num_classes=10, **student_kw)
    context = MethodContext(input_shape=(3, size, size), num_classes=10)
    method = DPK(DPKParams(generator=generator), student, teacher, context).train()  # type: ignore[arg-type]
    assert len(method.stage_pairs) == stages
    for (t, s), enc in zip(method.stage_pairs, method.encoders, strict=True):
        assert (enc[0].in_channels, enc[0].out_channels) == (s.channels, t.channels)
    if size == 80:
        assert method.patch_sizes == [2, 1, 1]
    method.on_epoch_start(0, 1)
    out = method.training_step(torch.randn(4, 3, size, size), torch.randint(0, 10, (4,)))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["dpk"] > 0
    assert all(p.grad is not None for p in method.generators.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_no_stage_large_enough_is_a_clear_error() -> None:
    teacher, student = (timm.create_model("resnet18", pretrained=False, num_classes=10) for _ in range(2))
    with pytest.raises(TapError, match="lower min_spatial"):
        DPK(DPKParams(min_spatial=16), student, teacher, MethodContext(input_shape=(3, 32, 32), num_classes=10))


def test_registered_and_params_validated() -> None:
    from kdpipe.registry import METHODS

    assert METHODS.get("dpk") is DPK
    with pytest.raises(ValueError, match="min_ratio <= initial_ratio"):
        DPKParams(initial_ratio=0.99)
    with pytest.raises(ValueError, match="does not divide"):
        digits_method(patch_size=3)
    assert isinstance(digits_method(generator="conv").generators[0], nn.Sequential)


# -- real data ----------------------------------------------------------------------------------------------------


def test_digits_run_learns_and_logs_ratios(digits: object, tmp_path: Path) -> None:
    t0 = time.perf_counter()
    # 2x2 tokens keep the ViT generator's attention cheap on CPU (64 tokens at 16x16 instead of 256).
    params = DPKParams(warmup_epochs=1, patch_size=2)
    _, result = digits.train(params, epochs=3, tmp_path=tmp_path)  # type: ignore[attr-defined]
    seconds = time.perf_counter() - t0
    rows = result.history
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["eval_top1"] > 0.6, rows[-1]
    for k in range(3):  # the student closes the gap, so the teacher share falls (pitfall 2)
        assert rows[-1][f"pi_{k}"] < rows[0][f"pi_{k}"] < 0.5
    for row in rows:
        for k in range(3):
            assert 0.05 <= row[f"pi_{k}"] <= 0.95 and row[f"recon_{k}"] > 0 and 0 <= row[f"cka_{k}"] <= 1
    print(f"dpk digits: {seconds:.1f}s", [{k: round(v, 3) for k, v in r.items()} for r in rows])
