"""Interactive KD (iakd): stage executors, stride pairing, swap schedule, hybrid mechanics, adapters, cross-family
pairs of timm CNNs, pair checks, an ONNX export, a digits run.

Golden numbers come from tests/reference/iakd.py and tests/reference/baselines.py (float64 numpy / ``math``,
independent of kdpipe and torch): softmax with max-subtraction, CE as the batch mean of −log p_y, τ²·KL(p_t ‖ p_s)
summed over classes and averaged over the batch; the schedules straight from the formulas of
shared/methods/offline.md §2.2 (p0 = 0.5, γ = 0.75, E = 10).
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
from kdpipe.distill.methods.iakd import (
    IAKD,
    IAKDParams,
    StageExecutor,
    StagePair,
    create_executor,
    iakd_loss,
    pair_by_stride,
    swap_probability,
)
from kdpipe.distill.taps import stage_specs
from kdpipe.exports.onnx import Preprocessing, export_onnx
from kdpipe.models.factory import create_model
from tests.reference import baselines
from tests.reference import iakd as ref

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

RGB32 = (3, 32, 32)

# (stem, stage_1, ..., stage_N, rest of forward_features) per model, read off timm 1.0.31's forward_features and
# feature_info: stages end at the feature_info modules without the stride-2 stem level.
LAYOUTS = {
    "resnet18": ["conv1 bn1 act1 maxpool", "layer1", "layer2", "layer3", "layer4", ""],
    "resnet10t": ["conv1 bn1 act1 maxpool", "layer1", "layer2", "layer3", "layer4", ""],
    "mobilenetv3_small_050": ["conv_stem bn1", "blocks.0", "blocks.1", "blocks.2 blocks.3", "blocks.4 blocks.5", ""],
    "mobilenetv3_large_100": [
        "conv_stem bn1 blocks.0",
        "blocks.1",
        "blocks.2",
        "blocks.3 blocks.4",
        "blocks.5 blocks.6",
        "",
    ],
    "efficientnet_b0": [
        "conv_stem bn1 blocks.0",
        "blocks.1",
        "blocks.2",
        "blocks.3 blocks.4",
        "blocks.5 blocks.6",
        "conv_head bn2",
    ],
    "efficientnet_lite0": [
        "conv_stem bn1 blocks.0",
        "blocks.1",
        "blocks.2",
        "blocks.3 blocks.4",
        "blocks.5 blocks.6",
        "conv_head bn2",
    ],
    "convnext_atto": ["stem", "stages.0", "stages.1", "stages.2", "stages.3", "norm_pre"],
    "convnext_nano": ["stem", "stages.0", "stages.1", "stages.2", "stages.3", "norm_pre"],
    "regnetx_002": ["stem", "s1", "s2", "s3", "s4", "final_conv"],
    "regnety_004": ["stem", "s1", "s2", "s3", "s4", "final_conv"],
    "resnet8": ["conv1 bn1 act1", "layer1", "layer2", "layer3", ""],
    "wrn_16_2": ["conv1", "block1", "block2", "block3 bn1 act1", ""],
    "mobilenetv2_x0_5_cifar": [
        "conv1",
        "blocks.0 blocks.1",
        "blocks.2",
        "blocks.3 blocks.4",
        "blocks.5 blocks.6",
        "conv2",
    ],
}
FAMILIES = {"cifar": (1, 2, 4), "timm": (4, 8, 16, 32)}


def _net(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name, num_classes=10)


def _stage_inputs_and_outputs(model: nn.Module, x: Tensor, first: str) -> tuple[Tensor, list[Tensor], Tensor]:
    """model(x), recording the input of module ``first`` and the output of every feature_info stage module."""
    names = [s.module for s in stage_specs(model) if not s.stem]
    stem: list[Tensor] = []
    outs: dict[str, Tensor] = {}
    handles = [model.get_submodule(first).register_forward_pre_hook(lambda m, a: stem.append(a[0].clone()))]
    for n in names:
        handles.append(model.get_submodule(n).register_forward_hook(lambda m, a, y, n=n: outs.setdefault(n, y.clone())))
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return stem[0], [outs[n] for n in names], logits


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_executor_matches_forward(name: str) -> None:
    model = _net(name).eval()
    executor = create_executor(model, RGB32)
    layout = [tuple(group.split()) for group in LAYOUTS[name]]
    assert list(executor.modules) == layout
    family = "cifar" if executor.family == "cifar" else "timm"
    if name == "mobilenetv2_x0_5_cifar":
        assert executor.reductions == (2, 4, 8, 16)
    else:
        assert executor.reductions == FAMILIES[family]
    assert executor.family == ("cifar" if family == "cifar" else f"timm-{type(model).__name__.lower()}")
    x = torch.randn(4, *RGB32)
    with torch.no_grad():
        stem_out, stage_outs, logits = _stage_inputs_and_outputs(model, x, layout[1][0])
        feats = executor.features(x)
        assert torch.equal(executor(x), logits)
    # Every cut sits where the model's own forward passes the stem map to the first stage and where each
    # feature_info module returns: a span shifted by one module would still compose to the same logits.
    assert torch.equal(feats[0], stem_out)
    assert len(feats) == len(stage_outs) + 1
    assert all(torch.equal(f, o) for f, o in zip(feats[1:], stage_outs, strict=True))
    # Train mode too (batch statistics, the head's dropout drawn from the same seed).
    model.train()
    torch.manual_seed(5)
    expected = model(x)
    torch.manual_seed(5)
    assert torch.equal(executor(x), expected)


def test_executor_refuses_a_model_without_stages() -> None:
    with pytest.raises(ValueError, match="neither a kdpipe CIFAR net nor a timm model with feature_info"):
        create_executor(nn.Linear(3, 3))


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("vit_tiny_patch16_224", r"not a plain chain .*the input of 'pos_drop' is not what 'patch_embed' returned"),
        ("swin_tiny_patch4_window7_224", "returns NHWC stage maps"),
        ("efficientformer_l1", r"stage 'stages.3' returns shape \(1, 49, 448\), not an NCHW map"),
        ("xception41", "not a plain chain"),
    ],
)
def test_executor_refuses_models_it_cannot_cut(name: str, why: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    with pytest.raises(ValueError, match=why):
        create_executor(model)


def test_executor_refuses_an_operation_between_modules() -> None:
    model = _net("resnet10t").eval()
    create_executor(model, RGB32)
    forward_features = model.forward_features
    model.forward_features = lambda x: forward_features(x) * 2.0  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="the output of forward_features is not what 'layer4' returned"):
        create_executor(model, RGB32)
    assert "forward_features" in vars(model)  # the dry forward's shadow gave the patched method back


# --- 2. stage pairing ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("student", "teacher", "pairs"),
    [
        (
            (4, 8, 16, 32),
            (4, 8, 16, 32),
            [((0, 1), (0, 1), 4), ((1, 2), (1, 2), 8), ((2, 3), (2, 3), 16), ((3, 4), (3, 4), 32)],
        ),
        ((1, 2, 4), (1, 2, 4), [((0, 1), (0, 1), 1), ((1, 2), (1, 2), 2), ((2, 3), (2, 3), 4)]),
        ((2, 4, 8, 16), (4, 8, 16, 32), [((0, 2), (0, 1), 4), ((2, 3), (1, 2), 8), ((3, 4), (2, 3), 16)]),
        ((4, 8, 16, 32), (1, 2, 4), [((0, 1), (0, 3), 4)]),
        ((1, 2, 4), (4, 8, 16, 32), [((0, 3), (0, 1), 4)]),
        ((1, 2, 4, 8, 8), (4, 8, 8, 16), [((0, 3), (0, 1), 4), ((3, 5), (1, 3), 8)]),
        ((1, 2), (4, 8), []),
    ],
)
def test_pair_by_stride(student: tuple[int, ...], teacher: tuple[int, ...], pairs: list[tuple]) -> None:
    assert pair_by_stride(student, teacher) == [StagePair(s, t, r) for s, t, r in pairs]


# --- 3. golden values ---------------------------------------------------------------------------------------------

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


HYBRID_ROWS = [[1.0, -0.5, 2.0, 0.0], [0.3, 1.2, -1.0, 0.5], [-2.0, 0.0, 1.0, 3.0]]  # exact decimals for the reference
TEACHER_ROWS = [[0.5, 0.0, 2.5, -1.0], [1.0, 2.0, 0.0, 0.0], [-1.0, -1.0, 0.5, 2.0]]
HYBRID, TEACHER = torch.tensor(HYBRID_ROWS), torch.tensor(TEACHER_ROWS)
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


def test_goldens_match_the_float64_reference() -> None:
    """The schedules and losses above are what tests/reference/iakd.py (and baselines.py) give."""
    for epoch in range(10):
        assert ref.swap_probability(epoch, 10) == pytest.approx(LIN[epoch], abs=1e-12), epoch
        assert ref.swap_probability(epoch, 10, schedule="cosine") == pytest.approx(COS[epoch], abs=1e-12), epoch
        assert ref.swap_probability(epoch, 10, warmup=2) == pytest.approx(LIN_WARMUP2[epoch], abs=1e-12), epoch
    y = TARGETS.tolist()
    assert baselines.cross_entropy(HYBRID_ROWS, y) == pytest.approx(GOLDEN_CE, abs=1e-12)
    for temperature, golden in GOLDEN_KD.items():
        assert baselines.kd(HYBRID_ROWS, TEACHER_ROWS, temperature) == pytest.approx(golden, abs=1e-12)
    assert ref.total_loss(HYBRID_ROWS, TEACHER_ROWS, y) == pytest.approx(GOLDEN_TOTAL_DEFAULT, abs=1e-12)
    custom = ref.total_loss(HYBRID_ROWS, TEACHER_ROWS, y, temperature=2.0, ce_weight=0.5, kd_weight=2.0)
    assert custom == pytest.approx(GOLDEN_TOTAL_CUSTOM, abs=1e-12)


# --- 4. hybrid mechanics ------------------------------------------------------------------------------------------


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
    assert all(k.startswith(("student.", "stats.")) for k in method.state_dict())  # never the teacher


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


# --- 5. adapters --------------------------------------------------------------------------------------------------


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
    # mobilenetv2_x0_5_cifar's stages end at strides 2-4-8-16 (stem at 2), timm resnet18's at 4-8-16-32 (stem at 4):
    # three pairs ending at 4, 8 and 16; the first student span (two stages) starts from a map twice as large as
    # the teacher's layer1 expects, so only its A_in resizes. resnet18's layer4 is never used.
    method = _method(student="mobilenetv2_x0_5_cifar", teacher="resnet18", shape=RGB32).train()
    assert [(p.student, p.teacher, p.reduction) for p in method.pairs] == [
        ((0, 2), (0, 1), 4),
        ((2, 3), (1, 2), 8),
        ((3, 4), (2, 3), 16),
    ]
    assert [a.in_scale for a in method.adapters] == [(0.5, 0.5), None, None]  # type: ignore[union-attr]
    assert [a.out_scale for a in method.adapters] == [None, None, None]  # type: ignore[union-attr]
    x, y = _batch(RGB32, n=4)
    for student_pair in range(3):
        logits, feats = method.hybrid_forward(x, [k != student_pair for k in range(3)])
        assert logits.shape == (4, 10)
        assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]
    nn.functional.cross_entropy(logits, y).backward()
    assert method.student.conv1[0].weight.grad is not None


# --- 6. cross-family pairs ----------------------------------------------------------------------------------------

# (student, teacher, number of pairs): every family as student and as teacher, pairs of one stride layout and not.
CROSS = [
    ("mobilenetv3_small_050", "resnet18", 4),
    ("mobilenetv3_large_100", "resnet8x4", 1),  # CIFAR teacher at strides 1-2-4: one pair, the student keeps a tail
    ("regnetx_002", "convnext_atto", 4),
    ("resnet10t", "efficientnet_b0", 4),
    ("efficientnet_lite0", "regnety_004", 4),
    ("convnext_nano", "mobilenetv3_large_100", 4),
]


def _cross(student: str, teacher: str, params: IAKDParams | None = None) -> IAKD:
    ctx = MethodContext(input_shape=RGB32, num_classes=10, student_name=student, teacher_name=teacher)
    return IAKD(params or IAKDParams(), _net(student), _net(teacher, seed=1), ctx)


def _params(model: nn.Module, executor: StageExecutor, start: int, stop: int) -> list[nn.Parameter]:
    """Parameters of ``executor.modules[start:stop]`` (0 is the stem, i + 1 stage i, -1 the head's modules)."""
    names = [n for group in executor.modules[start:stop] for n in group]
    return [p for n in names for p in model.get_submodule(n).parameters()]


@torch.no_grad()
def _changes_logits(method: IAKD, x: Tensor, swaps: list[bool], params: list[nn.Parameter]) -> bool:
    """Whether perturbing ``params`` changes the hybrid logits: which network's stages the hybrid really runs."""
    assert params
    base = method.hybrid_forward(x, swaps)[0]
    saved = [p.clone() for p in params]
    for p in params:
        p.add_(torch.randn_like(p))
    changed = not torch.equal(method.hybrid_forward(x, swaps)[0], base)
    for p, v in zip(params, saved, strict=True):
        p.copy_(v)
    return changed


@pytest.mark.parametrize(("student", "teacher", "n_pairs"), CROSS)
def test_cross_family_hybrid_runs_the_swapped_networks_stages(student: str, teacher: str, n_pairs: int) -> None:
    method = _cross(student, teacher).eval()
    s, t = method.student, method.teacher
    assert t is not None and len(method.pairs) == n_pairs
    x, _ = _batch(RGB32, n=4)
    last_t = method.pairs[-1].teacher[1]
    patterns = [[k % 2 == 0 for k in range(n_pairs)], [k % 2 == 1 for k in range(n_pairs)]]
    for swaps in patterns:
        for pair, swap in zip(method.pairs, swaps, strict=True):
            s_params = _params(s, method.student_exec, 1 + pair.student[0], 1 + pair.student[1])
            t_params = _params(t, method.teacher_exec, 1 + pair.teacher[0], 1 + pair.teacher[1])
            assert _changes_logits(method, x, swaps, s_params) is not swap, (pair, swaps)
            assert _changes_logits(method, x, swaps, t_params) is swap, (pair, swaps)
        # The student's stem and head always run, its tail too; the teacher's stem and its stages past the last
        # pair never do.
        assert _changes_logits(method, x, swaps, _params(s, method.student_exec, 0, 1))
        assert not _changes_logits(method, x, swaps, _params(t, method.teacher_exec, 0, 1))
        assert _changes_logits(method, x, swaps, list(s.get_classifier().parameters()))
        if method.has_tail:
            tail = _params(s, method.student_exec, 1 + method.pairs[-1].student[1], -1)
            assert _changes_logits(method, x, swaps, tail)
        if last_t < len(method.teacher_exec.stages):
            assert not _changes_logits(method, x, swaps, _params(t, method.teacher_exec, 1 + last_t, -1))


@pytest.mark.parametrize(("student", "teacher", "n_pairs"), CROSS)
def test_cross_family_training_step(student: str, teacher: str, n_pairs: int, monkeypatch: pytest.MonkeyPatch) -> None:
    method = _cross(student, teacher).train()
    assert method.has_adapters and method.warmup_epochs == 2
    x, y = _batch(RGB32, n=4)
    opt = torch.optim.SGD(method.optimized_parameters(), lr=0.01)

    # Warm-up: the adapters' hints across families, no swaps.
    method.on_epoch_start(0, 10)
    out = method.training_step(x, y)
    assert torch.isfinite(out["loss"]) and torch.isfinite(out["hint"]) and method.epoch_metrics()["swap_fraction"] == 0
    opt.zero_grad()
    out["loss"].backward()
    opt.step()

    # Swapping: every pair but the first runs the teacher (the only pair, when the student keeps a tail), so the
    # gradient reaching the student's stem and first span has come back through swapped teacher stages.
    swaps = [k > 0 for k in range(n_pairs)] if n_pairs > 1 else [True]
    monkeypatch.setattr(method, "draw_swaps", lambda p=None: list(swaps))
    method.on_epoch_start(2, 10)
    out = method.training_step(x, y)
    assert torch.isfinite(out["loss"]) and "hint" not in out
    assert method.epoch_metrics()["swap_fraction"] == pytest.approx(sum(swaps) / n_pairs)
    opt.zero_grad()
    out["loss"].backward()
    s, t = method.student, method.teacher
    assert t is not None and all(p.grad is None for p in t.parameters())
    first = method.pairs[0].student
    upstream = _params(s, method.student_exec, 0, 1 + (first[1] if not swaps[0] else 0))
    assert all(torch.isfinite(p.grad).all() for p in upstream if p.grad is not None)
    assert sum(float(p.grad.abs().sum()) for p in upstream if p.grad is not None) > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.adapters.parameters())
    opt.step()

    # What gets exported is the plain student: no adapter parameters, the fresh model's state_dict keys.
    deployed = method.deployable()
    assert deployed is s and list(deployed.state_dict()) == list(_net(student).state_dict())
    assert not {id(p) for p in method.adapters.parameters()} & {id(p) for p in deployed.parameters()}


def test_deployed_cross_family_student_exports_to_onnx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    method = _cross("mobilenetv3_small_050", "resnet18", IAKDParams(adapter_warmup_epochs=0)).train()
    monkeypatch.setattr(method, "draw_swaps", lambda p=None: [False, True, True, True])
    x, y = _batch(RGB32, n=4)
    method.training_step(x, y)["loss"].backward()
    pre = Preprocessing(
        mean=(0.5,) * 3, std=(0.25,) * 3, image_size=32, in_chans=3, channel_order="RGB", classes=tuple("abcdefghij")
    )
    result = export_onnx(method.deployable(), tmp_path / "student.onnx", preprocessing=pre, simplify=False)
    assert result.path.is_file() and result.checked_batches  # onnxruntime matched torch at these batch sizes


# --- 7. pair checks -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("student", "teacher"),
    [
        ("resnet8", "resnet14"),
        ("resnet18", "resnet34"),
        ("resnet8", "wrn_40_2"),
        ("mobilenetv2_x0_5_cifar", "resnet50"),
        ("convnext_atto", "resnet18"),
        ("mobilenetv3_large_100", "resnet8x4"),
        *[(s, t) for s, t, _ in CROSS],
    ],
)
def test_check_pair_accepts_supported_pairs(student: str, teacher: str) -> None:
    IAKD.check_pair(IAKDParams(), student, teacher)


@pytest.mark.parametrize(
    ("student", "teacher", "role"),
    [("resnet8", "vit_tiny_patch16_224", "teacher"), ("swin_tiny_patch4_window7_224", "resnet18", "student")],
)
def test_check_pair_refuses_models_without_spatial_stages(student: str, teacher: str, role: str) -> None:
    bad = teacher if role == "teacher" else student
    match = (
        rf"iakd cannot pair student '{student}' with teacher '{teacher}': it cannot cut the {role} '{bad}' into "
        r"stages \(.*\)\. iakd needs CNNs .* kdpipe's CIFAR nets and timm's ResNet, MobileNetV3, EfficientNet, "
        "ConvNeXt, RegNet"
    )
    with pytest.raises(ValueError, match=match):
        IAKD.check_pair(IAKDParams(), student, teacher)


@pytest.mark.parametrize("teacher", ["resnet18", "convnext_atto"])
def test_check_pair_refuses_pairs_without_a_swappable_span(teacher: str) -> None:
    match = (
        rf"iakd cannot pair student 'resnet8' with teacher '{teacher}': .* the student's stages end at strides "
        r"\(1, 2, 4\), the teacher's at \(4, 8, 16, 32\); they share only stride 4, where the student's last stage "
        "ends, so every swap would replace the whole student trunk"
    )
    with pytest.raises(ValueError, match=match):
        IAKD.check_pair(IAKDParams(), "resnet8", teacher)
    with pytest.raises(ValueError, match=match):
        _cross("resnet8", teacher)


# --- 8. real data -------------------------------------------------------------------------------------------------


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


def test_student_mix_adds_the_pure_student_loss_on_swapped_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """student_mix μ: a step that swaps a stage trains (1 − μ)·L(hybrid) + μ·L(student), each the reference
    w_ce·CE + w_kd·τ²·KL on the teacher's logits; a step without a swap is L(student) alone."""
    params = IAKDParams(schedule="constant", p0=1.0, student_mix=0.25, kd_weight=0.5)
    method = _method(params).train()
    teacher = method.teacher
    assert teacher is not None
    method.on_epoch_start(0, 4)
    x, y = _batch()
    with torch.no_grad():
        z_t = teacher(x).double().numpy()
        z_h = method.hybrid_forward(x, [True, False, True])[0].double().numpy()
        z_s = method.student(x).double().numpy()
    hybrid = ref.total_loss(z_h, z_t, y.tolist(), kd_weight=0.5)
    alone = ref.total_loss(z_s, z_t, y.tolist(), kd_weight=0.5)
    assert abs(hybrid - alone) > 0.05  # the two terms differ, so a swapped weight would show
    monkeypatch.setattr(method, "draw_swaps", lambda: [True, False, True])
    out = method.training_step(x, y)
    assert out["loss"].item() == pytest.approx(0.75 * hybrid + 0.25 * alone, rel=1e-5)
    monkeypatch.setattr(method, "draw_swaps", lambda: [False, False, False])
    assert method.training_step(x, y)["loss"].item() == pytest.approx(alone, rel=1e-5)
