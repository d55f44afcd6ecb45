"""Every architecture kdpipe registers into timm: size, shapes, timm integration, feature taps, ONNX export."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch

import kdpipe  # noqa: F401  (registers the CIFAR models into timm)
from kdpipe.models import count_params, list_kdpipe_models

MODELS = list_kdpipe_models()

# Published parameter counts (millions) with a 100-class head.
# ResNets and WRNs: the CIFAR-100 tables of CRD (Tian et al., ICLR 2020, arXiv:1910.10699) and DKD/mdistiller
# (Zhao et al., CVPR 2022, arXiv:2203.08679), as collected in shared/methods/baselines.md.
# 0.5MobileNetV2 (CRD's mobile_half): SwitOKD (Qi et al., ECCV 2022) Table 4, quoted in shared/methods/online.md.
PUBLISHED_PARAMS_M = {
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "resnet20": 0.28,
    "resnet32": 0.47,
    "resnet56": 0.86,
    "resnet110": 1.74,
    "wrn_40_2": 2.25,
    "wrn_16_2": 0.70,
    "wrn_40_1": 0.57,
    "mobilenetv2_x0_5_cifar": 0.81,
}


def _resnet_params(depth: int, widths: tuple[int, int, int, int], classes: int = 100) -> int:
    """Closed-form count: 3x3 stem conv + BN, basic blocks (two 3x3 conv + BN, 1x1 conv + BN shortcut when the
    width changes), linear head."""
    n = (depth - 2) // 6
    total = 9 * 3 * widths[0] + 2 * widths[0]
    c_in = widths[0]
    for w in widths[1:]:
        for _ in range(n):
            total += 9 * c_in * w + 2 * w + 9 * w * w + 2 * w
            total += (c_in * w + 2 * w) if c_in != w else 0
            c_in = w
    return total + c_in * classes + classes


def _wrn_params(depth: int, k: int, classes: int = 100) -> int:
    """Closed-form count: 3x3 stem conv, pre-activation blocks (BN, 3x3 conv, BN, 3x3 conv, bias-free 1x1
    shortcut when the width changes), final BN, linear head."""
    n = (depth - 4) // 6
    total = 9 * 3 * 16
    c_in = 16
    for w in (16 * k, 32 * k, 64 * k):
        for _ in range(n):
            total += 2 * c_in + 9 * c_in * w + 2 * w + 9 * w * w + (c_in * w if c_in != w else 0)
            c_in = w
    return total + 2 * c_in + c_in * classes + classes


def _mobilenetv2_half_params(classes: int = 100) -> int:
    """Closed-form count: stem 3x3 conv to 16 + BN; per block 1x1 expand + BN, 3x3 depthwise + BN, 1x1 project
    + BN (the t=1 block keeps its 1x1 expand); 1x1 conv to 1280 + BN; linear head."""
    total = 9 * 3 * 16 + 2 * 16
    c_in = 16
    for t, c, n in ((1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1)):
        for _ in range(n):
            hidden = c_in * t
            total += c_in * hidden + 2 * hidden + 9 * hidden + 2 * hidden + hidden * (c // 2) + 2 * (c // 2)
            c_in = c // 2
    return total + c_in * 1280 + 2 * 1280 + 1280 * classes + classes


ARCHITECTURE_PARAMS = {
    **{f"resnet{d}": _resnet_params(d, (16, 16, 32, 64)) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": _resnet_params(8, (32, 64, 128, 256)),
    "resnet32x4": _resnet_params(32, (32, 64, 128, 256)),
    **{f"wrn_{d}_{k}": _wrn_params(d, k) for d in (16, 40) for k in (1, 2)},
    "mobilenetv2_x0_5_cifar": _mobilenetv2_half_params(),
}


def _create(name: str, **kwargs: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).eval()


def test_registered_set() -> None:
    assert set(MODELS) == set(ARCHITECTURE_PARAMS)
    assert set(PUBLISHED_PARAMS_M) <= set(MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_param_count_matches_architecture(name: str) -> None:
    assert count_params(_create(name)) == ARCHITECTURE_PARAMS[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS_M))
def test_param_count_matches_published(name: str) -> None:
    published = PUBLISHED_PARAMS_M[name] * 1e6
    assert abs(count_params(_create(name)) - published) <= 0.01 * published


@pytest.mark.parametrize("name", MODELS)
def test_forward_shapes_and_head(name: str) -> None:
    model = _create(name)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (2, 100)
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, model.num_features)
    assert model.num_classes == 100


@pytest.mark.parametrize("name", MODELS)
def test_grayscale_16px_input(name: str) -> None:
    model = _create(name, in_chans=1, num_classes=10)
    with torch.no_grad():
        assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)


@pytest.mark.parametrize("name", MODELS)
def test_features_only_matches_feature_info(name: str) -> None:
    model = _create(name)
    features = _create(name, features_only=True)  # same seed, so the same weights as ``model``
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps = features(x)
        final, intermediates = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
    info = model.feature_info
    assert [m.shape[1] for m in maps] == [d["num_chs"] for d in info] == features.feature_info.channels()
    assert [32 // m.shape[-1] for m in maps] == [d["reduction"] for d in info] == features.feature_info.reduction()
    for fm, im in zip(maps, intermediates, strict=True):
        torch.testing.assert_close(fm, im)


@pytest.mark.parametrize("name", MODELS)
def test_forward_hooks_fire_on_feature_modules(name: str) -> None:
    model = _create(name)
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for entry in model.feature_info:

        def hook(_m: torch.nn.Module, _i: object, out: torch.Tensor, key: str = entry["module"]) -> None:
            captured[key] = out.detach().clone()

        handles.append(model.get_submodule(entry["module"]).register_forward_hook(hook))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
        taps = model.forward_intermediates(x, intermediates_only=True)
    for h in handles:
        h.remove()
    assert list(captured) == [d["module"] for d in model.feature_info]
    for entry, tap in zip(model.feature_info, taps, strict=True):
        torch.testing.assert_close(captured[entry["module"]], tap)


@pytest.mark.parametrize("name", MODELS)
def test_forward_intermediates_selection(name: str) -> None:
    model = _create(name)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        every = model.forward_intermediates(x, intermediates_only=True)
        first = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
    torch.testing.assert_close(first[0], every[0])
    assert [t.shape for t in last_two] == [t.shape for t in every[-2:]]


@pytest.mark.parametrize("name", MODELS)
def test_reset_classifier(name: str) -> None:
    model = _create(name)
    model.reset_classifier(10)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (2, 10)
        assert model.num_classes == 10
        model.reset_classifier(0)
        assert model(x).shape == (2, model.num_features)


@pytest.mark.parametrize("name", MODELS)
def test_pretrained_cfg(name: str) -> None:
    model = _create(name)
    cfg = model.pretrained_cfg
    assert cfg["num_classes"] == 100
    assert tuple(cfg["input_size"]) == (3, 32, 32)
    assert tuple(cfg["mean"]) == (0.5071, 0.4865, 0.4409)
    assert tuple(cfg["std"]) == (0.2673, 0.2564, 0.2762)
    assert not cfg["url"]
    # timm adapts these two when loading a file with another in_chans/num_classes: they must be real modules.
    assert isinstance(model.get_submodule(cfg["first_conv"]), torch.nn.Conv2d)
    assert isinstance(model.get_submodule(cfg["classifier"]), torch.nn.Linear)


@pytest.mark.parametrize(
    ("name", "keys"),
    [
        ("resnet8x4", ["conv1.weight", "layer1.0.downsample.0.weight", "layer3.0.bn2.running_var", "fc.weight"]),
        ("wrn_40_2", ["conv1.weight", "block1.layer.0.convShortcut.weight", "block3.layer.5.conv2.weight", "bn1.bias"]),
        (
            "mobilenetv2_x0_5_cifar",
            ["conv1.0.weight", "blocks.0.0.conv.0.weight", "conv2.1.bias", "classifier.0.weight"],
        ),
    ],
)
def test_reference_checkpoint_layout(name: str, keys: list[str]) -> None:
    # Parameter names follow CRD/mdistiller, so their published teacher checkpoints load unchanged.
    assert set(keys) <= set(_create(name).state_dict())


def test_timm_create_model_after_import_kdpipe() -> None:
    code = "import kdpipe, timm; m = timm.create_model('resnet8x4'); print(m.num_classes, type(m).__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["100", "CifarResNet"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_onnx_export_matches_torch() -> None:
    ort = pytest.importorskip("onnxruntime")
    model = _create("resnet8x4")
    buffer = io.BytesIO()
    torch.onnx.export(
        model,
        (torch.randn(1, 3, 32, 32),),
        buffer,
        dynamo=False,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 3, 32, 32)
    (onnx_out,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        torch_out = model(x).numpy()
    assert onnx_out.shape == (4, 100)
    np.testing.assert_allclose(onnx_out, torch_out, atol=1e-4, rtol=0)
