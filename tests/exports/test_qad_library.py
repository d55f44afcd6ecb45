"""The QAD building blocks on their own: BatchNorm folding that keeps the network's class and layer names (so feature
methods and taps still find their layers), kdpipe's ModelOpt int8 config, and 8-bit weights for TensorRT's graph."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

pytest.importorskip("modelopt.torch.quantization", reason="needs nvidia-modelopt (kdpipe[export])")

import kdpipe  # noqa: F401  (registers the CIFAR models with timm)
from kdpipe.exports.qad import (
    conv_bn_pairs,
    fold_batchnorm,
    quantize_model,
    quantizers,
    unquantized_layers,
    with_8bit_weights,
)


def _with_moving_statistics(model: nn.Module) -> nn.Module:
    """BatchNorm statistics and affine parameters away from the identity, so a fold that drops them shows."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.mark.parametrize("name", ["resnet8", "mobilenetv2_x0_5_cifar", "mobilenetv3_small_050"])
def test_batchnorm_folds_into_the_convolutions_in_place(name: str) -> None:
    """Every BatchNorm (timm's BatchNormAct2d, which also applies the activation, included) is folded: the network
    computes the same logits, keeps its class, module names and feature_info, and has no BatchNorm left."""
    model = _with_moving_statistics(timm.create_model(name, num_classes=10))
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    folded = fold_batchnorm(model)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
    assert len(conv_bn_pairs(model)) == bns  # every one of them found its convolution
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert type(folded) is type(model) and getattr(folded, "feature_info", None) == getattr(model, "feature_info", None)
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert convs == {n for n, m in folded.named_modules() if isinstance(m, nn.Conv2d)}
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is left alone


def test_a_batchnorm_that_does_not_follow_a_convolution_is_kept() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    assert conv_bn_pairs(net) == [("3", "4")]
    folded = fold_batchnorm(_with_moving_statistics(net))
    assert isinstance(folded[2], nn.BatchNorm2d) and isinstance(folded[4], nn.Identity)


def test_a_layer_named_like_a_language_model_head_is_still_quantized() -> None:
    """ModelOpt's INT8_DEFAULT_CFG switches quantizers off by LLM module names (``output.*``, ``*router*``); kdpipe's
    config quantizes every Conv/Linear of a vision network whatever its name."""
    net = nn.Sequential()
    net.add_module("router", nn.Conv2d(3, 8, 3))
    net.add_module("pool", nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    net.add_module("output", nn.Linear(8, 4))
    quantized = quantize_model(net, torch.randn(8, 3, 8, 8))
    assert unquantized_layers(quantized) == {}
    assert {"router.weight_quantizer", "output.weight_quantizer", "output.input_quantizer"} <= set(
        quantizers(quantized)
    )


def test_timm_layers_that_subclass_linear_or_conv_are_quantized() -> None:
    """timm students' classifiers are timm's ``Linear`` (a subclass of nn.Linear) and 'same'-padded convolutions are
    ``Conv2dSame``; ModelOpt matches exact classes, so without kdpipe's registration they stay float and the qad stage
    refuses mobilenetv3 (``classifier (Linear)``). Their weights must be fake-quantized in the forward, not just
    wrapped."""
    from timm.layers import Conv2dSame

    torch.manual_seed(0)
    student = timm.create_model("mobilenetv3_small_050", num_classes=10).eval()
    timm_linear = type(student.classifier)
    assert timm_linear is not nn.Linear and issubclass(timm_linear, nn.Linear)
    net = nn.Sequential(
        Conv2dSame(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), timm_linear(8, 10)
    )
    calibration = torch.randn(16, 3, 9, 9)
    quantized = quantize_model(net, calibration, per_channel=False)
    assert unquantized_layers(quantized) == {}
    for layer in (quantized[0], quantized[4]):
        reference = quantized(calibration)
        layer.weight_quantizer.disable()
        unquantized = quantized(calibration)
        layer.weight_quantizer.enable()
        assert not torch.equal(reference, unquantized)  # the weight goes through its quantizer in the forward
    whole = quantize_model(student, torch.randn(8, 3, 32, 32))
    assert unquantized_layers(whole) == {}


@pytest.mark.parametrize("per_channel", [True, False])
def test_seven_bit_weights_are_exported_on_trt_s_eight_bit_grid_as_trained(per_channel: bool) -> None:
    """TensorRT's graph has 8-bit weights; it must compute the weights fine-tuning computed with on the 7-bit grid.
    The latent weights re-quantized at 8 bits are another network (half a 7-bit step off where they sit near a bin's
    edge, which is where fine-tuning leaves many of them)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    calibration = torch.randn(16, 3, 8, 8)
    quantized = quantize_model(net, calibration, weight_bits=7, per_channel=per_channel)
    with torch.no_grad():  # latent weights near the edge of their 7-bit bins, as fine-tuning leaves them
        for layer in (quantized[0], quantized[4]):
            step = layer.weight_quantizer.amax / 63
            step = step.view(-1, *[1] * (layer.weight.ndim - 1)) if per_channel else step
            layer.weight.copy_((torch.round(layer.weight / step) + 0.45) * step)
    assert quantized[0].weight_quantizer.num_bits == 7
    eight = with_8bit_weights(quantized)
    assert eight is not quantized and eight[0].weight_quantizer.num_bits == eight[4].weight_quantizer.num_bits == 8
    assert quantized[0].weight_quantizer.num_bits == 7  # the fine-tuned network is left as it is
    with torch.no_grad():
        for i in (0, 4):
            trained = quantized[i].weight_quantizer(quantized[i].weight)
            # the same values up to float rounding; a re-quantized latent weight is off by up to half a 7-bit step
            torch.testing.assert_close(eight[i].weight_quantizer(eight[i].weight), trained, rtol=0, atol=1e-7)
        torch.testing.assert_close(eight(calibration), quantized(calibration), rtol=0, atol=1e-6)
    assert with_8bit_weights(eight) is eight


def _deployed_conv_weights(quantized: nn.Module, tmp_path: Path, calibration: torch.Tensor) -> list[torch.Tensor]:
    """The convolution weights onnxruntime's int8 layout deploys for a fake-quantized network, as the qad stage
    builds it (its float weights exported, BatchNorm folded by the exporter, then quantized per tensor), dequantized,
    in graph order. 8-bit weights: onnxruntime's symmetric int8 grid (+-127 steps of max/127) is ModelOpt's; its
    reduced range (+-64 steps of max/64) is not quite ModelOpt's 7 bits (+-63 of max/63)."""
    import onnx
    from onnx import numpy_helper

    from kdpipe.exports import export_onnx, quantize_int8
    from kdpipe.exports.onnx import Preprocessing
    from kdpipe.exports.qad import without_quantizers

    pre = Preprocessing(mean=(0.5,) * 3, std=(0.5,) * 3, image_size=8, in_chans=3, channel_order="RGB", classes=("a",))
    export_onnx(without_quantizers(quantized), tmp_path / "fp32.onnx", preprocessing=pre)
    quantize_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", calibration, per_channel=False, reduce_range=False)
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    weights = []
    for node in (n for n in graph.node if n.op_type == "Conv"):
        dq = producer[node.input[1]]
        q, scale, zero = (consts[name] for name in dq.input[:3])
        weights.append(torch.from_numpy((q.astype("float32") - zero.astype("float32")) * scale))
    return weights


@pytest.mark.parametrize("fold", [True, False])
def test_per_tensor_weights_deploy_the_grid_fine_tuning_saw_only_when_batchnorm_is_folded_first(
    fold: bool, tmp_path: Path
) -> None:
    """With one scale per weight tensor, the int8 graph quantizes the BatchNorm-folded weight; fine-tuning must see
    that same grid, hence the qad stage folds first for ``per_channel: false`` (``QADConfig.folds_batchnorm``).
    Numerics of two grids, so synthetic weights and images suffice."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    net = _with_moving_statistics(net)
    with torch.no_grad():
        net[1].weight.copy_(torch.linspace(0.2, 3.0, 8))  # channel scales far apart: the grids differ when unfolded
    calibration = torch.randn(32, 3, 8, 8)
    student = fold_batchnorm(net) if fold else net
    quantized = quantize_model(copy.deepcopy(student), calibration, weight_bits=8, per_channel=False)
    conv, bn = quantized[0], net[1]
    with torch.no_grad():
        trained = conv.weight_quantizer(conv.weight)  # the fake-quantized weight fine-tuning computes with
        if not fold:  # what it amounts to after the BatchNorm that follows it in training
            trained = trained * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(-1, 1, 1, 1)
    deployed = _deployed_conv_weights(quantized, tmp_path, calibration)[0]
    step = float(deployed.abs().max()) / 127
    error = float((deployed - trained).abs().mean())
    if fold:
        assert error < 0.01 * step  # the same grid point for every weight
    else:
        assert error > 0.1 * step  # another grid: off by a quarter of a step on average


def test_the_qdq_export_is_checked_as_written_where_it_computes_what_fake_quantization_did(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``export_qdq_onnx`` checks the graph with onnxruntime's fusions off: its Q/DQ nodes executed literally give
    ModelOpt's fake-quantized logits (here exactly, on a mobilenetv3 with hard-swish and squeeze-excite), so the check
    can be tight and still pass. With the fusions on, integer kernels requantize with their own rounding at every
    layer; on a trained CIFAR-100 mobilenetv3 that moved logits by 3-6 % of their scale and failed the old check."""
    from kdpipe.exports import onnx as onnx_export
    from kdpipe.exports.onnx import Preprocessing
    from kdpipe.exports.qad import QDQ_CHECK_RTOL, export_qdq_onnx
    from kdpipe.exports.runtime import create_onnx_session

    seen: list[bool] = []
    real = onnx_export.create_onnx_session

    def recording(*args: object, **kwargs: object) -> object:
        seen.append(bool(kwargs.get("optimize", True)))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(onnx_export, "create_onnx_session", recording)
    torch.manual_seed(0)
    student = _with_moving_statistics(timm.create_model("mobilenetv3_small_050", num_classes=10))
    calibration = torch.randn(32, 3, 32, 32)
    quantized = quantize_model(fold_batchnorm(student), calibration, weight_bits=8, per_channel=False)
    pre = Preprocessing(mean=(0.5,) * 3, std=(0.5,) * 3, image_size=32, in_chans=3, channel_order="RGB", classes=("a",))
    export_qdq_onnx(quantized, tmp_path / "qdq.onnx", preprocessing=pre)
    assert seen and not any(seen)  # every check session ran the graph as written
    session = create_onnx_session(tmp_path / "qdq.onnx", providers=["CPUExecutionProvider"], optimize=False)
    got = session.run(None, {"input": calibration.numpy()})[0]
    with torch.inference_mode():
        expected = quantized(calibration).numpy()
    assert abs(got - expected).max() <= 1e-4 * abs(expected).max() < QDQ_CHECK_RTOL * abs(expected).max()


def test_the_float_network_for_re_quantization_computes_with_the_fake_quantized_weights() -> None:
    """The qad stage's onnxruntime layout re-quantizes the float network ``without_quantizers`` returns; its weights
    must be the fake-quantized ones fine-tuning computed with, not the latent float weights behind them (which differ
    by rounding everywhere and, beyond the calibrated range, by whatever they drifted while clipped)."""
    from kdpipe.exports.qad import without_quantizers

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    calibration = torch.randn(16, 3, 8, 8)
    quantized = quantize_model(net, calibration, weight_bits=7, per_channel=False)
    with torch.no_grad():
        quantized[0].weight[0, 0, 0, 0] = 10 * quantized[0].weight.abs().max()  # drifted beyond the range: clipped
        expected = {i: quantized[i].weight_quantizer(quantized[i].weight) for i in (0, 4)}
    plain = without_quantizers(quantized)
    assert not quantizers(plain) and quantizers(quantized)  # a copy: the fake-quantized network keeps its quantizers
    for i, weight in expected.items():
        assert torch.equal(plain[i].weight, weight)
        assert not torch.equal(plain[i].weight, quantized[i].weight)


@pytest.mark.parametrize("name", ["resnet8", "mobilenetv3_small_050"])
def test_every_convolution_of_the_export_is_matched_to_its_module(name: str, tmp_path: Path) -> None:
    """The onnxruntime layout finds each Conv/Gemm's quantizers by the node's scope name: attribute levels
    (``conv_dw``) and container children (``blocks.0``, ``downsample.0``, written relative to the container's own
    level) must both resolve to the module that was traced."""
    import onnx

    from kdpipe.exports import export_onnx
    from kdpipe.exports.onnx import Preprocessing
    from kdpipe.exports.qad import onnx_module_name

    model = timm.create_model(name, num_classes=10).eval()
    pre = Preprocessing(mean=(0.5,) * 3, std=(0.5,) * 3, image_size=32, in_chans=3, channel_order="RGB", classes=("a",))
    export_onnx(model, tmp_path / "fp32.onnx", preprocessing=pre)
    nodes = [n for n in onnx.load(str(tmp_path / "fp32.onnx")).graph.node if n.op_type in ("Conv", "Gemm")]
    modules = dict(model.named_modules())
    found = {onnx_module_name(n.name) for n in nodes}
    assert len(found) == len(nodes)  # one module per node
    assert all(isinstance(modules.get(m), (nn.Conv2d, nn.Linear)) for m in found), found
    assert found == {n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))}


def _requantized(
    quantized: nn.Module, tmp_path: Path, calibration: torch.Tensor, per_channel: bool, trained: bool
) -> tuple[Path, Path, dict[str, str]]:
    """The qad stage's onnxruntime layout of a fake-quantized network (7-bit weights): its float export and the int8
    graph, re-quantized with the trained scales or (``trained=False``) recalibrated; and the layers left to
    calibration."""
    from kdpipe.exports import export_onnx, quantize_int8
    from kdpipe.exports.onnx import Preprocessing
    from kdpipe.exports.qad import onnxruntime_overrides, without_quantizers

    chans = calibration.shape[1]
    pre = Preprocessing(
        mean=(0.5,) * chans, std=(0.5,) * chans, image_size=calibration.shape[-1], in_chans=chans,
        channel_order="RGB" if chans == 3 else "L", classes=("a",),
    )  # fmt: skip
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / f"int8-{trained}.onnx"
    export_onnx(without_quantizers(quantized), fp32, preprocessing=pre)
    skipped: dict[str, str] = {}

    def overrides(graph: object) -> dict[str, list[dict[str, object]]]:
        found, left = onnxruntime_overrides(quantized, graph)
        skipped.update(left)
        return found

    quantize_int8(fp32, int8, calibration, per_channel=per_channel, tensor_overrides=overrides if trained else None)
    return fp32, int8, skipped


@pytest.mark.parametrize(
    ("name", "chans", "per_channel"),
    [("mobilenetv3_small_050", 3, True), ("mobilenetv3_small_050", 3, False), ("resnet8", 1, True)],
)
def test_the_onnxruntime_layout_deploys_the_grids_fine_tuning_trained(
    name: str, chans: int, per_channel: bool, tmp_path: Path
) -> None:
    """Re-quantized with the trained scales, every weight of the int8 graph is exactly the value fine-tuning computed
    with (times the BatchNorm the exporter folded in: per-channel weights here fine-tune with BatchNorm unfolded), and
    every layer input is quantized on ModelOpt's grid: amax / 127 steps, zero point 128 (0 after a Relu, which
    onnxruntime folds into the quantization). Recalibrated, neither holds. Covers hard-swish and squeeze-excite
    (mobilenetv3), a Relu-fed classifier, shortcut convolutions and a zero-padded 1-channel stem (resnet8)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from kdpipe.exports.qad import onnx_module_name

    torch.manual_seed(0)
    model = _with_moving_statistics(timm.create_model(name, num_classes=10, in_chans=chans))
    if not per_channel:
        model = fold_batchnorm(model)  # as the qad stage does for one scale per weight tensor
    calibration = torch.randn(64, chans, 32, 32)
    quantized = quantize_model(model, calibration, weight_bits=7, per_channel=per_channel)
    fp32_path, int8_path, skipped = _requantized(quantized, tmp_path, calibration, per_channel, trained=True)
    assert skipped == {}
    _, recalibrated_path, _ = _requantized(quantized, tmp_path, calibration, per_channel, trained=False)
    fp32 = onnx.load(str(fp32_path)).graph
    fp32_consts = {i.name: numpy_helper.to_array(i) for i in fp32.initializer}
    fp32_producer = {o: n for n in fp32.node for o in n.output}
    float_weights, relu_fed = {}, {}
    for node in (n for n in fp32.node if n.op_type in ("Conv", "Gemm")):
        float_weights[node.name] = fp32_consts[node.input[1]]
        source = fp32_producer.get(node.input[0])
        while source is not None and source.op_type in ("Flatten", "Pad"):
            source = fp32_producer.get(source.input[0])
        relu_fed[node.name] = source is not None and source.op_type == "Relu"
    assert any(relu_fed.values()) and not all(relu_fed.values())
    modules = dict(quantized.named_modules())

    def grids(path: Path) -> tuple[float, float, int]:
        """Largest weight error (in steps of the int8 grid), largest input-scale error (relative to the trained step)
        and how many inputs have another zero point than the trained grid's."""
        graph = onnx.load(str(path)).graph
        consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        producer = {o: n for n in graph.node for o in n.output}
        weight_error = scale_error = 0.0
        zero_errors = 0
        convs = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
        assert len(convs) == len(float_weights)
        for node in convs:
            module = modules[onnx_module_name(node.name)]
            dq = producer[node.input[1]]
            q, scale, zero = (consts[i] for i in dq.input[:3])
            shape = [-1] + [1] * (q.ndim - 1) if scale.ndim else []
            weight = (q.astype(np.float64) - zero.astype(np.float64).reshape(shape)) * scale.reshape(shape)
            expected = float_weights[node.name]
            weight = weight[:, : expected.shape[1]]  # the padded stem's extra input channels are zero
            weight_error = max(weight_error, float((np.abs(weight - expected) / scale.reshape(shape)).max()))
            dq_in = producer[node.input[0]]
            in_scale, in_zero = consts[dq_in.input[1]], consts[dq_in.input[2]]
            step = float(module.input_quantizer.amax) / 127
            scale_error = max(scale_error, abs(float(in_scale) / step - 1))
            # the signed grid's zero point; 0 where onnxruntime folded a Relu into the quantization
            zero_errors += int(in_zero) != (0 if relu_fed[node.name] else 128)
        return weight_error, scale_error, zero_errors

    weight_error, scale_error, zero_errors = grids(int8_path)
    # every weight a point of the grid it trained on, every layer input on its trained grid
    assert weight_error < 1e-3 and scale_error < 1e-6 and zero_errors == 0
    old_weight_error, old_scale_error, old_zero_errors = grids(recalibrated_path)
    assert old_weight_error > 0.1 and old_scale_error > 0.01 and old_zero_errors > 0  # onnxruntime's own grids


def test_a_relu6_input_keeps_onnxruntime_s_range_which_does_the_clipping(tmp_path: Path) -> None:
    """onnxruntime drops each Clip (ReLU6) before a quantized layer and clips by that tensor's quantization range; the
    trained grid (amax / 127, zero point 128) would let negative values through. Those inputs stay calibrated (and
    are listed), the weights still keep their trained grid, and the graph as written stays at least as close to the
    fake-quantized network as the recalibrated one (with the trained grid there: logits off by 1.6 of their scale,
    argmax agreement 0.62)."""
    from kdpipe.exports.runtime import create_onnx_session

    torch.manual_seed(0)
    model = _with_moving_statistics(timm.create_model("mobilenetv2_050", num_classes=10))  # timm's: ReLU6
    calibration = torch.randn(64, 3, 32, 32)
    quantized = quantize_model(model, calibration, weight_bits=7, per_channel=True)
    images = torch.randn(128, 3, 32, 32)
    with torch.no_grad():
        expected = quantized(images).numpy()
    errors = {}
    for trained in (True, False):
        _, int8, skipped = _requantized(quantized, tmp_path, calibration, True, trained)
        session = create_onnx_session(int8, providers=["CPUExecutionProvider"], optimize=False)
        got = session.run(None, {"input": images.numpy()})[0]
        errors[trained] = float(abs(got - expected).max() / abs(expected).max())
        if trained:
            assert skipped and all("input made by a Clip" in reason for reason in skipped.values())
            assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.95
    assert errors[True] <= errors[False]
