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
from tests.models.param_counts import ARCHITECTURE_PARAMS

MODELS = list_kdpipe_models()

# Published parameter counts (millions) with a 100-class head.
# ResNets and WRNs: the CIFAR-100 tables of CRD (Tian et al., ICLR 2020, arXiv:1910.10699) and DKD/mdistiller
# (Zhao et al., CVPR 2022, arXiv:2203.08679), as collected in shared/methods/baselines.md.
# 0.5MobileNetV2 (CRD's mobile_half) and WRN-16-8: SwitOKD (Qi et al., ECCV 2022) Table 4, quoted in
# shared/methods/online.md (WRN-16-8's 11.0M is a CIFAR-10 figure; a 100-class head adds 46k, 0.4%).
# VGG8/VGG13 (with BN), ShuffleNetV1/V2 and CRD's ResNet50 (100-class heads): the sizes the KD literature quotes for
# these CRD-benchmark nets, as listed in the "CIFAR model zoo" issue (not yet collected in shared/methods).
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
    "wrn_16_8": 11.0,
    "vgg8_cifar": 3.96,
    "vgg13_cifar": 9.46,
    "shufflenet_v1": 0.95,
    "shufflenet_v2": 1.36,
    "resnet50_cifar": 23.7,
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


# Shapes of some parameters and buffers of the CRD/mdistiller checkpoints, read off the reference layout: a key
# present with another shape would still refuse to load.
REFERENCE_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {
    "wrn_16_8": {
        "block1.layer.0.convShortcut.weight": (128, 16, 1, 1),
        "block3.layer.1.conv2.weight": (512, 512, 3, 3),
    },
    "vgg8_cifar": {"block0.0.bias": (64,), "block3.0.weight": (512, 256, 3, 3), "block4.1.running_var": (512,)},
    "vgg13_cifar": {
        "block0.0.weight": (64, 3, 3, 3),
        "block0.4.running_mean": (64,),  # conv 0, BN 1, ReLU 2, conv 3, BN 4
        "block4.3.weight": (512, 512, 3, 3),
        "classifier.weight": (100, 512),
    },
    "shufflenet_v1": {
        "conv1.weight": (24, 3, 1, 1),
        "layer1.0.conv1.weight": (54, 24, 1, 1),  # dense: the first block after the stem
        "layer1.0.conv3.weight": (216, 18, 1, 1),  # 240 - 24 channels, 3 groups
        "layer2.0.conv1.weight": (60, 80, 1, 1),
        "layer3.3.bn3.running_var": (960,),
        "linear.weight": (100, 960),
    },
    "shufflenet_v2": {
        "conv1.weight": (24, 3, 1, 1),
        "layer1.0.conv1.weight": (24, 1, 3, 3),
        "layer1.0.conv5.weight": (58, 58, 1, 1),
        "layer2.7.conv3.weight": (116, 116, 1, 1),
        "conv2.weight": (1024, 464, 1, 1),
        "bn2.running_mean": (1024,),
        "linear.weight": (100, 1024),
    },
    "resnet50_cifar": {
        "conv1.weight": (64, 3, 3, 3),
        "layer1.0.shortcut.0.weight": (256, 64, 1, 1),
        "layer4.0.shortcut.1.running_var": (2048,),
        "layer4.2.conv3.weight": (2048, 512, 1, 1),
        "linear.weight": (100, 2048),
    },
}


@pytest.mark.parametrize("name", sorted(REFERENCE_SHAPES))
def test_reference_checkpoint_shapes(name: str) -> None:
    state = _create(name).state_dict()
    assert {key: tuple(state[key].shape) for key in REFERENCE_SHAPES[name] if key in state} == REFERENCE_SHAPES[name]


def test_no_timm_model_is_replaced() -> None:
    # Where timm has a model of the literature's name, kdpipe's carries a suffix: timm's entry stays timm's.
    for name in ("resnet50", "vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg19_bn"):
        assert timm.models.model_entrypoint(name).__module__.startswith("timm.models."), name
    assert {"resnet50", "vgg8", "vgg13"}.isdisjoint(MODELS)
    assert all(timm.models.model_entrypoint(name).__module__.startswith("kdpipe.models.") for name in MODELS)


def test_vgg_block_output_is_preactivation() -> None:
    # The tap ReLUs are not in-place: a hook on a block keeps its pre-activation map (what OFD-style methods read).
    model = _create("vgg8_cifar")
    captured: list[torch.Tensor] = []
    model.get_submodule("block3").register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.no_grad():
        tap = model.forward_intermediates(torch.randn(2, 3, 32, 32), indices=[3], intermediates_only=True)[0]
    assert captured[0].min() < 0
    torch.testing.assert_close(tap, captured[0].relu())


def test_timm_create_model_after_import_kdpipe() -> None:
    code = "import kdpipe, timm; m = timm.create_model('resnet8x4'); print(m.num_classes, type(m).__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["100", "CifarResNet"]


# One net per block family (basic, bottleneck, pre-activation, VGG, inverted residual, ShuffleNet V1 and V2), so
# every op kdpipe's nets use goes through the exporter: channel shuffle, concatenation, max-pool, biased convs.
ONNX_MODELS = [
    "resnet8x4",
    "resnet50_cifar",
    "wrn_16_8",
    "vgg8_cifar",
    "mobilenetv2_x0_5_cifar",
    "shufflenet_v1",
    "shufflenet_v2",
]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", ONNX_MODELS)
def test_onnx_export_matches_torch(name: str) -> None:
    ort = pytest.importorskip("onnxruntime")
    model = _create(name)
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
