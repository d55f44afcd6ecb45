"""The training step of every offline method optimises its paper's loss on the real teacher's outputs.

On a fixed batch of real digits, with the session's trained resnet14 teacher (its logits are far from uniform), the
loss a method's ``training_step`` returns, the one the trainer backpropagates, equals the float64 reference of its
formula (tests/reference/) evaluated on the student's logits and the teacher's logits from a separate, plain forward.
A training step that hands the loss a zeroed, detached-wrong, stale or swapped teacher output, or that drops or
reweights a term, fails here even where the method's ``loss`` on given tensors is right (the golden tests).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from kdpipe.data import BatchLoader
from kdpipe.distill.methods import KDMethod, create_method
from kdpipe.distill.methods.dkd import DKDParams
from kdpipe.distill.methods.dpk import DPKParams
from kdpipe.distill.methods.fusion_ratio import FusionRatioParams
from kdpipe.distill.methods.iakd import IAKDParams
from kdpipe.distill.methods.kd import KDParams
from kdpipe.registry import METHODS
from tests.reference import baselines as ref

from .conftest import DigitsRun

BATCH = 32
# Reference and float32 torch agree to ~1e-6 relative on these magnitudes; a wrong teacher moves the loss by > 1e-2.
TOL = 1e-5


@pytest.fixture(scope="module")
def batch(digits: DigitsRun) -> tuple[Tensor, Tensor]:
    """The first BATCH training images (eval transforms: no augmentation) and their labels."""
    splits = digits.splits
    loader = BatchLoader(splits.train, batch_size=BATCH, train=False, mean=splits.mean, std=splits.std)
    images, targets = next(iter(loader))
    return images, targets


def _teacher_logits(digits: DigitsRun, images: Tensor) -> np.ndarray:
    with torch.no_grad():
        out = digits.teacher.eval()(images)
    return out.double().numpy()


def _step(method: KDMethod, images: Tensor, targets: Tensor, epoch: int = 0, epochs: int = 1) -> dict[str, Tensor]:
    method.train()
    method.on_epoch_start(epoch, epochs)
    method.lr = 0.05
    torch.manual_seed(0)
    return method.training_step(images, targets)


def _student_logits(method: KDMethod, images: Tensor) -> np.ndarray:
    """The student's logits in the mode the training step ran it (train: batch statistics; the running statistics
    that forward moves do not change train-mode outputs)."""
    with torch.no_grad():
        out = method.student.train()(images)
    return out.double().numpy()


def test_teacher_is_non_trivial(digits: DigitsRun, batch: tuple[Tensor, Tensor]) -> None:
    """A zeroed teacher gives uniform targets; this one must be confident and right, or the tests below are weak."""
    images, targets = batch
    p = ref.softmax(_teacher_logits(digits, images))
    assert (p.argmax(1) == targets.numpy()).mean() > 0.9 and p.max(1).mean() > 0.5


def test_kd_training_step_is_the_reference_loss(digits: DigitsRun, batch: tuple[Tensor, Tensor]) -> None:
    images, targets = batch
    method = create_method(KDParams(), digits.student(), digits.teacher, digits.context())
    out = _step(method, images, targets)
    s, t = _student_logits(method, images), _teacher_logits(digits, images)
    assert out["loss"].item() == pytest.approx(ref.kd_total(s, t, targets, 4.0, 0.1, 0.9), rel=TOL)
    zero_teacher = ref.kd_total(s, np.zeros_like(t), targets, 4.0, 0.1, 0.9)
    assert abs(out["loss"].item() - zero_teacher) > 1e-2, "the check cannot tell the real teacher from a zeroed one"


def test_dkd_training_step_is_the_reference_loss(digits: DigitsRun, batch: tuple[Tensor, Tensor]) -> None:
    images, targets = batch
    params = DKDParams(alpha=1.0, beta=8.0, temperature=4.0, warmup_epochs=20)
    method = create_method(params, digits.student(), digits.teacher, digits.context())
    out = _step(method, images, targets, epoch=4, epochs=240)  # the 5th epoch: warm-up factor 5/20
    s, t = _student_logits(method, images), _teacher_logits(digits, images)
    expected = ref.dkd_total(s, t, targets, temperature=4.0, alpha=1.0, beta=8.0, warmup=5 / 20)
    assert out["loss"].item() == pytest.approx(expected, rel=TOL)


def test_fusion_ratio_training_step_is_the_reference_loss(digits: DigitsRun, batch: tuple[Tensor, Tensor]) -> None:
    """α comes from the ratio network after this step's meta update (the paper's order); the fused loss on the real
    teacher's logits with that α is what is optimised."""
    images, targets = batch
    method = create_method(FusionRatioParams(), digits.student(), digits.teacher, digits.context())
    out = _step(method, images, targets)
    s_logits = method.student.train()(images).detach()
    t_logits = digits.teacher.eval()(images).detach()
    with torch.no_grad():
        alpha = method.ratio(s_logits, t_logits, targets).double().numpy()
    assert alpha.min() > 0.0 and alpha.max() < 1.0
    s, t = s_logits.double().numpy(), t_logits.double().numpy()
    assert out["loss"].item() == pytest.approx(ref.fused_total(s, t, targets, alpha, 4.0), rel=TOL)


def test_dpk_training_step_terms(digits: DigitsRun, batch: tuple[Tensor, Tensor]) -> None:
    """DPK: its logit terms are CE and τ²·KL against the real teacher, and the total is w_ce·CE + λ_kd·KD +
    ramp·λ_dpk·Σ L_k (the reconstruction part is checked by tests/distill/test_dpk.py)."""
    images, targets = batch
    params = DPKParams(ce_weight=1.0, kd_weight=0.5, dpk_weight=0.25, warmup_epochs=10)
    method = create_method(params, digits.student(), digits.teacher, digits.context())
    out = _step(method, images, targets, epoch=1, epochs=20)  # ramp 2/10
    s, t = _student_logits(method, images), _teacher_logits(digits, images)
    assert out["ce"].item() == pytest.approx(ref.cross_entropy(s, targets), rel=TOL)
    assert out["kd"].item() == pytest.approx(ref.kd(s, t, 4.0), rel=TOL)
    expected = 1.0 * out["ce"].item() + 0.5 * out["kd"].item() + 2 / 10 * 0.25 * out["dpk"].item()
    assert out["dpk"].item() > 0 and out["loss"].item() == pytest.approx(expected, rel=TOL)


def test_iakd_training_step_without_swaps_is_the_reference_loss(
    digits: DigitsRun, batch: tuple[Tensor, Tensor]
) -> None:
    """With no stage swapped the hybrid network is the student: the loss is w_ce·CE + w_kd·τ²·KL on the real teacher
    (swapped forwards are checked by tests/distill/test_iakd.py)."""
    images, targets = batch
    params = IAKDParams(p0=0.0, ce_weight=1.0, kd_weight=0.7)
    method = create_method(params, digits.student(), digits.teacher, digits.context())
    out = _step(method, images, targets)
    s, t = _student_logits(method, images), _teacher_logits(digits, images)
    assert out["loss"].item() == pytest.approx(ref.kd_total(s, t, targets, 4.0, 1.0, 0.7), rel=TOL)


def test_every_offline_method_is_pinned() -> None:
    """A newly registered method with a frozen teacher gets a test here."""
    frozen = {entry.name for entry in METHODS if entry.obj.teacher_role == "frozen"}
    assert frozen == {"kd", "dkd", "fusion_ratio", "dpk", "iakd"}


def test_student_gradient_flows_from_the_teacher_term(digits: DigitsRun, batch: tuple[Tensor, Tensor]) -> None:
    """KD with w_ce = 0: the whole gradient comes from the teacher term, so it is non-zero and changes with the
    teacher (a detached student or a constant teacher would give zero or the same gradient)."""
    images, targets = batch

    def grad_norm(teacher: nn.Module) -> float:
        torch.manual_seed(0)
        method = create_method(KDParams(ce_weight=0.0, kd_weight=1.0), digits.student(), teacher, digits.context())
        _step(method, images, targets)["loss"].backward()
        return float(sum(p.grad.norm() ** 2 for p in method.student.parameters() if p.grad is not None) ** 0.5)

    other = digits.student(arch="resnet14", seed=1)  # an untrained network of the teacher's architecture
    real, untrained = grad_norm(digits.teacher), grad_norm(other)
    assert real > 0 and abs(real - untrained) / real > 0.05
