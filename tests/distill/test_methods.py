"""Golden values and invariants of the baseline methods (ce, kd).

Golden numbers were computed once, independently of kdpipe, in float64 numpy from the formulas in
shared/methods/baselines.md: softmax with max-subtraction, KL(p_t || p_s) summed over classes, averaged over the
batch, times τ², and the CE weight 0.1 / KD weight 0.9 of the CRD/mdistiller convention.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdpipe.distill.methods import create_method
from kdpipe.distill.methods.ce import CEParams
from kdpipe.distill.methods.kd import KDParams, kd_loss
from kdpipe.registry import METHODS
from tests.reference import baselines as ref

STUDENT_ROWS = [[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]]  # exact decimals for the float64 reference
TEACHER_ROWS = [[1.5, 0.0, -0.5], [-1.0, 2.5, 1.0]]
STUDENT, TEACHER = torch.tensor(STUDENT_ROWS), torch.tensor(TEACHER_ROWS)
TARGETS = torch.tensor([0, 2])
GOLDEN_CE = 0.1754563805893112
GOLDEN_KL = {1.0: 0.9839359606362901, 4.0: 1.1132193410196323}  # τ² · KL, batch mean
GOLDEN_KD_TOTAL_T4 = 1.0194430449766003  # 0.1 · CE + 0.9 · τ²KL at τ = 4


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_loss_golden(temperature: float) -> None:
    assert kd_loss(STUDENT, TEACHER, temperature).item() == pytest.approx(GOLDEN_KL[temperature], abs=1e-6)


def test_kd_method_golden_total() -> None:
    method = create_method(KDParams(), nn.Linear(3, 3), nn.Linear(3, 3))
    out = method.loss(STUDENT, TEACHER, TARGETS)
    assert out["loss"].item() == pytest.approx(GOLDEN_KD_TOTAL_T4, abs=1e-6)
    assert out["ce"].item() == pytest.approx(GOLDEN_CE, abs=1e-6)
    assert out["kd"].item() == pytest.approx(GOLDEN_KL[4.0], abs=1e-6)


def test_kd_alpha_parametrisation() -> None:
    params = KDParams(alpha=0.7)
    assert (params.kd_weight, params.ce_weight) == pytest.approx((0.7, 0.3))
    with pytest.raises(ValueError, match="either alpha"):
        KDParams.model_validate({"alpha": 0.5, "ce_weight": 0.2})


def test_kd_loss_zero_when_student_equals_teacher() -> None:
    assert kd_loss(TEACHER, TEACHER, 4.0).item() == pytest.approx(0.0, abs=1e-7)


def test_ce_golden() -> None:
    out = create_method(CEParams(), nn.Linear(3, 3), None).loss(STUDENT, None, TARGETS)
    assert out["loss"].item() == pytest.approx(GOLDEN_CE, abs=1e-6)


def test_teacher_gets_no_gradient_and_stays_out_of_state() -> None:
    torch.manual_seed(0)
    student, teacher = (
        nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)),
        nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)),
    )
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    method = create_method(KDParams(), student, teacher).train()
    assert not teacher.training, "a frozen teacher must stay in eval mode (BN statistics)"
    out = method.training_step(torch.randn(16, 4), torch.randint(0, 3, (16,)))
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(not k.startswith("_teacher") for k in method.state_dict())
    assert {id(p) for p in method.parameters()} == {id(p) for p in student.parameters()}
    assert method.deployable() is student


def test_registered_methods_have_params_and_docstrings() -> None:
    for entry in METHODS:
        assert entry.obj.Params.model_fields["name"].default == entry.name
        assert entry.obj.__doc__ and entry.summary


def test_kd_requires_teacher() -> None:
    with pytest.raises(ValueError, match="needs a teacher"):
        create_method(KDParams(), nn.Linear(3, 3), None)


def test_goldens_are_the_float64_reference() -> None:
    """The literals above are what tests/reference/baselines.py (numpy, from the formulas) gives."""
    assert ref.cross_entropy(STUDENT_ROWS, TARGETS) == pytest.approx(GOLDEN_CE, abs=1e-12)
    for temperature, golden in GOLDEN_KL.items():
        assert ref.kd(STUDENT_ROWS, TEACHER_ROWS, temperature) == pytest.approx(golden, abs=1e-12)
    assert ref.kd_total(STUDENT_ROWS, TEACHER_ROWS, TARGETS) == pytest.approx(GOLDEN_KD_TOTAL_T4, abs=1e-12)
