"""DKD: golden values, the paper's decomposition identity, warm-up, fp32 under low precision, and a real-data run.

Golden numbers come from tests/reference/baselines.py (float64 numpy, independent of kdpipe) on shared/methods/baselines.md:
softmax with max-subtraction; TCKD = KL over [p_y, 1 - p_y]; NCKD = KL over a softmax of the non-target logits
(the target entry removed, not masked); batch means; total = CE + min(epoch/warmup, 1) · τ² · (α·TCKD + β·NCKD).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdpipe.distill.methods import create_method
from kdpipe.distill.methods.dkd import DKDParams, dkd_parts
from kdpipe.distill.methods.kd import KDParams
from tests.reference import baselines as ref

from .conftest import CHANCE, DigitsRun, test_top1

STUDENT_ROWS = [[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]]  # exact decimals for the float64 reference
TEACHER_ROWS = [[1.5, 0.0, -0.5], [-1.0, 2.5, 1.0]]
STUDENT, TEACHER = torch.tensor(STUDENT_ROWS), torch.tensor(TEACHER_ROWS)
TARGETS = torch.tensor([0, 2])
GOLDEN_PARTS = {1.0: (0.7099768408123152, 0.49361980672634687), 4.0: (0.033122508451087274, 0.056663455845739064)}
GOLDEN_TOTAL_T4 = 7.958338864061307  # after warm-up: CE + 16 · (TCKD + 8 · NCKD)
GOLDEN_TOTAL_T4_FIRST_EPOCH = 0.564600504762911  # epoch 1 of a 20-epoch warm-up: CE + 16/20 · (TCKD + 8 · NCKD)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_parts_golden(temperature: float) -> None:
    tckd, nckd = dkd_parts(STUDENT, TEACHER, TARGETS, temperature)
    assert (tckd.item(), nckd.item()) == pytest.approx(GOLDEN_PARTS[temperature], abs=1e-6)


def test_dkd_total_golden_and_warmup() -> None:
    method = create_method(DKDParams(), nn.Linear(3, 3), nn.Linear(3, 3))
    method.on_epoch_start(0, 240)
    assert method.loss(STUDENT, TEACHER, TARGETS)["loss"].item() == pytest.approx(GOLDEN_TOTAL_T4_FIRST_EPOCH, abs=1e-6)
    method.on_epoch_start(19, 240)  # the 20th epoch: warm-up complete
    out = method.loss(STUDENT, TEACHER, TARGETS)
    assert out["loss"].item() == pytest.approx(GOLDEN_TOTAL_T4, abs=1e-5)
    assert set(out) >= {"ce", "tckd", "nckd", "kd"}


def test_kl_decomposes_into_tckd_and_weighted_nckd() -> None:
    """The paper's Eq. 1: KL(p_t ‖ p_s) = TCKD + (1 − p_t,y) · NCKD, sample by sample."""
    torch.manual_seed(0)
    s, t, y = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64), torch.randint(0, 7, (5,))
    for i in range(5):
        tckd, nckd = dkd_parts(s[i : i + 1], t[i : i + 1], y[i : i + 1], 1.0)
        kl = F.kl_div(F.log_softmax(s[i : i + 1], 1), F.log_softmax(t[i : i + 1], 1), reduction="sum", log_target=True)
        p_ty = F.softmax(t[i], 0)[y[i]]
        assert kl.item() == pytest.approx((tckd + (1 - p_ty) * nckd).item(), rel=1e-5)


def test_dkd_is_fp32_and_finite_under_bf16_logits() -> None:
    s, t = (STUDENT * 30).bfloat16(), (TEACHER * 30).bfloat16()
    tckd, nckd = dkd_parts(s, t, TARGETS, 1.0)
    assert tckd.dtype == nckd.dtype == torch.float32
    assert torch.isfinite(tckd) and torch.isfinite(nckd)


def test_dkd_gradient_reaches_only_the_student() -> None:
    student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
    method = create_method(DKDParams(warmup_epochs=0), student, teacher).train()
    method.training_step(torch.randn(8, 4), torch.randint(0, 3, (8,)))["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_dkd_trains_on_digits(digits: DigitsRun, tmp_path) -> None:
    method, result = digits.train(DKDParams(warmup_epochs=2), epochs=4, tmp_path=tmp_path)
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < 0.5 * max(losses), losses
    top1 = test_top1(method.deployable(), digits.splits)
    assert top1 > 6 * CHANCE, f"dkd student test top-1 {top1:.3f}"
    # The same budget with plain KD lands in the same range: DKD is not broken relative to its baseline.
    kd_method, _ = digits.train(KDParams(), epochs=4, tmp_path=tmp_path / "kd")
    assert top1 > test_top1(kd_method.deployable(), digits.splits) - 0.1


def test_goldens_are_the_float64_reference() -> None:
    """The literals above are what tests/reference/baselines.py (numpy, from the paper's formulas) gives."""
    for temperature, golden in GOLDEN_PARTS.items():
        assert ref.dkd_parts(STUDENT_ROWS, TEACHER_ROWS, TARGETS, temperature) == pytest.approx(golden, abs=1e-12)
    assert ref.dkd_total(STUDENT_ROWS, TEACHER_ROWS, TARGETS) == pytest.approx(GOLDEN_TOTAL_T4, abs=1e-12)
    assert ref.dkd_total(STUDENT_ROWS, TEACHER_ROWS, TARGETS, warmup=1 / 20) == pytest.approx(
        GOLDEN_TOTAL_T4_FIRST_EPOCH, abs=1e-12
    )
