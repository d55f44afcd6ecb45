"""The trainer owns loss scaling, gradient averaging and the schedule; a method reaches them through the
StepControl the trainer binds (kdpipe.distill.step), never through attributes the trainer writes into it."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from kdpipe.distill.methods import create_method
from kdpipe.distill.methods.ce import CEParams
from kdpipe.distill.methods.dml import DMLParams
from kdpipe.distill.step import StepControl
from tests.distill.conftest import DigitsRun, fit, loaders


class Recording(StepControl):
    """A StepControl that records what went through it."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.applied = 0
        self.averaged = 0

    def apply(self, loss: Tensor, optimizer: torch.optim.Optimizer) -> None:
        self.applied += 1
        super().apply(loss, optimizer)

    def average(self, params: object) -> None:
        self.averaged += 1
        super().average(params)  # type: ignore[arg-type]


def test_apply_is_a_plain_optimizer_step_without_a_scaler() -> None:
    torch.manual_seed(0)
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 3)
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    StepControl().apply(a(x).square().mean(), opt_a)
    opt_b.zero_grad()
    b(x).square().mean().backward()
    opt_b.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_an_online_method_steps_every_network_through_the_bound_control(digits: DigitsRun) -> None:
    method = create_method(DMLParams(), digits.student(), digits.student(seed=1), digits.context())
    control = Recording()
    method.bind(control)
    assert set(method.own_optimizers()) == {"teacher", "student"}  # built plainly from its specs, unbound
    images, targets = next(iter(loaders(digits.splits, 32)[0]))
    method.training_step(images, targets)
    assert control.applied == 2 and control.averaged == 2  # teacher and student, each averaged before its step


def test_the_trainer_binds_its_control_and_sets_the_schedule_in_it(digits: DigitsRun, tmp_path: Path) -> None:
    method = create_method(CEParams(), digits.student(), None, digits.context())
    seen: list[tuple[int, float]] = []
    original = method.on_epoch_start

    def record(epoch: int, epochs: int) -> None:
        original(epoch, epochs)
        seen.append((method.epoch, method.lr))

    method.on_epoch_start = record  # type: ignore[method-assign]
    result = fit(method, digits.splits, tmp_path, epochs=2, lr=0.05)
    assert method.step_control.scaler is not None  # the trainer's own (disabled on CPU)
    assert [e for e, _ in seen] == [0, 1]
    assert [lr for _, lr in seen] == [row["lr"] for row in result.history] and seen[0][1] == 0.05 > seen[1][1]


def test_the_trainer_builds_the_declared_optimizers_on_its_schedule(digits: DigitsRun, tmp_path: Path) -> None:
    """A method declares its optimizers (optimizer_specs); the trainer builds them with the stage's settings and
    schedule and hands them back. fusion_ratio's controller is declared unscheduled: its lr stays fixed."""
    from kdpipe.distill.methods.fusion_ratio import FusionRatioParams

    dml = create_method(DMLParams(), digits.student(), digits.student(seed=1), digits.context())
    history = fit(dml, digits.splits, tmp_path / "dml", epochs=2, lr=0.05).history
    opts = dml.own_optimizers()
    assert dml.step_control.bound and set(opts) == {"teacher", "student"}
    assert all(isinstance(o, torch.optim.SGD) for o in opts.values())  # the stage's optimizer, not a default
    assert all(g["lr"] == history[-1]["lr"] < 0.05 for o in opts.values() for g in o.param_groups)  # scheduled

    fr = create_method(FusionRatioParams(controller_lr=1e-3), digits.student(), digits.teacher, digits.context())
    fit(fr, digits.splits, tmp_path / "fr", epochs=2, lr=0.05)
    controller = fr.optimizer("controller")
    assert isinstance(controller, torch.optim.Adam) and controller.param_groups[0]["lr"] == 1e-3  # fixed
    assert "base_lr" not in controller.param_groups[0]
    assert not {id(p) for p in fr.controller.parameters()} & {id(p) for p in fr.optimized_parameters()}
