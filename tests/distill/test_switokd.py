"""SwitOKD: the switch statistics and losses against golden values, a truly paused teacher (bit-identical weights and
optimizer state, moving BN statistics), per-network lrs on the schedule, the 1T2S / 2T1S topologies without the official
scripts' bugs, the DDP all-reduce of the statistics on a real 2-process gloo group, and a from-scratch run on digits.

Golden numbers come from tests/reference/switokd.py (float64 numpy, independent of kdpipe) on shared/methods/online.md
§1.2–1.5 and the exact decimal ``*_ROWS`` the tensors are built from:
``softmax`` with max-subtraction; ``a = mean_b Σ_c |p − onehot(y)|``; ``G = mean_b Σ_c |p_s^τ − p_t^τ|``;
``ε = exp(−a_t/(a_s + a_t))``; ``δ = a_s − ε·a_t``; expert iff ``G > δ and a_t < a_s``; ``CE = mean_b −log p[y]``;
``KL(a‖b) = τ²·mean_b Σ_c a_c (log a_c − log b_c)``; losses summed term by term as in §1.4 / §1.5. The 1T2S / 2T1S
logits were found by a seeded random search for batches on which the official scripts' ε (from the other pair's
a values) flips a decision.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from kdpipe.config import TrainConfig
from kdpipe.distill.methods import MethodContext, create_method
from kdpipe.distill.methods.dml import mutual_losses
from kdpipe.distill.methods.switokd import (
    SwitOKD,
    SwitOKDParams,
    all_reduce_switch_sums,
    decide,
    label_distance,
    switch_sums,
    switokd_losses,
)
from kdpipe.distill.trainer import Trainer
from kdpipe.errors import Interrupted
from tests.reference import switokd as ref

from .conftest import CHANCE, DigitsRun, fit, test_top1

Y = torch.tensor([0, 2, 3])
TEACHER_ROWS = [[3.0, -1.0, 0.5, -2.0], [0.0, 0.5, 2.5, 2.0], [-1.0, 0.0, 0.5, 3.5]]
TEACHER = torch.tensor(TEACHER_ROWS)
STUDENT_FAR_ROWS = [[1.0, 2.0, -1.0, 0.5], [1.5, 0.5, 1.0, -2.0], [0.5, 2.0, 0.0, 1.0]]  # expert mode
STUDENT_FAR = torch.tensor(STUDENT_FAR_ROWS)
STUDENT_NEAR_ROWS = [[2.0, -1.0, 0.0, -1.5], [-0.5, 0.0, 2.0, 1.8], [-1.0, -0.5, 0.5, 2.5]]  # learning
STUDENT_NEAR = torch.tensor(STUDENT_NEAR_ROWS)

# (student, teacher) -> a_s, a_t, G, ε, δ, expert
GOLDEN_SWITCH = {
    "expert": (
        STUDENT_FAR,
        TEACHER,
        1.506751058087984,
        0.42133237757933767,
        1.3262660647568756,
        0.8037042432999583,
        1.16812443838781,
        True,
    ),
    "gap_below_delta": (
        STUDENT_NEAR,
        TEACHER,
        0.575479884876447,
        0.42133237757933767,
        0.16242943096861118,
        0.655288442697791,
        0.29938564731432515,
        False,
    ),
    # G > δ, but the teacher is the worse one: learning mode by the code-only conjunct a_t < a_s
    "teacher_worse": (
        TEACHER,
        STUDENT_FAR,
        0.42133237757933767,
        1.506751058087984,
        1.3262660647568756,
        0.4577298729454916,
        -0.26835259279976026,
        False,
    ),
}
GOLDEN_LOSSES = {  # τ -> L_S, L_T on (STUDENT_FAR, TEACHER)
    1.0: (2.6215455970871178, 2.0107777755008334),
    2.0: (3.2515589649513195, 2.254045991198486),
}
GOLDEN_GAP_T2 = 0.847740593724566  # G at τ = 2 on (STUDENT_FAR, TEACHER); a_s, a_t, ε, δ unchanged

# 1T2S: both pairs in expert mode; the scripts' ε of pair 1 (from pair 2's a values) would put pair 1 in learning mode
T_1T2S_ROWS = [[1.6, 2.0, -2.0, 2.8], [0.1, -0.3, 1.4, -1.2], [0.7, -0.5, -0.1, 0.6]]
T_1T2S = torch.tensor(T_1T2S_ROWS)
S1_1T2S_ROWS = [[0.0, -0.5, 1.8, 0.9], [0.7, 1.3, -3.1, 1.4], [3.5, -1.6, 3.8, -2.7]]
S1_1T2S = torch.tensor(S1_1T2S_ROWS)
S2_1T2S_ROWS = [[-1.0, 1.0, -0.9, -1.3], [0.2, 0.7, 1.3, -0.4], [-3.0, 0.9, 1.9, -0.7]]
S2_1T2S = torch.tensor(S2_1T2S_ROWS)
PAIRS_1T2S = [  # a_s, a_t, G, ε, δ per pair (T, S1), (T, S2)
    (1.9304527950259651, 1.2227824172192874, 1.128874002752501, 0.6785571200144166, 1.1007250795933787),
    (1.5777660003176823, 1.2227824172192874, 0.9447186366665686, 0.6462153395546351, 0.7875852453728831),
]
GOLDEN_1T2S = {
    "S1": 8.618971519371474,
    "S2": 4.250246739216813,
    (True, False): 1.7700190517177816,
    (False, True): 2.6257076777402677,
    (False, False): 3.3070203700755285,
}
# 2T1S: both pairs in learning mode; the scripts' ε of pair 2 (from pair 1's a values) would pause teacher 2
T1_2T1S_ROWS = [[1.6, -2.1, 1.3, 2.2], [-0.4, 1.9, 1.8, 0.5], [0.3, 0.4, -1.3, 0.5]]
T1_2T1S = torch.tensor(T1_2T1S_ROWS)
T2_2T1S_ROWS = [[-0.5, 1.1, -1.9, 2.0], [-4.3, 0.3, -1.7, 0.4], [-0.9, -0.5, 0.3, -0.3]]
T2_2T1S = torch.tensor(T2_2T1S_ROWS)
S_2T1S_ROWS = [[0.1, 0.8, 1.0, 1.3], [1.0, -0.9, -1.7, 0.5], [0.1, 0.9, 1.0, -3.9]]
S_2T1S = torch.tensor(S_2T1S_ROWS)
PAIRS_2T1S = [  # (T1, S), (T2, S)
    (1.8974725258207152, 1.3155085414009402, 0.9822801667051784, 0.6640249799202921, 1.023941993031983),
    (1.8974725258207152, 1.764521623495656, 0.7391555871583207, 0.6176414308009387, 0.807630865605663),
]
GOLDEN_2T1S = {"S": 5.574068906442513, "T1": 2.850797651635489, "T2": 4.144783462059441}


class LiteralNet(nn.Module):
    """Returns fixed logits (a trainable parameter) whatever the input, behind a BN whose statistics move each
    forward and a head that gets zero gradient (so only weight decay or momentum could move it)."""

    def __init__(self, logits: Tensor) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(5)
        self.head = nn.Linear(5, logits.shape[1])
        self.z = nn.Parameter(logits.clone())

    def forward(self, x: Tensor) -> Tensor:
        return self.z + 0.0 * self.head(self.bn(x))


def sgd(base: float = 0.1) -> Callable[..., torch.optim.Optimizer]:
    """An optimizer factory like the trainer's: SGD with momentum and weight decay (a zero-loss step would move)."""

    def make(params: Any, lr: float | None = None) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=base if lr is None else lr, momentum=0.9, weight_decay=5e-4)

    return make


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def optimizer_state(opt: torch.optim.Optimizer) -> list[Tensor]:
    return [t.clone() for s in opt.state.values() for t in s.values() if isinstance(t, Tensor)]


def method_with(params: SwitOKDParams, teacher: nn.Module, student: nn.Module, **extra: nn.Module) -> SwitOKD:
    """A SwitOKD whose extra network is replaced by ``extra`` (teacher2 / student2) before its optimizers exist."""
    ctx = MethodContext(input_shape=(5, 1, 1), num_classes=4, student_name="s", teacher_name="t")
    method = create_method(params, student, teacher, ctx)
    assert isinstance(method, SwitOKD)
    for name, net in extra.items():
        setattr(method, name, net)
    # the optimizers a trainer would build from the declared specs, here with a plain SGD factory
    make = sgd()
    specs = method.optimizer_specs()
    method.step_control.optimizers = {name: make(s.params, lr=s.lr) for name, s in specs.items()}
    return method.train()


# -- 1, 2: statistics, switch and losses ---------------------------------------------------------------------------


def test_label_distance_is_twice_one_minus_p_y() -> None:
    torch.manual_seed(0)
    logits, targets = 3 * torch.randn(32, 10), torch.randint(0, 10, (32,))
    p_y = torch.softmax(logits, 1).gather(1, targets[:, None]).squeeze(1)
    assert torch.allclose(label_distance(logits, targets), 2 * (1 - p_y), atol=1e-6)
    sums = switch_sums(logits, logits.flip(0), targets)
    assert sums[3].item() == 32
    assert sums[0].item() / 32 == pytest.approx(float((2 * (1 - p_y)).mean()), abs=1e-6)
    soft = torch.nn.functional.one_hot(targets, 10).float()  # soft-label rows give the same distances
    assert torch.allclose(label_distance(logits, soft), label_distance(logits, targets))


@pytest.mark.parametrize("case", list(GOLDEN_SWITCH))
def test_switch_golden(case: str) -> None:
    student, teacher, *golden, expert = GOLDEN_SWITCH[case]
    (sw,) = decide(switch_sums(student, teacher, Y))
    assert [sw.a_s, sw.a_t, sw.gap, sw.eps, sw.delta] == pytest.approx(golden, abs=1e-6)
    assert sw.expert is expert


@pytest.mark.parametrize("temperature", list(GOLDEN_LOSSES))
def test_losses_golden(temperature: float) -> None:
    for expert, l_t in ((False, GOLDEN_LOSSES[temperature][1]), (True, None)):
        (loss_t,), (loss_s,) = switokd_losses([TEACHER], [STUDENT_FAR], Y, [[expert]], temperature)
        assert loss_s.item() == pytest.approx(GOLDEN_LOSSES[temperature][0], abs=1e-6)
        assert (loss_t is None) if l_t is None else loss_t.item() == pytest.approx(l_t, abs=1e-6)
    (sw,) = decide(switch_sums(STUDENT_FAR, TEACHER, Y, temperature))
    gap = GOLDEN_GAP_T2 if temperature == 2.0 else GOLDEN_SWITCH["expert"][4]
    assert sw.gap == pytest.approx(gap, abs=1e-6)
    assert sw.a_s == pytest.approx(GOLDEN_SWITCH["expert"][2], abs=1e-6), "a_s keeps τ = 1"


def test_goldens_match_the_float64_reference() -> None:
    """Every literal above is what tests/reference/switokd.py (numpy, from online.md §1.2–1.5) gives on the exact
    decimal rows the tensors are built from."""
    y = Y.tolist()
    rows = {
        "expert": (STUDENT_FAR_ROWS, TEACHER_ROWS),
        "gap_below_delta": (STUDENT_NEAR_ROWS, TEACHER_ROWS),
        "teacher_worse": (TEACHER_ROWS, STUDENT_FAR_ROWS),
    }
    for case, (student, teacher, *golden, expert) in GOLDEN_SWITCH.items():
        assert torch.equal(student, torch.tensor(rows[case][0])) and torch.equal(teacher, torch.tensor(rows[case][1]))
        want = ref.switch(*rows[case], y)
        assert list(want[:5]) == pytest.approx(golden, abs=1e-12), case
        assert expert is want.expert, case
    for temperature, golden in GOLDEN_LOSSES.items():
        assert ref.pair_losses(STUDENT_FAR_ROWS, TEACHER_ROWS, y, temperature) == pytest.approx(golden, abs=1e-12)
    assert ref.gap(STUDENT_FAR_ROWS, TEACHER_ROWS, 2.0) == pytest.approx(GOLDEN_GAP_T2, abs=1e-12)
    at_t2 = ref.switch(STUDENT_FAR_ROWS, TEACHER_ROWS, y, 2.0)
    unchanged = GOLDEN_SWITCH["expert"][2:4] + GOLDEN_SWITCH["expert"][5:7]
    assert (at_t2.a_s, at_t2.a_t, at_t2.eps, at_t2.delta) == pytest.approx(unchanged, abs=1e-12)

    for student, golden in zip((S1_1T2S_ROWS, S2_1T2S_ROWS), PAIRS_1T2S, strict=True):
        want = ref.switch(student, T_1T2S_ROWS, y)
        assert list(want[:5]) == pytest.approx(golden, abs=1e-12) and want.expert
    for grid in [(True, True), (True, False), (False, True), (False, False)]:
        l_t, l_s1, l_s2 = ref.one_teacher_two_students(T_1T2S_ROWS, S1_1T2S_ROWS, S2_1T2S_ROWS, y, grid)
        assert (l_s1, l_s2) == pytest.approx((GOLDEN_1T2S["S1"], GOLDEN_1T2S["S2"]), abs=1e-12)
        if all(grid):
            assert l_t is None
        else:
            assert l_t == pytest.approx(GOLDEN_1T2S[grid], abs=1e-12), grid

    for teacher, golden in zip((T1_2T1S_ROWS, T2_2T1S_ROWS), PAIRS_2T1S, strict=True):
        want = ref.switch(S_2T1S_ROWS, teacher, y)
        assert list(want[:5]) == pytest.approx(golden, abs=1e-12) and not want.expert
    l_t1, l_t2, l_s = ref.two_teachers_one_student(T1_2T1S_ROWS, T2_2T1S_ROWS, S_2T1S_ROWS, y, (False, False))
    assert (l_t1, l_t2, l_s) == pytest.approx((GOLDEN_2T1S["T1"], GOLDEN_2T1S["T2"], GOLDEN_2T1S["S"]), abs=1e-12)


def test_learning_mode_is_dml_and_losses_reach_only_their_own_network() -> None:
    z_t, z_s = TEACHER.clone().requires_grad_(), STUDENT_NEAR.clone().requires_grad_()
    (loss_t,), (loss_s,) = switokd_losses([z_t], [z_s], Y, [[False]])
    dml_t, dml_s = mutual_losses([TEACHER, STUDENT_NEAR], Y, 1.0, 1.0)
    assert (loss_t.item(), loss_s.item()) == pytest.approx((dml_t.item(), dml_s.item()), abs=1e-6)
    assert loss_s is not None
    loss_s.backward()
    assert z_t.grad is None and z_s.grad is not None


def test_params_validation() -> None:
    with pytest.raises(ValueError, match="not both"):
        SwitOKDParams(second_student="resnet8", second_teacher="resnet14")
    with pytest.raises(ValueError, match="unknown model"):
        SwitOKDParams(second_student="resnet8x")


# -- 3: a paused teacher takes no step, but its BN statistics move --------------------------------------------------


def test_expert_step_freezes_teacher_weights_and_optimizer_but_not_bn_stats() -> None:
    torch.manual_seed(0)
    teacher, student = LiteralNet(TEACHER), LiteralNet(STUDENT_NEAR)
    method = method_with(SwitOKDParams(), teacher, student)
    opt_t = method.own_optimizers()["teacher"]
    # Learning step (real decision): both move; the teacher's momentum buffers now exist.
    t0, s0 = snapshot(teacher), snapshot(student)
    out = method.training_step(torch.randn(3, 5), Y)
    assert method.epoch_metrics()["expert_frac"] == 0.0
    assert not torch.equal(teacher.z, t0["z"]) and not torch.equal(student.z, s0["z"])
    assert not torch.equal(teacher.head.weight, t0["head.weight"]), "zero gradient, but weight decay acts"
    assert out["loss"].item() == pytest.approx(out["loss_teacher"].item() + out["loss_student"].item())
    # Expert step (real decision: the student is now far from the teacher).
    with torch.no_grad():
        student.z.copy_(STUDENT_FAR)
    t1, s1, state1 = snapshot(teacher), snapshot(student), optimizer_state(opt_t)
    grads1 = {n: p.grad.clone() for n, p in teacher.named_parameters() if p.grad is not None}
    assert state1, "the learning step created the teacher's momentum buffers"
    out = method.training_step(torch.randn(3, 5), Y)
    m = method.epoch_metrics()
    assert m["expert_frac"] == 0.5 and out["loss_teacher"].item() == 0.0
    assert m["gap"] > m["delta"] and m["a_t"] < m["a_s"] and 1 / math.e <= m["eps"] <= 1
    for name, param in teacher.named_parameters():
        assert torch.equal(param, t1[name]), f"paused teacher parameter {name} moved"
        assert param.grad is not None and torch.equal(param.grad, grads1[name]), "no backward into the teacher"
    after = optimizer_state(opt_t)
    assert len(after) == len(state1) and all(torch.equal(a, b) for a, b in zip(after, state1, strict=True))
    assert not torch.equal(teacher.bn.running_mean, t1["bn.running_mean"]), "the train-mode forward updates BN"
    assert teacher.bn.num_batches_tracked.item() == t1["bn.num_batches_tracked"].item() + 1
    assert not torch.equal(student.z, s1["z"]), "the student learns in expert mode"


@pytest.mark.parametrize("mode", ["expert", "learning"])
def test_forced_mode(mode: str) -> None:
    torch.manual_seed(1)
    # The real switch would decide the other mode on each of these batches.
    teacher, student = LiteralNet(TEACHER), LiteralNet(STUDENT_NEAR if mode == "expert" else STUDENT_FAR)
    method = method_with(SwitOKDParams(mode=mode), teacher, student)
    t0 = snapshot(teacher)
    for _ in range(3):
        method.training_step(torch.randn(3, 5), Y)
    moved = not torch.equal(teacher.z, t0["z"])
    assert moved is (mode == "learning")
    assert method.epoch_metrics()["expert_frac"] == (1.0 if mode == "expert" else 0.0)


# -- 4: separate lrs on the schedule ----------------------------------------------------------------------------------


class TinyBatches:
    def __init__(self, batches: list[tuple[Tensor, Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def set_epoch(self, epoch: int) -> None:
        pass

    def iter_from(self, step: int) -> Any:
        return iter(self.batches[step:])

    def __iter__(self) -> Any:
        return iter(self.batches)


def tiny_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))


def test_each_network_has_its_own_lr_following_the_schedule(tmp_path: Path) -> None:
    params = SwitOKDParams(teacher_lr=0.1, student_lr=0.01, second_student="resnet8", second_lr=0.02)
    ctx = MethodContext(input_shape=(1, 16, 16), num_classes=10, student_name="tiny", teacher_name="tiny")
    method = create_method(params, tiny_net(0), tiny_net(1), ctx)
    assert set(method.networks()) == {"teacher", "student", "student2"} and method.network_arch("student2") == "resnet8"
    cfg = TrainConfig.model_validate({"epochs": 2, "lr": 0.05, "schedule": {"name": "step", "milestones": [1]}})
    gen = torch.Generator().manual_seed(0)
    batches = TinyBatches([(torch.randn(8, 1, 16, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen))])
    trainer = Trainer(
        method, cfg, train_batches=batches, eval_batches=batches, num_classes=10, device=torch.device("cpu"),
        checkpoint_path=tmp_path / "last.pt", fingerprint="lr",
    )  # fmt: skip
    seen: list[dict[str, list[float]]] = []
    start = method.on_epoch_start

    def record(epoch: int, epochs: int) -> None:
        start(epoch, epochs)
        seen.append({k: [g["lr"] for g in o.param_groups] for k, o in method.own_optimizers().items()})

    method.on_epoch_start = record  # type: ignore[method-assign]
    result = trainer.fit()
    expected = {"teacher": 0.1, "student": 0.01, "student2": 0.02}
    for epoch, factor in enumerate([1.0, 0.1]):
        for name, lr in expected.items():
            assert seen[epoch][name] == pytest.approx([lr * factor]), (epoch, name)
    logged = {"expert_frac_teacher_student", "expert_frac_teacher_student2", "paused_frac_teacher", "train_ce_student2"}
    assert logged | {"eval_top1_teacher", "eval_top1_student2"} <= set(result.history[0])


def test_resume_mid_epoch_logs_the_same_switch_statistics(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    batches = TinyBatches(
        [(torch.randn(8, 1, 16, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen)) for _ in range(3)]
    )
    cfg = TrainConfig.model_validate({"epochs": 2, "lr": 0.05})

    def run(work: Path, stop: int | None) -> list[dict[str, float]]:
        ctx = MethodContext(input_shape=(1, 16, 16), num_classes=10)
        method = create_method(SwitOKDParams(), tiny_net(0), tiny_net(1), ctx)
        trainer = Trainer(
            method, cfg, train_batches=batches, eval_batches=batches, num_classes=10, device=torch.device("cpu"),
            checkpoint_path=work / "last.pt", fingerprint="resume", stop_after_steps=stop,
        )  # fmt: skip
        return trainer.fit().history

    torch.manual_seed(0)
    straight = run(tmp_path / "a", None)
    torch.manual_seed(0)
    with pytest.raises(Interrupted):
        run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", None)
    # Every logged number of the epoch after the resume matches, except the wall time its steps took.
    assert {k: v for k, v in resumed[1].items() if k != "train_seconds"} == {
        k: v for k, v in straight[1].items() if k != "train_seconds"
    }
    # The trainer's own train_* sums restart at the resumed step; the switch statistics were checkpointed.
    switch_keys = {"expert_frac", "a_s", "a_t", "gap", "eps", "delta"}
    assert {k: resumed[0][k] for k in switch_keys} == {k: straight[0][k] for k in switch_keys}


# -- 5: 1T2S and 2T1S --------------------------------------------------------------------------------------------------


def buggy_eps(a_s: float, a_t: float) -> float:
    return math.exp(-a_t / (a_s + a_t))


def test_1t2s_each_pair_uses_its_own_eps_and_a_fully_paused_teacher_never_steps() -> None:
    teacher, s1, s2 = LiteralNet(T_1T2S), LiteralNet(S1_1T2S), LiteralNet(S2_1T2S)
    method = method_with(SwitOKDParams(second_student="resnet8"), teacher, s1, student2=s2)
    switches = method.switches({"teacher": T_1T2S, "student": S1_1T2S, "student2": S2_1T2S}, Y)
    for sw, golden in zip(switches, PAIRS_1T2S, strict=True):
        assert [sw.a_s, sw.a_t, sw.gap, sw.eps, sw.delta] == pytest.approx(golden, abs=1e-6)
        assert sw.expert
    # The official script's ε for pair 1 (pair 2's a values) would have put pair 1 in learning mode.
    a_s1, a_t, gap1 = PAIRS_1T2S[0][:3]
    assert gap1 <= a_s1 - buggy_eps(PAIRS_1T2S[1][0], a_t) * a_t
    # Both pairs expert: the teacher takes no step at all (the script stepped it with a zero loss).
    t0, s0 = snapshot(teacher), snapshot(s2)
    out = method.training_step(torch.randn(3, 5), Y)
    assert all(torch.equal(p, t0[n]) for n, p in teacher.named_parameters())
    assert not method.own_optimizers()["teacher"].state, "the paused teacher's optimizer never ran"
    assert not torch.equal(s2.z, s0["z"]) and out["loss_teacher"].item() == 0.0
    m = method.epoch_metrics()
    assert m["expert_frac_teacher_student"] == m["expert_frac_teacher_student2"] == m["paused_frac_teacher"] == 1.0


def test_1t2s_loss_weights() -> None:
    _, (l_s1, l_s2) = switokd_losses([T_1T2S], [S1_1T2S, S2_1T2S], Y, [[True, True]])
    assert (l_s1.item(), l_s2.item()) == pytest.approx((GOLDEN_1T2S["S1"], GOLDEN_1T2S["S2"]), abs=1e-6)
    for grid in [(True, False), (False, True), (False, False)]:
        (l_t,), _ = switokd_losses([T_1T2S], [S1_1T2S, S2_1T2S], Y, [list(grid)])
        assert l_t is not None and l_t.item() == pytest.approx(GOLDEN_1T2S[grid], abs=1e-6), grid
    (l_t,), _ = switokd_losses([T_1T2S], [S1_1T2S, S2_1T2S], Y, [[True, True]])
    assert l_t is None, "w0 = 0 only when both students triggered expert mode, and then no step"


def test_2t1s_each_pair_uses_its_own_eps_and_loss_weights() -> None:
    t1, t2, s = LiteralNet(T1_2T1S), LiteralNet(T2_2T1S), LiteralNet(S_2T1S)
    method = method_with(SwitOKDParams(second_teacher="resnet8"), t1, s, teacher2=t2)
    assert method.pairs == [("teacher", "student"), ("teacher2", "student")]
    switches = method.switches({"teacher": T1_2T1S, "teacher2": T2_2T1S, "student": S_2T1S}, Y)
    for sw, golden in zip(switches, PAIRS_2T1S, strict=True):
        assert [sw.a_s, sw.a_t, sw.gap, sw.eps, sw.delta] == pytest.approx(golden, abs=1e-6)
        assert not sw.expert
    a_s, a_t2, gap2 = PAIRS_2T1S[1][:3]  # the script's ε for pair 2 (pair 1's a values) would pause teacher 2
    assert gap2 > a_s - buggy_eps(a_s, PAIRS_2T1S[0][1]) * a_t2
    (l_t1, l_t2), (l_s,) = switokd_losses([T1_2T1S, T2_2T1S], [S_2T1S], Y, [[False], [False]])
    assert l_t1 is not None and l_t2 is not None
    got = (l_t1.item(), l_t2.item(), l_s.item())
    assert got == pytest.approx((GOLDEN_2T1S["T1"], GOLDEN_2T1S["T2"], GOLDEN_2T1S["S"]), abs=1e-6)
    (l_t1, l_t2), (l_s,) = switokd_losses([T1_2T1S, T2_2T1S], [S_2T1S], Y, [[True], [False]])
    assert l_t1 is None and l_t2 is not None and l_t2.item() == pytest.approx(GOLDEN_2T1S["T2"], abs=1e-6)
    assert l_s.item() == pytest.approx(GOLDEN_2T1S["S"], abs=1e-6), "the student always learns from both"


def test_2t1s_training_step_pauses_only_the_teacher_in_expert_mode() -> None:
    # Pair (teacher, student) is in expert mode; teacher2 is worse than the student, so its pair is in learning mode.
    t1, t2, s = LiteralNet(TEACHER), LiteralNet(-TEACHER), LiteralNet(STUDENT_FAR)
    method = method_with(SwitOKDParams(second_teacher="resnet8"), t1, s, teacher2=t2)
    before = {name: snapshot(net) for name, net in method.networks().items()}
    out = method.training_step(torch.randn(3, 5), Y)
    m = method.epoch_metrics()
    assert m["expert_frac_teacher_student"] == 1.0 and m["expert_frac_teacher2_student"] == 0.0
    assert m["paused_frac_teacher"] == 1.0 and m["paused_frac_teacher2"] == 0.0
    assert all(torch.equal(p, before["teacher"][n]) for n, p in t1.named_parameters())
    assert not torch.equal(t2.z, before["teacher2"]["z"]) and not torch.equal(s.z, before["student"]["z"])
    assert out["loss"].item() == pytest.approx(out["loss_teacher2"].item() + out["loss_student"].item())
    assert method.deployable() is s and method.network_arch("teacher2") == "resnet8"


# -- 6: DDP ------------------------------------------------------------------------------------------------------------

RANK_ROWS = [STUDENT_FAR, STUDENT_NEAR[:2]]  # local decisions differ: rank 0 expert, rank 1 learning
RANK_TARGETS = [Y, Y[:2]]
RANK_TEACHER = [TEACHER, TEACHER[:2]]


def local_sums(students: Tensor, teachers: Tensor, targets: Tensor) -> Tensor:
    """Two pairs, as the multi-net method stacks them: (student vs teacher) and the roles swapped."""
    return torch.stack([switch_sums(students, teachers, targets), switch_sums(teachers, students, targets)])


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        local = local_sums(RANK_ROWS[rank], RANK_TEACHER[rank], RANK_TARGETS[rank])
        reduced = all_reduce_switch_sums(local)
        torch.save({"reduced": reduced, "local": decide(local), "global": decide(reduced)}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_statistics_are_all_reduced_before_deciding(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    single = decide(local_sums(torch.cat(RANK_ROWS), torch.cat(RANK_TEACHER), torch.cat(RANK_TARGETS)))
    assert torch.equal(ranks[0]["reduced"], ranks[1]["reduced"]), "every rank holds the same sums"
    assert ranks[0]["global"] == ranks[1]["global"]
    for got, want in zip(ranks[0]["global"], single, strict=True):
        assert [got.a_s, got.a_t, got.gap, got.eps, got.delta] == pytest.approx(
            [want.a_s, want.a_t, want.gap, want.eps, want.delta], abs=1e-6
        )
        assert got.expert is want.expert
    assert [ranks[0]["local"][0].expert, ranks[1]["local"][0].expert] == [True, False], "ranks alone would disagree"
    assert single[0].expert, "the global batch is in expert mode"
    plain = torch.ones(4)
    assert not dist.is_initialized() and all_reduce_switch_sums(plain) is plain, "no process group: a no-op"


# -- 7: digits from scratch ------------------------------------------------------------------------------------------


def test_switokd_trains_teacher_and_student_from_scratch_on_digits(digits: DigitsRun, tmp_path: Path) -> None:
    teacher = digits.student(arch="resnet14", seed=3)  # an untrained architecture, as the teacher stage gives it
    method = create_method(SwitOKDParams(), digits.student(seed=4), teacher, digits.context())
    assert method.teacher is None, "the jointly trained teacher is a trained network, not a hidden frozen one"
    result = fit(method, digits.splits, tmp_path, epochs=4)
    losses = [row["train_loss_student"] for row in result.history]
    assert losses[-1] < 0.5 * losses[0], losses
    fractions = [row["expert_frac"] for row in result.history]
    assert len(fractions) == 4 and all(0.0 <= f <= 1.0 for f in fractions), fractions
    # The switch fires on real data: the student, learning faster than the deeper teacher at first, catches up on some
    # batches and the teacher pauses (expert mode). A switch that never fires is DML.
    assert max(fractions) > 0.0, fractions
    assert all({"gap", "delta", "a_s", "a_t", "eps"} <= set(row) for row in result.history)
    assert test_top1(method.student, digits.splits) > 6 * CHANCE
    assert result.history[-1]["eval_top1_teacher"] > 6 * CHANCE
