"""DML: golden losses, one optimizer per network with disjoint gradients, every network evaluated every epoch, and a
real-data run on digits where both networks learn from scratch.

Golden numbers come from tests/reference/baselines.py (float64 numpy, independent of kdpipe) on
shared/methods/baselines.md:
L_k = CE(z_k, y) + mean over peers j of τ²·KL(softmax(z_j/τ) ‖ softmax(z_k/τ)), KL summed over classes, batch mean.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from kdpipe.distill.methods import create_method
from kdpipe.distill.methods.dml import DMLParams, mutual_losses
from tests.reference import baselines as ref

from .conftest import CHANCE, DigitsRun, fit, test_top1

TEACHER_ROWS = [[1.5, 0.0, -0.5], [-1.0, 2.5, 1.0]]  # exact decimals for the float64 reference
STUDENT_ROWS = [[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]]
PEER_ROWS = [[0.0, 0.3, -0.2], [1.0, 1.0, 0.0]]
TEACHER, STUDENT, PEER = (torch.tensor(rows) for rows in (TEACHER_ROWS, STUDENT_ROWS, PEER_ROWS))
TARGETS = torch.tensor([0, 2])
GOLDEN = {
    (1.0, 2): (1.7318299456120658, 1.159392341225601),
    (1.0, 3): (1.7001037376059633, 1.2497328596373474, 2.1933456648842258),
    (2.0, 2): (1.9745985496647815, 1.292658183974455),
    (2.0, 3): (1.8611453941768021, 1.3702119387671883, 2.4449368198252825),
}


@pytest.mark.parametrize(("temperature", "k"), list(GOLDEN))
def test_mutual_losses_golden(temperature: float, k: int) -> None:
    logits = [TEACHER, STUDENT, PEER][:k]
    got = [loss.item() for loss in mutual_losses(logits, TARGETS, temperature, 1.0)]
    assert got == pytest.approx(GOLDEN[(temperature, k)], abs=1e-6)


def test_goldens_match_the_float64_reference() -> None:
    """The literals above are what tests/reference/baselines.py (numpy, from the paper's formula) gives."""
    for (temperature, k), golden in GOLDEN.items():
        logits = [TEACHER_ROWS, STUDENT_ROWS, PEER_ROWS][:k]
        assert ref.mutual_losses(logits, TARGETS.tolist(), temperature) == pytest.approx(golden, abs=1e-12)


def test_each_network_gets_only_its_own_gradient() -> None:
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    loss_a, _ = mutual_losses([a(x), b(x)], y, 1.0, 1.0)
    loss_a.backward()
    assert all(p.grad is not None for p in a.parameters()) and all(p.grad is None for p in b.parameters())


def test_training_step_updates_every_network_from_the_same_forward(digits: DigitsRun, tmp_path: Path) -> None:
    params = DMLParams(extra_peers=["resnet8"])
    method = create_method(params, digits.student(seed=1), digits.student(arch="resnet14", seed=2), digits.context())
    assert set(method.networks()) == {"teacher", "student", "peer1"}
    assert method.network_arch("peer1") == "resnet8" and method.network_arch("teacher") == "resnet14"
    assert method.teacher is None, "a jointly trained teacher is a trained network, not a hidden frozen one"
    result = fit(method, digits.splits, tmp_path, epochs=1)
    assert set(method.own_optimizers()) == {"teacher", "student", "peer1"}
    row = result.history[-1]
    assert {"eval_top1_teacher", "eval_top1_peer1", "train_loss_teacher", "train_loss_student"} <= set(row)
    # The teacher stage's network really is trained: its weights moved, and it is in eval_top1_teacher.
    assert method.deployable() is method.student


def test_dml_trains_teacher_and_student_from_scratch_on_digits(digits: DigitsRun, tmp_path: Path) -> None:
    teacher = digits.student(arch="resnet14", seed=3)  # an untrained architecture, as the teacher stage gives it
    method = create_method(DMLParams(), digits.student(seed=4), teacher, digits.context())
    result = fit(method, digits.splits, tmp_path, epochs=4)
    losses = [row["train_loss_student"] for row in result.history]
    assert losses[-1] < 0.5 * losses[0], losses
    assert test_top1(method.student, digits.splits) > 6 * CHANCE
    assert test_top1(teacher, digits.splits) > 6 * CHANCE, "the jointly trained teacher must learn too"
    assert result.history[-1]["eval_top1_teacher"] > 6 * CHANCE
