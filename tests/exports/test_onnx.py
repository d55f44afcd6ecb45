"""ONNX export: the checker passes, metadata round-trips, and the batch dimension is symbolic AND works."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch
from torch import nn

import kdpipe  # registers resnet8 with timm
import kdpipe.exports.onnx as export_module
from kdpipe.errors import ConfigError, ExportError
from kdpipe.exports import (
    Preprocessing,
    check_opset,
    create_onnx_session,
    export_onnx,
    read_metadata,
    read_preprocessing,
    run_onnx,
    supported_opsets,
)

GRAY = Preprocessing(
    mean=(0.3,), std=(0.4,), image_size=16, in_chans=1, channel_order="L", classes=tuple(str(d) for d in range(10))
)
RGB = Preprocessing(
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.247, 0.243, 0.261),
    image_size=32,
    in_chans=3,
    channel_order="RGB",
    classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
)


def make_model(pre: Preprocessing) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet8", num_classes=len(pre.classes), in_chans=pre.in_chans).eval()


def torch_logits(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return model(x).numpy()


@pytest.mark.parametrize("pre", [GRAY, RGB], ids=["1x16x16", "3x32x32"])
def test_dynamic_export_is_checked_symbolic_and_runs_batch_1_and_8(pre: Preprocessing, tmp_path: Path) -> None:
    model = make_model(pre)
    path = tmp_path / "model.onnx"
    result = export_onnx(model, path, preprocessing=pre, metadata={"run": "abc123"})

    assert result.checked_batches == (1, 8)
    assert result.dynamic_batch and result.opset == 18 and result.size_bytes == path.stat().st_size
    loaded = onnx.load(str(path))
    onnx.checker.check_model(loaded, full_check=True)
    # The batch dimension is declared symbolic on both ends of the graph...
    assert loaded.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert loaded.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [d.dim_value for d in loaded.graph.input[0].type.tensor_type.shape.dim[1:]] == [
        pre.in_chans,
        16 if pre is GRAY else 32,
        16 if pre is GRAY else 32,
    ]
    # ...and really works: onnxruntime at batch 1 and 8 matches torch on the same images.
    session = create_onnx_session(path, providers=["CPUExecutionProvider"], threads=1)
    for batch in (1, 8):
        x = torch.randn(batch, pre.in_chans, pre.image_size, pre.image_size)
        got = session.run(None, {"input": x.numpy()})[0]
        np.testing.assert_allclose(got, torch_logits(model, x), rtol=1e-4, atol=1e-5)

    meta = read_metadata(path)
    assert meta["run"] == "abc123"
    assert meta["kdpipe.version"] == kdpipe.__version__
    assert meta["kdpipe.input_name"] == "input" and meta["kdpipe.output_name"] == "logits"
    assert meta["kdpipe.precision"] == "fp32" and meta["kdpipe.dynamic_batch"] == "true"
    assert read_preprocessing(path) == pre


def test_export_leaves_the_callers_model_alone(tmp_path: Path) -> None:
    model = make_model(GRAY).train()
    export_onnx(model, tmp_path / "m.onnx", preprocessing=GRAY, simplify=False)
    assert model.training
    assert next(model.parameters()).dtype == torch.float32


def test_static_export_rejects_other_batch_sizes(tmp_path: Path) -> None:
    model = make_model(GRAY)
    path = tmp_path / "static.onnx"
    result = export_onnx(model, path, preprocessing=GRAY, dynamic_batch=False)

    assert result.checked_batches == (1,) and not result.dynamic_batch
    assert onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    session = create_onnx_session(path, providers=["CPUExecutionProvider"], threads=1)
    with pytest.raises(Exception, match=r"(?i)dimension|shape"):
        session.run(None, {"input": np.zeros((8, 1, 16, 16), np.float32)})
    # run_onnx feeds a static graph one image at a time, so any number of images still works.
    x = torch.randn(5, 1, 16, 16)
    np.testing.assert_allclose(run_onnx(session, x, batch_size=4), torch_logits(model, x), rtol=1e-4, atol=1e-5)


def test_simplification_on_and_off_give_equal_outputs(tmp_path: Path) -> None:
    model = make_model(RGB)
    plain = export_onnx(model, tmp_path / "plain.onnx", preprocessing=RGB, simplify=False)
    slim = export_onnx(model, tmp_path / "slim.onnx", preprocessing=RGB, simplify=True)
    assert not plain.simplified and slim.simplified
    x = torch.randn(8, 3, 32, 32)
    a = run_onnx(create_onnx_session(plain.path, threads=1), x, batch_size=8)
    b = run_onnx(create_onnx_session(slim.path, threads=1), x, batch_size=8)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert "Identity" not in {n.op_type for n in onnx.load(str(slim.path)).graph.node}


def test_simplifier_that_changes_outputs_or_fails_is_discarded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import onnxslim

    real_slim = onnxslim.slim

    def corrupting_slim(model: onnx.ModelProto) -> onnx.ModelProto:
        out = real_slim(model)
        weight = next(t for t in out.graph.initializer if len(t.dims) == 4)
        weight.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(weight) * -1.0, weight.name))
        return out

    model = make_model(GRAY)
    monkeypatch.setattr(onnxslim, "slim", corrupting_slim)
    with caplog.at_level(logging.WARNING, logger="kdpipe.exports.onnx"):
        result = export_onnx(model, tmp_path / "a.onnx", preprocessing=GRAY)
    assert not result.simplified
    assert "changed the outputs" in caplog.text

    def failing_slim(model: onnx.ModelProto) -> onnx.ModelProto:
        raise RuntimeError("boom")

    monkeypatch.setattr(onnxslim, "slim", failing_slim)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdpipe.exports.onnx"):
        result = export_onnx(model, tmp_path / "b.onnx", preprocessing=GRAY)
    assert not result.simplified and "boom" in caplog.text


def test_opset_outside_the_supported_range_is_a_config_error(tmp_path: Path) -> None:
    low, high = supported_opsets()
    assert low <= 18 <= high
    check_opset(low)
    check_opset(high)
    for bad in (low - 1, high + 1):
        with pytest.raises(ConfigError, match=f"{low}\\.\\.{high}"):
            check_opset(bad)
    with pytest.raises(ConfigError, match="opset 99"):
        export_onnx(make_model(GRAY), tmp_path / "m.onnx", preprocessing=GRAY, opset=99)
    assert not (tmp_path / "m.onnx").exists()


class ConstantBatchNet(nn.Module):
    """Reads the batch size as a Python int: the trace bakes the example's batch into a Reshape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = int(x.shape[0])
        return self.fc(self.conv(x).reshape(n, -1))


def test_a_batch_dimension_that_only_looks_symbolic_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.onnx"
    # Shape inference already sees the constant batch in the graph's declared output...
    with pytest.raises(ExportError, match="dimension 0 is 2, expected batch"):
        export_onnx(ConstantBatchNet(), path, preprocessing=GRAY, simplify=False)
    # ...and without that static check, running onnxruntime at batch 1 and 8 catches it all the same.
    monkeypatch.setattr(export_module, "_check_io", lambda *args: None)
    with pytest.raises(ExportError, match="batch") as err:
        export_onnx(ConstantBatchNet(), path, preprocessing=GRAY, simplify=False)
    assert err.value.hint
    assert not path.exists()


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        return y.mean((2, 3)), y.amax((2, 3))


def test_a_model_with_two_outputs_is_an_export_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="outputs"):
        export_onnx(TwoHeads(), tmp_path / "m.onnx", preprocessing=GRAY)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mean": (0.5, 0.5)}, "one value per channel"),
        ({"std": (0.0,)}, "std must be > 0"),
        ({"channel_order": "RGB"}, "must be 'L'"),
        ({"layout": "NHWC"}, "NCHW"),
    ],
)
def test_preprocessing_is_validated(kwargs: dict[str, object], match: str) -> None:
    fields = {
        "mean": (0.5,),
        "std": (0.5,),
        "image_size": 16,
        "in_chans": 1,
        "channel_order": "L",
        "classes": ("a", "b"),
        **kwargs,
    }
    with pytest.raises(ConfigError, match=match):
        Preprocessing(**fields)  # type: ignore[arg-type]


def test_caller_metadata_may_not_overwrite_kdpipe_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="reserved"):
        export_onnx(make_model(GRAY), tmp_path / "m.onnx", preprocessing=GRAY, metadata={"kdpipe.version": "9"})


def test_missing_model_file_is_an_export_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="does not exist"):
        create_onnx_session(tmp_path / "absent.onnx")
    with pytest.raises(ConfigError, match="not available"):
        create_onnx_session(tmp_path / "absent.onnx", providers=["NoSuchExecutionProvider"])


def _ill_conditioned_net() -> nn.Module:
    """Convs whose BatchNorm statistics are far from their activations' (as right after the first training step):
    each layer multiplies the scale, so float32 rounding grows until the logits are visibly off the exact ones."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(6):
        bn = nn.BatchNorm2d(8)
        bn.running_var.fill_(1e-3)
        layers += [nn.Conv2d(8, 8, 3, padding=1, bias=False), bn, nn.ReLU()]
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), *layers, nn.Flatten(), nn.Linear(8 * 8 * 8, 4)).eval()


def test_rounding_of_an_ill_conditioned_net_is_told_apart_from_a_wrong_graph(caplog: pytest.LogCaptureFixture) -> None:
    net = _ill_conditioned_net()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = net(x).numpy()
        exact = net.double()(x.double()).numpy()
    net.float()
    torch_err = float(np.abs(expected - exact).max())
    assert torch_err > 0  # float32 rounding is visible
    # an onnxruntime result as far from the exact logits as torch's own, on the other side: rounding
    mirrored = (exact - (expected - exact)).astype(np.float32)
    diff = float(np.abs(mirrored - expected).max())
    with caplog.at_level(logging.WARNING):
        assert export_module._within_float32_error(net, x, mirrored, expected, diff, 0.0)
    assert "ill-conditioned" in caplog.text
    # a wrong graph (one logit off by a little more than the allowed factor of torch's error): refused
    wrong = expected.copy()
    wrong[0, 1] += (export_module._FP32_ERROR_FACTOR + 1) * torch_err + 1e-6
    assert not export_module._within_float32_error(net, x, wrong, expected, float(np.abs(wrong - expected).max()), 0.0)
    assert next(net.parameters()).dtype == torch.float32  # the check ran on a copy
