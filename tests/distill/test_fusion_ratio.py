"""TGeo-KD (``fusion_ratio``): golden values, the hypergradient, invariants, and a short real-data run.

Golden numbers were computed once, independently of kdpipe, by a float64 numpy script from the formulas of
shared/methods/offline.md §3 (softmax with max-subtraction; Δ = [G−S, G−T, T−S, G−T̄_y, T̄_y−S, S, T, T̄_y, G] at
τ = 1; KD_i = τ²·Σ_j p_t^τ·(log p_t^τ − log p_s^τ); CE_i = −log S_y; L = mean_i[α_i·KD_i + (1 − α_i)·CE_i]), the
same arithmetic as ``_np_softmax`` / ``_np_features`` below, and pasted here rounded to 15 decimals.

The finite-difference check of the hypergradient uses a second independent path: for a linear student the inner
gradient has the closed form dL/dz_i = [α_i·τ·(p_s^τ − p_t^τ)_i + (1 − α_i)·(S − G)_i] / N, so θ' and the outer CE
are computed in numpy without autograd, and dL_out/dω is estimated by central differences on every entry of ω.

The finite-difference hypergradient (DARTS' Hessian-vector product, ``hypergradient="finite_difference"``) is checked
against the exact one on a resnet8 at 32x32 on a real digits batch, with tolerances from the measurements in the
module docstring of kdpipe.distill.methods.fusion_ratio, and on a timm MobileNetV3 student, which has no double
backward (Hardswish/Hardsigmoid), so "auto" must pick it there.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kdpipe.distill.methods._hypergradient as hypergradient_module
from kdpipe.distill.methods import MethodContext
from kdpipe.distill.methods.fusion_ratio import (
    FusionRatioKD,
    FusionRatioParams,
    fused_loss,
    per_sample_losses,
    relation_features,
)
from kdpipe.models.factory import create_model
from tests.distill.conftest import CHANCE, DigitsRun, test_top1

STUDENT = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]], dtype=torch.float64)
TEACHER = torch.tensor([[1.5, 0.0, -0.5], [-1.0, 2.5, 1.0]], dtype=torch.float64)
TARGETS = torch.tensor([0, 2])
CLASS_MEAN = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]], dtype=torch.float64)
ALPHA = torch.tensor([0.25, 0.8], dtype=torch.float64)
# fmt: off
GOLDEN_DELTA = [
    [0.214402965410724, -0.039112573270687, -0.175290392140037, 0.263875275687406, -0.164251627625088,
     -0.099623648062318, -0.049472310276682, 0.1251390543544, -0.075666744077718, 0.3, -0.2, -0.1,
     -0.085597034589276, 0.160887426729313, -0.075290392140037, 0.785597034589276, 0.039112573270687,
     0.175290392140037, 0.736124724312594, 0.164251627625088, 0.099623648062318, 0.7, 0.2, 0.1, 1.0, 0.0, 0.0],
    [-0.049311327158276, -0.054497444707041, 0.103808771865318, -0.024093768286848, -0.797876026206992,
     0.821969794493841, -0.025217558871428, 0.743378581499951, -0.718161022628524, -0.2, -0.2, 0.4,
     0.150688672841724, 0.145502555292959, -0.296191228134682, 0.049311327158276, 0.054497444707041,
     0.896191228134682, 0.024093768286848, 0.797876026206992, 0.178030205506159, 0.2, 0.2, 0.6, 0.0, 0.0, 1.0],
]
# fmt: on
GOLDEN_KD_T4 = [0.30460573145858394, 1.9218329505806806]  # τ² · KL per sample at τ = 4
GOLDEN_CE = [0.24131129665715703, 0.10960146452146537]
GOLDEN_LOSS = 0.9082607793631757  # mean(α·KD + (1 − α)·CE) with α = ALPHA


# -- golden values ----------------------------------------------------------------------------------------------


def test_relation_features_golden() -> None:
    delta = relation_features(torch.softmax(STUDENT, 1), torch.softmax(TEACHER, 1), TARGETS, CLASS_MEAN)
    assert delta.shape == (2, 27)
    np.testing.assert_allclose(delta.numpy(), np.array(GOLDEN_DELTA), atol=1e-12)


def test_per_sample_and_fused_loss_golden() -> None:
    kd, ce = per_sample_losses(STUDENT, TEACHER, TARGETS, 4.0)
    np.testing.assert_allclose(kd.numpy(), GOLDEN_KD_T4, rtol=1e-12)
    np.testing.assert_allclose(ce.numpy(), GOLDEN_CE, rtol=1e-12)
    assert fused_loss(kd, ce, ALPHA).item() == pytest.approx(GOLDEN_LOSS, rel=1e-12)
    # fp32 logits (the training path) agree to fp32 precision
    kd32, ce32 = per_sample_losses(STUDENT.float(), TEACHER.float(), TARGETS, 4.0)
    assert fused_loss(kd32, ce32, ALPHA.float()).item() == pytest.approx(GOLDEN_LOSS, rel=1e-6)


# -- the hypergradient on a linear student, against numpy finite differences ------------------------------------

D, C, H, N = 4, 3, 5, 6


def _np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _np_features(s: np.ndarray, t: np.ndarray, y: np.ndarray, class_mean: np.ndarray) -> np.ndarray:
    g, tb = np.eye(s.shape[1])[y], class_mean[y]
    return np.concatenate([g - s, g - t, t - s, g - tb, tb - s, s, t, tb, g], 1)


def _np_outer_loss(omega: list[np.ndarray], problem: dict[str, np.ndarray], lr: float, tau: float) -> float:
    """L_out(ω) = CE(f_θ'(x_v), y_v), θ' = θ − η·∇_θ L_in(θ, ω), for a linear student, all in numpy float64."""
    w1, b1, w2, b2 = omega
    x, y, w, b, zt = problem["x"], problem["y"], problem["w"], problem["b"], problem["zt"]
    zs = x @ w.T + b
    s, t, g = _np_softmax(zs), _np_softmax(zt), np.eye(C)[y]
    alpha = 1.0 / (1.0 + np.exp(-(np.maximum(_np_features(s, t, y, problem["class_mean"]) @ w1.T + b1, 0) @ w2.T + b2)))
    dz = (alpha * tau * (_np_softmax(zs / tau) - _np_softmax(zt / tau)) + (1 - alpha) * (s - g)) / len(x)
    w_new, b_new = w - lr * dz.T @ x, b - lr * dz.sum(0)
    zv = problem["xv"] @ w_new.T + b_new
    return float(-np.log(_np_softmax(zv)[np.arange(len(zv)), problem["yv"]]).mean())


def _linear_problem() -> tuple[FusionRatioKD, dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(0)
    x, xv = torch.randn(N, D, generator=gen, dtype=torch.float64), torch.randn(N, D, generator=gen, dtype=torch.float64)
    y, yv = torch.randint(0, C, (N,), generator=gen), torch.randint(0, C, (N,), generator=gen)
    torch.manual_seed(0)
    student, teacher = nn.Linear(D, C).double(), nn.Linear(D, C).double()
    with torch.no_grad():
        teacher.weight.mul_(3.0)
    context = MethodContext(
        input_shape=(D, 1, 1),
        num_classes=C,
        train_eval_batches=lambda: iter([(x, y), (xv, yv)]),
        val_batch=lambda k: (xv, yv),
    )
    method = FusionRatioKD(FusionRatioParams(hidden=H, controller_lr=0.1), student, teacher, context).double()
    method.lr = 0.7
    return method, {"x": x, "y": y, "xv": xv, "yv": yv}


def test_hypergradient_matches_finite_differences() -> None:
    method, data = _linear_problem()
    assert method.teacher is not None
    zt = method.teacher(data["x"]).detach()
    outer, grads = method.hypergradient(data["x"], data["y"], zt, data["xv"], data["yv"])
    student = method.student
    assert isinstance(student, nn.Linear)
    problem = {
        "x": data["x"].numpy(), "y": data["y"].numpy(), "xv": data["xv"].numpy(), "yv": data["yv"].numpy(),
        "w": student.weight.detach().numpy(), "b": student.bias.detach().numpy(), "zt": zt.numpy(),
        "class_mean": method.class_mean.numpy(),
    }  # fmt: skip
    omega = [p.detach().numpy().copy() for p in method.controller.parameters()]
    assert outer.item() == pytest.approx(_np_outer_loss(omega, problem, method.lr, 4.0), rel=1e-12)
    eps = 1e-6
    for k, grad in enumerate(grads):
        numeric = np.zeros_like(omega[k])
        for idx in np.ndindex(omega[k].shape):
            plus, minus = [o.copy() for o in omega], [o.copy() for o in omega]
            plus[k][idx] += eps
            minus[k][idx] -= eps
            numeric[idx] = (_np_outer_loss(plus, problem, 0.7, 4.0) - _np_outer_loss(minus, problem, 0.7, 4.0)) / (
                2 * eps
            )
        assert np.abs(numeric).max() > 1e-6, "the problem should give a non-trivial hypergradient"
        np.testing.assert_allclose(grad.numpy(), numeric, rtol=1e-5, atol=1e-9)


def test_meta_step_trains_the_controller_only() -> None:
    method, data = _linear_problem()
    before = [p.detach().clone() for p in method.controller.parameters()]
    method.train().training_step(data["x"], data["y"])
    assert all(p.grad is None for p in method.student.parameters()), "the meta step must not touch student .grad"
    grads = [p.grad for p in method.controller.parameters()]
    assert all(g is not None and g.abs().max() > 0 for g in grads), "ω.grad must be non-zero (spec pitfall 1)"
    assert all(not torch.equal(b, p) for b, p in zip(before, method.controller.parameters(), strict=True))
    assert int(method.meta_steps) == 1 and int(method.train_steps) == 1


def test_meta_step_ignores_autocast() -> None:
    """The virtual step runs in fp32 with autocast off: under a bf16 autocast the hypergradient is unchanged."""
    method, data = _linear_problem()
    method.to(dtype=torch.float32)  # KDMethod.to also moves the teacher
    x, y, xv, yv = data["x"].float(), data["y"], data["xv"].float(), data["yv"]
    zt = method.teacher_logits(x).float()
    _, plain = method.hypergradient(x, y, zt, xv, yv)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, under_amp = method.hypergradient(x, y, zt, xv, yv)
    assert all(g.dtype == torch.float32 and torch.equal(g, h) for g, h in zip(plain, under_amp, strict=True))


def test_lr_zero_gives_zero_hypergradient_and_meta_every() -> None:
    method, data = _linear_problem()
    method.lr = 0.0
    zt = method.teacher_logits(data["x"])
    for mode in ("exact", "finite_difference"):
        _, grads = method.hypergradient(data["x"], data["y"], zt, data["xv"], data["yv"], mode=mode)
        assert all(float(g.abs().max()) == 0.0 for g in grads), mode  # θ' = θ: ω cannot influence the outer loss
    method, _ = _linear_problem()
    method.params = FusionRatioParams(hidden=H, meta_every=3)
    for _ in range(7):
        method.training_step(data["x"], data["y"])
    assert (int(method.train_steps), int(method.meta_steps)) == (7, 3)  # steps 0, 3, 6


def test_refuses_missing_validation_stream() -> None:
    assert FusionRatioKD.needs_val_split
    context = MethodContext(input_shape=(D, 1, 1), num_classes=C)
    with pytest.raises(ValueError, match="val_fraction"):
        FusionRatioKD(FusionRatioParams(), nn.Linear(D, C), nn.Linear(D, C), context)
    with pytest.raises(ValueError, match="get_classifier"):
        FusionRatioKD(
            FusionRatioParams(meta_scope="head"), nn.Linear(D, C), nn.Linear(D, C), _linear_problem()[0].context
        )


# -- invariants on a real resnet8 with BatchNorm ----------------------------------------------------------------


def _method(digits: DigitsRun, **params: object) -> FusionRatioKD:
    method = FusionRatioKD(FusionRatioParams.model_validate(params), digits.student(), digits.teacher, digits.context())
    method.lr = 0.05
    return method.train()


@pytest.mark.parametrize(
    ("scope", "mode"),
    [("full", "auto"), ("head", "auto"), ("full", "finite_difference"), ("head", "finite_difference")],
)
def test_invariants_on_resnet8(digits: DigitsRun, scope: str, mode: str) -> None:
    method = _method(digits, meta_scope=scope, hypergradient=mode)
    assert method.hypergradient_mode == ("exact" if mode == "auto" else mode)
    student, teacher = method.student, digits.teacher
    controller_ids = {id(p) for p in method.controller.parameters()}
    assert not controller_ids & {id(p) for p in method.optimized_parameters()}
    assert {id(p) for p in method.optimized_parameters()} == {id(p) for p in student.parameters()}
    if scope == "head":
        assert method._virtual_param_names() == {"fc.weight", "fc.bias"}
    images, targets = next(iter(digits.context().train_eval_batches()))  # type: ignore[misc]
    images, targets = images[:32], targets[:32]
    expected = copy.deepcopy(student).train()
    expected(images)  # one plain training forward: the only BN update the step may make
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    # the session teacher keeps the .grad of its own last training step; the method must not add to it
    teacher_grads = [None if p.grad is None else p.grad.clone() for p in teacher.parameters()]

    out = method.training_step(images, targets)
    assert all(p.grad is None for p in student.parameters()), "the meta step must leave no gradient in the student"
    for key, value in student.state_dict().items():
        if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(value, expected.state_dict()[key]), key
    hyper = [p.grad.clone() for p in method.controller.parameters()]  # type: ignore[union-attr]
    assert all(float(g.abs().max()) > 0 for g in hyper)
    out["loss"].backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(torch.equal(g, p.grad) for g, p in zip(hyper, method.controller.parameters(), strict=True)), (
        "α must be detached in the real step: the student loss may not reach ω"
    )
    assert not any(p.requires_grad for p in teacher.parameters())
    for g, p in zip(teacher_grads, teacher.parameters(), strict=True):
        assert (g is None and p.grad is None) or (g is not None and p.grad is not None and torch.equal(g, p.grad))
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())
    assert not teacher.training
    fresh = create_model("resnet8", num_classes=10, in_chans=1)
    assert method.deployable() is student
    assert set(method.deployable().state_dict()) == set(fresh.state_dict())
    assert not any(k.startswith("_teacher") for k in method.state_dict())


def test_class_mean_is_computed_on_the_training_split(digits: DigitsRun) -> None:
    method = _method(digits)
    train = digits.splits.train
    mean = torch.tensor(digits.splits.mean).view(1, -1, 1, 1)
    std = torch.tensor(digits.splits.std).view(1, -1, 1, 1)
    with torch.no_grad():
        probs = torch.softmax(digits.teacher((train.images.float() / 255 - mean) / std).double(), 1)
    direct = torch.stack([probs[train.labels == c].mean(0) for c in range(10)])
    assert method.class_mean.shape == (10, 10)
    torch.testing.assert_close(
        method.class_mean.double().sum(1), torch.ones(10, dtype=torch.float64), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(method.class_mean.double(), direct, atol=1e-5, rtol=0)
    assert float(method.class_mean.diagonal().min()) > 0.5  # a good teacher: T̄ is diagonal-heavy


def test_state_round_trip_restores_counter_and_class_mean(digits: DigitsRun) -> None:
    drawn: list[int] = []
    context = digits.context()
    assert context.val_batch is not None
    val_batch = context.val_batch

    def recording(k: int) -> tuple[Tensor, Tensor]:
        drawn.append(k)
        return val_batch(k)

    context.val_batch = recording
    method = FusionRatioKD(FusionRatioParams(), digits.student(), digits.teacher, context).train()
    method.lr = 0.05
    batches: Iterator[tuple[Tensor, Tensor]] = iter(digits.context().train_eval_batches())  # type: ignore[misc]
    images, targets = next(batches)
    for i in range(3):
        method.training_step(images[i * 16 : (i + 1) * 16], targets[i * 16 : (i + 1) * 16])
    state = {k: v.clone() for k, v in method.state_dict().items()}
    assert int(state["meta_steps"]) == 3 and drawn == [0, 1, 2]
    assert any(k.startswith("controller.") for k in state) and "class_mean" in state

    resumed = FusionRatioKD(FusionRatioParams(), digits.student(seed=1), digits.teacher, context).train()
    resumed.lr = 0.05
    resumed.class_mean.zero_()
    resumed.load_state_dict(state)
    assert int(resumed.meta_steps) == 3 and int(resumed.train_steps) == 3
    assert torch.equal(resumed.class_mean, method.class_mean) and float(resumed.class_mean.sum()) > 0
    resumed.training_step(images[:16], targets[:16])
    assert drawn[-1] == 3, "a resumed run must draw the next validation batch, not batch 0"


# -- the finite-difference hypergradient ------------------------------------------------------------------------


def _digits32(digits: DigitsRun, channels: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A real train batch (64) and validation batch (64) of the digits splits, upsampled 16 → 32 px (CIFAR size)."""
    context = digits.context()
    assert context.train_eval_batches is not None and context.val_batch is not None
    x, y = next(iter(context.train_eval_batches()))
    xv, yv = context.val_batch(0)

    def up(t: Tensor) -> Tensor:
        return F.interpolate(t, size=32, mode="bilinear", align_corners=False).repeat(1, channels, 1, 1)

    return up(x[:64]), y[:64], up(xv), yv


def _context32(batches: tuple[Tensor, Tensor, Tensor, Tensor], student_name: str) -> MethodContext:
    x, y, xv, yv = batches
    return MethodContext(
        input_shape=tuple(x.shape[1:]),  # type: ignore[arg-type]
        num_classes=10,
        train_eval_batches=lambda: iter([(x, y)]),
        val_batch=lambda k: (xv, yv),
        student_name=student_name,
    )


def _flat(grads: list[Tensor]) -> Tensor:
    return torch.cat([g.flatten() for g in grads]).double()


@pytest.mark.parametrize(
    ("scope", "dtype", "fd_step", "min_cos", "max_rel"),
    [
        # DARTS' step (ε·‖v‖ = 0.01) in fp32, the training path. Measured on exactly this problem: cos 0.95405,
        # rel 0.300 (the worst of the seeds measured, see fusion_ratio's docstring; ReLU kinks inside the ±0.01
        # interval, not rounding: fp64 gives the same digits). Margin 1.5× on rel; a wrong sign gives cos ≈ −0.95,
        # a missing η rel ≈ 1/η − 1 = 19, a missing 1/2 rel ≥ 1.
        ("full", torch.float32, 0.01, 0.9, 0.45),
        # head only (a linear map of fixed features, no kinks): measured cos 1 − 1e-10, rel 1.4e-5 in fp32.
        ("head", torch.float32, 0.01, 1 - 1e-6, 1e-3),
        # fp64, ε·‖v‖ = 1e-8 (below the kinks): the central difference must converge to the exact value, which
        # catches any error of scale or of what is held fixed. Measured rel 2.0e-7 (1.5e-3 at 1e-6, 2.1e-4 at 1e-7).
        ("full", torch.float64, 1e-8, 1 - 1e-8, 1e-4),
    ],
    ids=["full-fp32-darts-step", "head-fp32-darts-step", "full-fp64-tiny-step"],
)
def test_finite_difference_matches_exact_on_resnet8(
    digits: DigitsRun,
    monkeypatch: pytest.MonkeyPatch,
    scope: str,
    dtype: torch.dtype,
    fd_step: float,
    min_cos: float,
    max_rel: float,
) -> None:
    batches = _digits32(digits)
    torch.manual_seed(0)
    student = create_model("resnet8", num_classes=10, in_chans=1)
    teacher = copy.deepcopy(digits.teacher)  # .to(dtype) below also converts the teacher: keep the session's intact
    params = FusionRatioParams(meta_scope=scope)  # type: ignore[arg-type]
    method = FusionRatioKD(params, student, teacher, _context32(batches, "resnet8")).train().to(dtype=dtype)
    method.lr = 0.05
    x, y, xv, yv = (t.to(dtype) if t.is_floating_point() else t for t in batches)
    zt = method.teacher_logits(x)
    monkeypatch.setattr(hypergradient_module, "FD_STEP", fd_step)
    outer_e, exact = method.hypergradient(x, y, zt, xv, yv, mode="exact")
    outer_f, approx = method.hypergradient(x, y, zt, xv, yv, mode="finite_difference")
    assert outer_f.item() == pytest.approx(outer_e.item(), rel=1e-5)  # the same θ', so the same outer loss
    assert all(
        g.dtype == dtype and g.shape == w.shape for g, w in zip(approx, method.controller.parameters(), strict=True)
    )
    a, e = _flat(approx), _flat(exact)
    assert float(e.norm()) > 1e-4, "the problem should give a non-trivial hypergradient"
    cos = float(F.cosine_similarity(a, e, dim=0))
    rel = float((a - e).norm() / e.norm())
    assert cos > min_cos and rel < max_rel, f"cos {cos:.8f}, relative L2 error {rel:.3e}"


def test_auto_picks_exact_on_resnet8(digits: DigitsRun, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="kdpipe.distill.methods.fusion_ratio"):
        method = _method(digits)
    assert method.params.hypergradient == "auto" and method.hypergradient_mode == "exact"
    assert "hypergradient exact" in caplog.text and "has a double backward" in caplog.text


MOBILENET = "mobilenetv3_small_050"


def test_mobilenetv3_student_trains_with_finite_difference(digits: DigitsRun, caplog: pytest.LogCaptureFixture) -> None:
    """timm's MobileNetV3 (Hardswish / Hardsigmoid) has no double backward: "auto" must pick finite_difference,
    train ω and give a finite loss; "exact" must be refused up front with a message that names the fix."""
    x, y, xv, yv = _digits32(digits, channels=3)
    batches = (x[:16], y[:16], xv[:16], yv[:16])
    context = _context32(batches, MOBILENET)
    torch.manual_seed(0)
    teacher = create_model("resnet8", num_classes=10, in_chans=3)
    student = create_model(MOBILENET, num_classes=10, in_chans=3)
    with caplog.at_level(logging.INFO, logger="kdpipe.distill.methods.fusion_ratio"):
        method = FusionRatioKD(FusionRatioParams(), student, teacher, context).train()
    assert method.hypergradient_mode == "finite_difference"
    assert "hypergradient finite_difference" in caplog.text and "backward" in caplog.text, caplog.text
    method.lr = 0.05
    before = [p.detach().clone() for p in method.controller.parameters()]
    out = method.training_step(batches[0], batches[1])
    assert torch.isfinite(out["loss"]) and int(method.meta_steps) == 1
    assert all(p.grad is not None and float(p.grad.abs().max()) > 0 for p in method.controller.parameters())
    assert all(not torch.equal(b, p) for b, p in zip(before, method.controller.parameters(), strict=True))
    assert all(p.grad is None for p in student.parameters()), "the meta step must leave no gradient in the student"
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)

    with pytest.raises(ValueError, match=rf"hypergradient 'exact'.*{MOBILENET}.*finite_difference"):
        FusionRatioKD(FusionRatioParams(hypergradient="exact"), student, teacher, context)
    # the head alone (a Linear) needs no double backward through the body, so "auto" keeps the exact path there
    head = FusionRatioKD(FusionRatioParams(meta_scope="head"), student, teacher, context)
    assert head.hypergradient_mode == "exact"


# -- a short real-data run --------------------------------------------------------------------------------------


def test_digits_run_learns_and_logs_alpha(digits: DigitsRun, tmp_path: Path) -> None:
    t0 = time.perf_counter()
    method, result = digits.train(FusionRatioParams(), epochs=3, tmp_path=tmp_path)
    seconds = time.perf_counter() - t0
    history = result.history
    losses = [row["train_loss"] for row in history]
    assert losses[-1] < losses[0], losses
    top1 = test_top1(method.deployable(), digits.splits)
    assert top1 > 0.6 > CHANCE, f"test top-1 {top1:.3f}"
    keys = {"alpha_mean", "alpha_std", "alpha_p10", "alpha_p50", "alpha_p90", "alpha_teacher_right",
            "alpha_teacher_wrong", "alpha_right_small_st", "alpha_right_large_st", "meta_val_ce", "train_alpha"}  # fmt: skip
    for row in history:
        assert keys <= row.keys(), keys - row.keys()
        assert row["alpha_std"] > 0 and 0.05 < row["alpha_mean"] < 0.95, row
        assert row["alpha_p10"] <= row["alpha_p50"] <= row["alpha_p90"]
    assert int(method.meta_steps) == int(method.train_steps) > 0
    print(f"fusion_ratio digits: {seconds:.1f}s, top-1 {top1:.3f}, history {history}")
