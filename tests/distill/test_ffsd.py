"""FFSD: golden helpers and loss terms, gradient isolation between the networks, decoder BN modes, module shapes on
kdpipe's resnet8 and timm's resnet18 (odd input sizes included), the deployed plain leader, and a real digits run.

Golden numbers come from tests/reference/ffsd.py (float64 numpy, independent of kdpipe), written from
shared/methods/online.md §2.5-2.7 (AT = channel mean of F²; n(v) = v/max(‖v‖, 1e-12) per sample; D = mean of
(n(a) − n(b))²; t with θ the ⌊N/3⌋-th smallest of n(A) found by sorting and a per-position three-way comparison,
ν − â / â / ν/2; Shift(F) = F + ν/C·(t − â); CE and τ²·KL from tests/reference/baselines.py). Inputs: the literal
tensors below and ``_g(shape, phase) = 1.5·sin(0.37·k + phase) + 0.2`` over the flat index k (decoded maps clipped
at 0).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from kdpipe.data import BatchLoader
from kdpipe.distill.methods import create_method
from kdpipe.distill.methods.base import MethodContext
from kdpipe.distill.methods.ffsd import (
    FFSD,
    FFSDParams,
    FusionModule,
    SelfDistillationDecoder,
    TransFusion,
    attention_map,
    decoder_fit_loss,
    diversity_loss,
    fusion_loss,
    leader_terms,
    normalized_mse,
    self_distillation_loss,
    shift_features,
    shift_target,
    warmup_factor,
)
from kdpipe.distill.taps import Taps, select_stages, stage_specs
from kdpipe.models.factory import create_model
from kdpipe.registry import METHODS
from tests.reference import baselines as ref
from tests.reference import ffsd as ffsd_ref

from .conftest import DigitsRun, fit, test_top1

D64 = torch.float64
F1 = torch.tensor(
    [
        [[[0.5, -1.0, 2.0], [0.0, 1.5, -0.5]], [[1.0, 0.25, -2.0], [3.0, 0.0, 1.0]]],
        [[[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], [[-1.0, 2.0, 0.0], [0.7, -0.3, 1.2]]],
    ],
    dtype=D64,
)
# Sample 0 has a tie at θ (two positions equal to the 2nd smallest of N = 6): both get ν/2.
A = torch.tensor([[[[1.0, 1.0, 2.0], [4.0, 0.5, 3.0]]], [[[0.2, 0.9, 0.4], [0.1, 0.6, 0.3]]]], dtype=D64)
GOLDEN_AT = [0.625, 0.53125, 4.0, 4.5, 1.125, 0.625, 0.505, 2.02, 0.045, 0.325, 0.17, 0.9]
GOLDEN_D = 0.05123027002298911
GOLDEN_T = [
    2.7950849718747373, 2.7950849718747373, 5.232399067349508, 4.874628190949542, 0.08944271909999159,
    5.053513629149525, 0.6062177826491071, 0.4701280763401239, 0.8825211257612852, 0.08247860988423225,
    0.7175639059928207, 0.9649997356455174,
]  # fmt: skip
GOLDEN_SHIFT = [
    9.832275390625002, -1.0, 17.289550781250004, 14.789550781250004, 19.664550781250004, 8.832275390625002,
    10.332275390625002, 0.25, 13.289550781250004, 17.789550781250004, 18.164550781250004, 10.332275390625002,
    2.2359875, 0.8209874999999995, 0.3, 2.7159875, 1.73549375, 2.3409874999999993, 1.1359874999999997,
    2.6209874999999996, 0.0, 3.0159875000000005, 0.93549375, 2.9409874999999994,
]  # fmt: skip
GOLDEN_WARMUP = [0.04076220397836619, 0.16529888822158656, 0.4493289641172215, 0.8187307530779819, 1.0, 1.0]
GOLDEN_TERMS = {
    "div": 3.5065386910429868,
    "sd": 0.17712377566298299,
    "fit": 0.35545274396162674,
    "fusion": 1.9277263257919128,
    "ce": 1.8121834667892704,
    "kd": 0.08624243327029685,
    "fus": 0.011917061055802348,
    "trans": 0.002329988166234482,
}


def _g(shape: tuple[int, ...], phase: float) -> Tensor:
    k = torch.arange(math.prod(shape), dtype=D64)
    return (1.5 * torch.sin(0.37 * k + phase) + 0.2).reshape(shape)


def test_helpers_golden() -> None:
    assert attention_map(F1).shape == (2, 1, 2, 3)
    assert attention_map(F1).flatten().tolist() == pytest.approx(GOLDEN_AT, abs=1e-12)
    assert normalized_mse(attention_map(F1), A).item() == pytest.approx(GOLDEN_D, abs=1e-12)
    t = shift_target(A)
    assert t.shape == A.shape and t.flatten().tolist() == pytest.approx(GOLDEN_T, abs=1e-12)
    assert t[0, 0, 0, 0] == t[0, 0, 0, 1] == pytest.approx(math.sqrt(31.25) / 2), "the tie at θ must get ν/2"
    # N < 3: no bottom third, every position inverted (ν = 5, â = (0.6, 0.8)).
    small = shift_target(torch.tensor([[[[3.0, 4.0]]]], dtype=D64))
    assert small.flatten().tolist() == pytest.approx([4.4, 4.2], abs=1e-12)
    assert shift_features(F1).flatten().tolist() == pytest.approx(GOLDEN_SHIFT, abs=1e-12)
    got = [warmup_factor(e, 5) for e in range(1, 7)]
    assert got == pytest.approx(GOLDEN_WARMUP, abs=1e-15)
    assert [round(x, 3) for x in got[:5]] == [0.041, 0.165, 0.449, 0.819, 1.0]
    assert warmup_factor(1, 0) == 1.0


def test_loss_terms_golden() -> None:
    f1, f2 = _g((2, 2, 4, 4), 0.1), _g((2, 3, 2, 2), 0.7)
    d1, d2 = _g((2, 2, 4, 4), 1.9).clamp_min(0), _g((2, 3, 2, 2), 2.3).clamp_min(0)
    z_leader, z_fused, z0, z1 = (_g((2, 4), p) for p in (0.2, 1.2, 2.2, 3.2))
    y = torch.tensor([1, 3])
    div = diversity_loss(_g((2, 3, 2, 3), 0.4), _g((2, 3, 2, 3), 1.1))
    assert div.item() == pytest.approx(GOLDEN_TERMS["div"], abs=1e-12)
    assert self_distillation_loss([f1, f2], [d1, d2]).item() == pytest.approx(GOLDEN_TERMS["sd"], abs=1e-12)
    assert decoder_fit_loss([d1, d2], [f1, f2]).item() == pytest.approx(GOLDEN_TERMS["fit"], abs=1e-12)
    # KL terms go through kd_loss, which computes in fp32.
    got = fusion_loss(z_fused, (z0 + z1) / 2, y, 2.0).item()
    assert got == pytest.approx(GOLDEN_TERMS["fusion"], abs=1e-6)
    last, fused = _g((2, 3, 2, 2), 2.9), _g((2, 3, 2, 2), 3.7)
    trans, cat = _g((2, 6, 2, 2), 4.1), _g((2, 6, 2, 2), 5.3)
    terms = leader_terms(z_leader, z_fused, [f1, f2, last], fused, trans, cat, [d1, d2], y, 2.0)
    for key in ("ce", "kd", "fus", "trans"):
        assert terms[key].item() == pytest.approx(GOLDEN_TERMS[key], abs=1e-6), key
    assert terms["sd"].item() == pytest.approx(GOLDEN_TERMS["sd"], abs=1e-12)


def test_goldens_match_the_float64_reference() -> None:
    """Every literal above is what tests/reference/ffsd.py gives on the same float64 inputs."""
    f1_64, a64 = F1.numpy(), A.numpy()
    assert ffsd_ref.attention_map(f1_64).ravel().tolist() == pytest.approx(GOLDEN_AT, abs=1e-12)
    assert ffsd_ref.normalized_mse(ffsd_ref.attention_map(f1_64), a64) == pytest.approx(GOLDEN_D, abs=1e-12)
    assert ffsd_ref.shift_target(a64).ravel().tolist() == pytest.approx(GOLDEN_T, abs=1e-12)
    assert ffsd_ref.shift_target([[[[3.0, 4.0]]]]).ravel().tolist() == pytest.approx([4.4, 4.2], abs=1e-12)  # N < 3
    assert ffsd_ref.shift_features(f1_64).ravel().tolist() == pytest.approx(GOLDEN_SHIFT, abs=1e-12)
    assert [ffsd_ref.warmup_factor(e, 5) for e in range(1, 7)] == pytest.approx(GOLDEN_WARMUP, abs=1e-15)

    def g(shape: tuple[int, ...], phase: float) -> np.ndarray:
        return _g(shape, phase).numpy()

    f1, f2 = g((2, 2, 4, 4), 0.1), g((2, 3, 2, 2), 0.7)
    d1, d2 = np.maximum(g((2, 2, 4, 4), 1.9), 0.0), np.maximum(g((2, 3, 2, 2), 2.3), 0.0)
    z_leader, z_fused, z0, z1 = (g((2, 4), p) for p in (0.2, 1.2, 2.2, 3.2))
    y = [1, 3]
    want = ffsd_ref.leader_terms(
        z_leader, z_fused, [f1, f2, g((2, 3, 2, 2), 2.9)], g((2, 3, 2, 2), 3.7), g((2, 6, 2, 2), 4.1),
        g((2, 6, 2, 2), 5.3), [d1, d2], y, 2.0,
    )  # fmt: skip
    want["div"] = ffsd_ref.diversity_loss(g((2, 3, 2, 3), 0.4), g((2, 3, 2, 3), 1.1))
    assert ffsd_ref.self_distillation_loss([f1, f2], [d1, d2]) == want["sd"]
    want["fit"] = ffsd_ref.decoder_fit_loss([d1, d2], [f1, f2])
    want["fusion"] = ffsd_ref.fusion_loss(z_fused, (z0 + z1) / 2, y, 2.0)
    assert set(want) == set(GOLDEN_TERMS)
    for key, golden in GOLDEN_TERMS.items():
        assert want[key] == pytest.approx(golden, abs=1e-12), key


def _context(shape: tuple[int, int, int] = (1, 16, 16), arch: str = "resnet8", classes: int = 10) -> MethodContext:
    return MethodContext(input_shape=shape, num_classes=classes, student_name=arch)


def _method(seed: int = 0, **params: object) -> FFSD:
    torch.manual_seed(seed)
    method = create_method(
        FFSDParams.model_validate(params), create_model("resnet8", num_classes=10, in_chans=1), None, _context()
    )
    assert isinstance(method, FFSD)
    method.train()
    return method


def _grads(module: nn.Module) -> list[bool]:
    """Per parameter: did it receive a nonzero gradient."""
    return [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in module.parameters()]


def test_gradient_isolation_and_decoder_modes() -> None:
    method = _method(warmup_epochs=0)
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    modes: dict[str, list[tuple[bool, bool]]] = {}
    decoders = {"decoder1": method.decoders[0], "decoder_leader": method.leader_decoder}
    for name, dec in decoders.items():
        dec.register_forward_pre_hook(lambda mod, args, n=name: modes.setdefault(n, []).append(
            (mod.training, torch.is_grad_enabled())
        ))  # fmt: skip
    out = method.losses(x, y)
    # Each decoder: first produces targets (eval, no grad), then is fitted on its owner's features (train, grad).
    assert modes == {name: [(False, False), (True, True)] for name in decoders}
    (out.fusion + out.leader).backward()
    assert not any(_grads(method.students)), "fusion/leader losses must not reach the common students"
    assert all(_grads(method.fusion)) and any(_grads(method.student)) and any(_grads(method.trans_fusion))
    assert not any(_grads(method.decoders)) and not any(_grads(method.leader_decoder))

    method.zero_grad(set_to_none=True)
    out = method.losses(x, y)
    out.leader.backward()
    assert not any(_grads(method.fusion)), "the leader must give nothing back to Φ"
    assert all(_grads(method.trans_fusion)), "the TransFusion head learns from the leader's loss"

    method.zero_grad(set_to_none=True)
    out = method.losses(x, y)
    out.students[1].backward()
    assert not any(_grads(method.students[0])), "student 1's diversity/SD targets come from detached student 0"
    assert any(_grads(method.students[1]))
    assert not any(_grads(method.student)) and not any(_grads(method.fusion)) and not any(_grads(method.decoders))

    method.zero_grad(set_to_none=True)
    out = method.losses(x, y)
    torch.stack(list(out.decoders.values())).sum().backward()
    assert all(_grads(method.decoders)) and all(_grads(method.leader_decoder))
    assert not any(_grads(method.students)) and not any(_grads(method.student)) and not any(_grads(method.fusion))


def test_modules_shapes_on_cifar_resnet8() -> None:
    specs = select_stages(stage_specs(create_model("resnet8", num_classes=100)), "stages")
    assert [(s.channels, s.reduction) for s in specs] == [(16, 1), (32, 2), (64, 4)]
    fusion = FusionModule(64, 2, 100)
    for hw in (8, 5):  # 32x32 CIFAR, and a 20x20 input (adaptive pooling)
        logits, fused = fusion(torch.randn(4, 128, hw, hw))
        assert logits.shape == (4, 100) and fused.shape == (4, 64, hw, hw)
    assert TransFusion(64, 2)(torch.randn(4, 64, 8, 8)).shape == (4, 128, 8, 8)
    decoded = SelfDistillationDecoder(specs)(torch.randn(4, 64, 8, 8))
    assert [tuple(d.shape) for d in decoded] == [(4, 16, 32, 32), (4, 32, 16, 16)]


def test_shapes_and_flow_on_timm_resnet18() -> None:
    torch.manual_seed(0)
    leader = create_model("resnet18", num_classes=10)
    method = FFSD(FFSDParams(), leader, None, _context((3, 64, 64), "resnet18"))
    method.train()
    assert [(s.channels, s.reduction) for s in method.specs] == [(64, 4), (128, 8), (256, 16), (512, 32)]
    with Taps(create_model("resnet18", num_classes=10), method.specs) as taps:
        assert taps.shapes((3, 64, 64)) == [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]
    logits, fused = method.fusion(torch.randn(2, 1024, 2, 2))
    assert logits.shape == (2, 10) and fused.shape == (2, 512, 2, 2)
    assert method.trans_fusion(torch.randn(2, 512, 2, 2)).shape == (2, 1024, 2, 2)
    decoded = method.leader_decoder(torch.randn(2, 512, 2, 2))
    assert [tuple(d.shape) for d in decoded] == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4)]
    # 80x80: taps 20-10-5-3, so the decoder's 3→6 is resized to 5 and Φ pools a 3x3 map.
    for size in (64, 80):
        out = method.losses(torch.randn(2, 3, size, size), torch.tensor([1, 7]))
        assert out.leader_logits.shape == (2, 10) and out.fused_logits.shape == (2, 10)
        losses = [*out.students, out.fusion, out.leader, *out.decoders.values()]
        assert all(torch.isfinite(loss) for loss in losses)


def test_deployable_is_the_plain_leader() -> None:
    assert METHODS.get("ffsd") is FFSD
    method = _method()
    deployed = method.deployable()
    assert deployed is method.student is method.networks()["leader"]
    assert set(method.networks()) == {"student0", "student1", "leader"} and method.deployed_network == "leader"
    assert all(method.network_arch(name) == "resnet8" for name in method.networks())
    fresh = create_model("resnet8", num_classes=10, in_chans=1)
    assert list(deployed.state_dict()) == list(fresh.state_dict())
    assert not any(isinstance(m, (TransFusion, FusionModule, SelfDistillationDecoder)) for m in deployed.modules())
    assert FFSD.teacher_role == "none" and FFSD.manual_optimization


def test_ffsd_trains_the_leader_on_digits(digits: DigitsRun, tmp_path: Path) -> None:
    method = create_method(FFSDParams(), digits.student(seed=5), None, digits.context())
    assert isinstance(method, FFSD)
    result = fit(method, digits.splits, tmp_path, epochs=3, lr=0.1)
    opts = method.own_optimizers()
    assert set(opts) == {"student0", "student1", "fusion", "leader", "decoder1", "decoder_leader"}
    assert isinstance(opts["decoder1"], torch.optim.Adam) and opts["fusion"].param_groups[0]["weight_decay"] == 1e-5
    rows = result.history
    assert [row["lambda_warmup"] for row in rows] == pytest.approx(GOLDEN_WARMUP[:3])
    assert opts["decoder_leader"].param_groups[0]["lr"] == pytest.approx(1e-3 * rows[-1]["lr"] / 0.1)
    losses = [row["train_loss_leader"] for row in rows]
    assert losses[-1] < 0.5 * losses[0], losses
    assert {"eval_top1", "eval_top1_student0", "eval_top1_student1", "train_top1_fusion"} <= set(rows[-1])
    top1 = test_top1(method.deployable(), digits.splits)
    print(f"ffsd digits: leader {top1:.3f}, rows {rows[-1]}, {result.seconds:.1f}s")
    assert top1 > 0.6
    assert rows[-1]["eval_top1_student0"] > 0.6 and rows[-1]["eval_top1_student1"] > 0.6


def test_every_network_total_is_its_weighted_warmed_up_terms(digits: DigitsRun) -> None:
    """Each network's loss (students, Φ, leader, decoders) equals the spec's weighted sum of its terms at a warm-up
    epoch, with the logit terms from the float64 reference: dropping the leader's KD term, swapping λ_fus and λ_div,
    or skipping the warm-up fails here. Distinct λs (not the recipe's) so a swap changes the sum."""
    params = FFSDParams(div_weight=0.3, fus_weight=2.0, sd_weight=5.0, temperature=2.0)
    torch.manual_seed(0)
    method = create_method(params, digits.student(), None, digits.context())
    method.train()
    method.on_epoch_start(1, 10)  # the 2nd (1-based) epoch: λ(e) = λ·exp(−5(1 − 2/5)²)
    ramp = math.exp(-5 * (1 - 2 / 5) ** 2)
    images, targets = next(
        iter(
            BatchLoader(digits.splits.train, batch_size=32, train=False, mean=digits.splits.mean, std=digits.splits.std)
        )
    )
    step = method.losses(images, targets)
    p = step.parts
    tau = 2.0

    def np64(t: Tensor) -> np.ndarray:
        return t.detach().double().numpy()

    with torch.no_grad():
        student_logits = [np64(s(images)) for s in method.students]
    leader, fused = np64(step.leader_logits), np64(step.fused_logits)

    assert p["ce_leader"].item() == pytest.approx(ref.cross_entropy(leader, targets), rel=1e-5)
    assert p["kd_leader"].item() == pytest.approx(ref.kd(leader, fused, tau), rel=1e-5)
    leader_total = p["ce_leader"] + p["kd_leader"] + ramp * 2.0 * (p["fus_leader"] + p["trans_leader"] + p["sd_leader"])
    assert step.leader.item() == pytest.approx(leader_total.item(), rel=1e-5)
    assert p["fus_leader"].item() > 0 and p["kd_leader"].item() > 0

    mean_logits = np.mean(student_logits, axis=0)
    assert step.fusion.item() == pytest.approx(
        ref.cross_entropy(fused, targets) + ref.kd(fused, mean_logits, tau), rel=1e-5
    )

    s0, s1 = student_logits
    assert step.students[0].item() == pytest.approx(ref.cross_entropy(s0, targets) + ref.kd(s0, s1, tau), rel=1e-5)
    own = ref.cross_entropy(s1, targets) + ref.kd(s1, s0, tau)
    diversity = ramp * 0.3 * (p["div_student1"].item() + p["sd_student1"].item())
    assert p["div_student1"].item() > 0 and step.students[1].item() == pytest.approx(own + diversity, rel=1e-5)

    with torch.no_grad():
        maps = method._student_taps[1](images)[1]
        leader_maps = method._leader_taps(images)[1]
        fit_1 = method.decoder_fit(method.decoders[0], maps).item()
        fit_leader = method.decoder_fit(method.leader_decoder, leader_maps).item()
    assert step.decoders["decoder1"].item() == pytest.approx(ramp * 5.0 * fit_1, rel=1e-5)
    assert step.decoders["decoder_leader"].item() == pytest.approx(ramp * 5.0 * fit_leader, rel=1e-5)


def test_fusion_and_trans_fusion_convs_use_the_official_init() -> None:
    """N(0, √(2/n)), n = k²·out_channels, as the official network's init loop gives every conv it owns (PyTorch's
    default would be ~0.07 for the 1x1 and ~0.19 for the depthwise 3x3 here)."""
    torch.manual_seed(0)
    for module in (TransFusion(64, 2), FusionModule(64, 2, 10)):
        convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
        assert len(convs) == 2
        for conv in convs:
            expected = math.sqrt(2.0 / (conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels))
            assert conv.weight.std().item() == pytest.approx(expected, rel=0.1), (type(module).__name__, conv)
