"""Interactive KD (iakd): stage executors, swap schedule, hybrid mechanics, adapters, pair checks, a digits run.

Golden numbers were computed once, independently of kdpipe and torch, in float64 numpy / ``math``: log-softmax with
max-subtraction, CE as the batch mean of −log p_y, τ²·KL(p_t ‖ p_s) summed over classes and averaged over the
batch; the schedules straight from the formulas of shared/methods/offline.md §2.2 (p0 = 0.5, γ = 0.75, E = 10).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch
from torch import Tensor, nn

import kdpipe  # noqa: F401  (registers the CIFAR nets with timm)
from kdpipe.distill.methods.base import MethodContext
from kdpipe.distill.methods.iakd import IAKD, IAKDParams, create_executor, iakd_loss, swap_probability

from .conftest import CHANCE, DigitsRun

SMALL = (1, 16, 16)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # These nets are tiny: one intra-op thread is as fast as two on an idle 2-core machine and ~15x faster on a
    # loaded one, where two threads spin against each other. Restored so other test modules are unaffected.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(name: str, in_chans: int = 1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=10, in_chans=in_chans)


def _method(
    params: IAKDParams | None = None,
    student: str = "resnet8",
    teacher: str = "resnet14",
    shape: tuple[int, int, int] = SMALL,
) -> IAKD:
    ctx = MethodContext(input_shape=shape, num_classes=10)
    return IAKD(params or IAKDParams(), _model(student, shape[0]), _model(teacher, shape[0], seed=1), ctx)


def _batch(shape: tuple[int, int, int] = SMALL, n: int = 8) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(n, *shape, generator=gen), torch.randint(0, 10, (n,), generator=gen)


# --- 1. executors -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "family", "stages"),
    [
        ("resnet8", "cifar", 3),
        ("wrn_16_2", "cifar", 3),
        ("mobilenetv2_x0_5_cifar", "cifar", 4),
        ("resnet18", "timm-resnet", 4),
    ],
)
def test_executor_matches_forward(name: str, family: str, stages: int) -> None:
    model = _model(name, in_chans=3).eval()
    executor = create_executor(model)
    assert (executor.family, len(executor.stages)) == (family, stages)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(executor(x), model(x))


def test_executor_refuses_other_families() -> None:
    with pytest.raises(ValueError, match="timm's ResNet family"):
        create_executor(nn.Linear(3, 3))


# --- 2. golden values ---------------------------------------------------------------------------------------------

LIN = [
    0.5,
    0.43333333333333335,
    0.3666666666666667,
    0.3,
    0.23333333333333334,
    0.16666666666666669,
    0.09999999999999998,
    0.033333333333333326,
    0.0,
    0.0,
]
COS = [
    0.5,
    0.4783863644106502,
    0.41728265158971456,
    0.32725424859373686,
    0.22386788418308667,
    0.12500000000000006,
    0.047745751406263165,
    0.005463099816548578,
    0.0,
    0.0,
]
LIN_WARMUP2 = [
    0.0,
    0.0,
    0.5,
    0.40909090909090906,
    0.3181818181818182,
    0.2272727272727273,
    0.13636363636363635,
    0.04545454545454547,
    0.0,
    0.0,
]


@pytest.mark.parametrize("epoch", range(10))
def test_swap_schedule_golden(epoch: int) -> None:
    assert swap_probability(epoch, 10, IAKDParams()) == pytest.approx(LIN[epoch], abs=1e-12)
    assert swap_probability(epoch, 10, IAKDParams(schedule="cosine")) == pytest.approx(COS[epoch], abs=1e-12)
    assert swap_probability(epoch, 10, IAKDParams(), warmup=2) == pytest.approx(LIN_WARMUP2[epoch], abs=1e-12)
    constant = swap_probability(epoch, 10, IAKDParams(schedule="constant", p0=0.25), warmup=2)
    assert constant == (0.0 if epoch < 2 else 0.25)


HYBRID = torch.tensor([[1.0, -0.5, 2.0, 0.0], [0.3, 1.2, -1.0, 0.5], [-2.0, 0.0, 1.0, 3.0]])
TEACHER = torch.tensor([[0.5, 0.0, 2.5, -1.0], [1.0, 2.0, 0.0, 0.0], [-1.0, -1.0, 0.5, 2.0]])
TARGETS = torch.tensor([2, 0, 3])
GOLDEN_CE = 0.7454636174518027
GOLDEN_KD = {4.0: 0.19822586951798307, 2.0: 0.153370054571438}  # τ²·KL, batch mean
GOLDEN_TOTAL_DEFAULT = 0.9436894869697857  # 1·CE + 1·τ²KL at τ = 4
GOLDEN_TOTAL_CUSTOM = 0.6794719178687774  # 0.5·CE + 2·τ²KL at τ = 2


def test_loss_golden() -> None:
    out = iakd_loss(HYBRID, TEACHER, TARGETS, IAKDParams())
    assert out["ce"].item() == pytest.approx(GOLDEN_CE, abs=1e-6)
    assert out["kd"].item() == pytest.approx(GOLDEN_KD[4.0], abs=1e-6)
    assert out["loss"].item() == pytest.approx(GOLDEN_TOTAL_DEFAULT, abs=1e-6)
    custom = iakd_loss(HYBRID, TEACHER, TARGETS, IAKDParams(ce_weight=0.5, kd_weight=2.0, temperature=2.0))
    assert custom["loss"].item() == pytest.approx(GOLDEN_TOTAL_CUSTOM, abs=1e-6)


# --- 3. hybrid mechanics ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("student_stage", [0, 1, 2])
def test_hybrid_equals_hand_composition(student_stage: int) -> None:
    method = _method().eval()
    s, t = method.student, method.teacher
    assert t is not None
    x, _ = _batch()
    with torch.no_grad():
        h = s.act1(s.bn1(s.conv1(x)))
        for i, name in enumerate(["layer1", "layer2", "layer3"]):
            h = getattr(s if i == student_stage else t, name)(h)
        expected = s.forward_head(h)
        swaps = [i != student_stage for i in range(3)]
        logits, feats = method.hybrid_forward(x, swaps)
    assert torch.equal(logits, expected)
    assert len(feats) == 4 and not method.has_adapters


def _layer1_grad(method: IAKD) -> float:
    x, y = _batch()
    method.student.zero_grad(set_to_none=True)
    logits, _ = method.hybrid_forward(x, [False, True, True])  # student layer1, then two teacher stages
    nn.functional.cross_entropy(logits, y).backward()
    return sum(float(p.grad.abs().sum()) for p in method.student.layer1.parameters() if p.grad is not None)


def test_feedback_gradient_flows_through_teacher_stages() -> None:
    method = _method().train()
    assert _layer1_grad(method) > 0, "the upstream student stage must get the gradient back through teacher stages"
    assert all(p.grad is None for p in method.teacher.parameters())  # type: ignore[union-attr]
    # Pitfall 1: a teacher stage under no_grad cuts the feedback; this test would catch that bug.
    stages = list(method.teacher_exec.stages)
    inner = stages[1]

    def no_grad_stage(h: Tensor) -> Tensor:
        with torch.no_grad():
            return inner(h)

    stages[1] = no_grad_stage
    method.teacher_exec = dataclasses.replace(method.teacher_exec, stages=tuple(stages))
    assert _layer1_grad(method) == 0.0


def test_checkpointed_teacher_gives_the_same_gradient() -> None:
    plain, ckpt = _layer1_grad(_method()), _layer1_grad(_method(IAKDParams(checkpoint_teacher=True)))
    assert ckpt == pytest.approx(plain, rel=1e-5)


def test_teacher_frozen_through_training_steps() -> None:
    method = _method(IAKDParams(schedule="constant", p0=1.0)).train()
    teacher = method.teacher
    assert teacher is not None and not teacher.training
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    opt = torch.optim.SGD(method.optimized_parameters(), lr=0.1)
    method.on_epoch_start(0, 4)
    for _ in range(3):
        x, y = _batch()
        out = method.training_step(x, y)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert method.epoch_metrics()["swap_fraction"] == pytest.approx(2 / 3)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items()), "teacher BN stats moved"
    assert {id(p) for p in method.optimized_parameters()} == {id(p) for p in method.student.parameters()}
    assert all(k.startswith("student.") for k in method.state_dict())


def test_all_swapped_forces_one_random_student_stage() -> None:
    method = _method(IAKDParams(schedule="constant", p0=1.0))
    torch.manual_seed(0)
    draws = [method.draw_swaps() for _ in range(60)]
    assert all(sum(d) == 2 for d in draws)
    assert {d.index(False) for d in draws} == {0, 1, 2}


def test_no_swaps_once_p_is_zero() -> None:
    method = _method().train()
    method.on_epoch_start(3, 4)  # linear: 0.5·max(0, 1 − 3/3) = 0
    assert method.swap_p == 0.0
    assert not any(any(method.draw_swaps()) for _ in range(50))
    x, y = _batch()
    method.training_step(x, y)
    assert method.epoch_metrics()["swap_fraction"] == 0.0


# --- 4. adapters --------------------------------------------------------------------------------------------------


def test_adapters_for_a_channel_mismatched_pair() -> None:
    shape = (3, 32, 32)
    method = _method(IAKDParams(schedule="constant", p0=1.0), teacher="wrn_16_2", shape=shape).train()
    assert method.has_adapters and method.warmup_epochs == 2
    adapter_ids = {id(p) for p in method.adapters.parameters()}
    assert adapter_ids and adapter_ids <= {id(p) for p in method.optimized_parameters()}
    assert not {id(p) for p in method.teacher.parameters()} & {id(p) for p in method.parameters()}  # type: ignore[union-attr]
    fresh = timm.create_model("resnet8", num_classes=10, in_chans=3)
    assert list(method.deployable().state_dict()) == list(fresh.state_dict())
    x, y = _batch(shape)

    # Warm-up: no swaps, FitNet hints train the adapters and fall on a fixed batch.
    method.on_epoch_start(0, 10)
    opt = torch.optim.SGD(method.optimized_parameters(), lr=0.05, momentum=0.9)
    hints = []
    for _ in range(8):
        out = method.training_step(x, y)
        hints.append(float(out["hint"]))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert method.epoch_metrics()["swap_fraction"] == 0.0
    assert hints[-1] < hints[0]

    # After the warm-up: wrapped teacher stages in the hybrid, gradients into the adapters, no hint term.
    method.on_epoch_start(2, 10)
    out = method.training_step(x, y)
    assert "hint" not in out and method.epoch_metrics()["swap_fraction"] == pytest.approx(2 / 3)
    opt.zero_grad()
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.adapters.parameters())


def test_adapters_with_a_resolution_mismatch() -> None:
    # mobilenetv2_x0_5_cifar stages sit at reductions 2-4-8-16, timm resnet18's at 4-8-16-32.
    shape = (3, 32, 32)
    method = _method(student="mobilenetv2_x0_5_cifar", teacher="resnet18", shape=shape).train()
    assert all(a.in_scale == (0.5, 0.5) and a.out_scale == (2.0, 2.0) for a in method.adapters)  # type: ignore[union-attr]
    x, y = _batch(shape, n=4)
    for student_stage in range(4):
        logits, feats = method.hybrid_forward(x, [i != student_stage for i in range(4)])
        assert logits.shape == (4, 10)
        assert [f.shape[-1] for f in feats] == [16, 16, 8, 4, 2]
    nn.functional.cross_entropy(logits, y).backward()
    assert method.student.conv1[0].weight.grad is not None


# --- 5. pair checks -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("student", "teacher"),
    [
        ("resnet8", "resnet14"),
        ("resnet18", "resnet34"),
        ("resnet8", "wrn_40_2"),
        ("mobilenetv2_x0_5_cifar", "resnet50"),
    ],
)
def test_check_pair_accepts_supported_pairs(student: str, teacher: str) -> None:
    IAKD.check_pair(IAKDParams(), student, teacher)


@pytest.mark.parametrize(("student", "teacher"), [("convnext_atto", "resnet18"), ("resnet8", "vit_tiny_patch16_224")])
def test_check_pair_refuses_other_families(student: str, teacher: str) -> None:
    with pytest.raises(ValueError, match=r"supported families: kdpipe CIFAR nets .* timm's ResNet family"):
        IAKD.check_pair(IAKDParams(), student, teacher)


def test_check_pair_refuses_a_stage_count_mismatch() -> None:
    with pytest.raises(ValueError, match="student 'resnet8' has 3, teacher 'resnet18' has 4"):
        IAKD.check_pair(IAKDParams(), "resnet8", "resnet18")


# --- 6. real data -------------------------------------------------------------------------------------------------


def test_digits_run(digits: DigitsRun, tmp_path: Path) -> None:
    # Linear schedule over 6 epochs: p = 0.5, 0.39, 0.28, 0.17, 0.06, 0. Swapping slows early learning (hybrid top-1
    # ~0.11 after epoch 1 vs ~0.29 for KD), so 4 epochs ends at 0.51-0.77 depending on the seed; 6 end at 0.76-0.89.
    epochs = 6
    method, result = digits.train(IAKDParams(), epochs=epochs, tmp_path=tmp_path)
    assert isinstance(method, IAKD)
    rows = result.history
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert result.final is not None and result.final.top1 > 0.6 > CHANCE
    for e, row in enumerate(rows):
        assert row["swap_p"] == pytest.approx(swap_probability(e, epochs, IAKDParams()))
        assert {"swap_fraction", "hybrid_top1"} <= row.keys()
        assert row["hybrid_top1"] == pytest.approx(row["train_top1"])
    assert rows[0]["swap_fraction"] > 0
    assert rows[-1]["swap_p"] == 0.0 and rows[-1]["swap_fraction"] == 0.0
