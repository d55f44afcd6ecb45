"""int8 (QDQ) and fp16 conversions of the trained digits model: accuracy kept, graph and metadata as promised."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kdpipe.errors import ConfigError, DataError, ExportError
from kdpipe.exports import (
    check_onnx_for_tensorrt,
    convert_fp16,
    count_qdq_nodes,
    create_onnx_runner,
    create_onnx_session,
    export_onnx,
    measure_parity,
    quantize_int8,
    read_metadata,
)
from tests.exports.conftest import Digits


@pytest.fixture(scope="module")
def fp32_onnx(digits: Digits, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("quantize") / "digits.onnx"
    export_onnx(digits.model, path, preprocessing=digits.preprocessing, metadata={"run": "r1"})
    return path


@pytest.fixture(scope="module")
def int8_onnx(digits: Digits, fp32_onnx: Path) -> Path:
    return quantize_int8(fp32_onnx, fp32_onnx.with_name("digits.int8.onnx"), digits.train_images[:256])


def test_int8_keeps_top1_within_two_points_and_is_qdq(digits: Digits, fp32_onnx: Path, int8_onnx: Path) -> None:
    counts = count_qdq_nodes(int8_onnx)
    assert counts["QuantizeLinear"] > 0 and counts["DequantizeLinear"] > 0
    assert count_qdq_nodes(fp32_onnx) == {"QuantizeLinear": 0, "DequantizeLinear": 0}

    report = measure_parity(
        digits.model, create_onnx_runner(int8_onnx, threads=1), digits.val_images, digits.val_labels
    )
    assert report.torch_top1 > 0.9
    assert abs(report.top1_drop) <= 0.02
    assert report.top1_agreement >= 0.97

    meta, source = read_metadata(int8_onnx), read_metadata(fp32_onnx)
    assert meta["kdpipe.precision"] == "int8" and meta["run"] == "r1"
    assert {k: v for k, v in meta.items() if k.startswith("kdpipe.preprocessing.")} == {
        k: v for k, v in source.items() if k.startswith("kdpipe.preprocessing.")
    }
    settings = json.loads(meta["kdpipe.quantization"])
    assert settings["format"] == "QDQ" and settings["activations"].startswith("uint8")
    assert settings["calibration_images"] == 256
    # The batch dimension stays symbolic through quantization.
    assert create_onnx_session(int8_onnx, threads=1).get_inputs()[0].shape[0] == "batch"


def test_single_channel_stem_reads_a_zero_padded_input_with_the_same_result(
    digits: Digits, fp32_onnx: Path, int8_onnx: Path
) -> None:
    import onnx

    padded = onnx.load(str(int8_onnx))
    (pad,) = [n for n in padded.graph.node if n.op_type == "Pad"]
    assert pad.name == "kdpipe_stem_channel_pad" and pad.input[0].startswith("input")
    assert json.loads(read_metadata(int8_onnx)["kdpipe.quantization"])["stem_channel_pad"] == 4

    plain = quantize_int8(
        fp32_onnx, fp32_onnx.with_name("digits.int8-plain.onnx"), digits.train_images[:256], pad_stem_channels=None
    )
    assert not [n for n in onnx.load(str(plain)).graph.node if n.op_type == "Pad"]
    assert "stem_channel_pad" not in json.loads(read_metadata(plain)["kdpipe.quantization"])
    # Same calibration, same ranges: the zero channels change nothing but the kernel onnxruntime picks.
    images = digits.val_images.numpy()
    a = create_onnx_runner(int8_onnx, threads=1)(images)
    b = create_onnx_runner(plain, threads=1)(images)
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.99
    assert abs(a - b).max() < 0.05 * abs(b).max()
    # TensorRT's symmetric int8 graph is left as exported.
    trt = quantize_int8(
        fp32_onnx, fp32_onnx.with_name("digits.int8-trt.onnx"), digits.train_images[:64], activation_type="int8"
    )
    assert not [n for n in onnx.load(str(trt)).graph.node if n.op_type == "Pad"]


def test_onnxruntime_int8_kernels_compute_what_the_qdq_graph_says(
    digits: Digits, fp32_onnx: Path, int8_onnx: Path
) -> None:
    """The fused integer kernels against the same QDQ graph run op by op in float (graph optimisations off).

    On x86 CPUs without VNNI, 8-bit weights saturate onnxruntime's 16-bit u8 x s8 intermediates (logits 0.8-7.5
    off here); the default 7-bit weights keep the kernels within rounding of the graph on every CPU.
    """
    import onnxruntime as ort

    def run(optimise: bool) -> np.ndarray:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimise else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        session = ort.InferenceSession(str(int8_onnx), options, providers=["CPUExecutionProvider"])
        return session.run(None, {"input": digits.val_images.numpy()})[0]

    assert json.loads(read_metadata(int8_onnx)["kdpipe.quantization"])["reduce_range"] is True
    fused, reference = run(True), run(False)
    assert (fused.argmax(1) == reference.argmax(1)).mean() == 1.0
    assert abs(fused - reference).max() < 0.02 * abs(reference).max()
    trt = quantize_int8(
        fp32_onnx, fp32_onnx.with_name("digits.int8-trt8.onnx"), digits.train_images[:64], activation_type="int8"
    )
    # TensorRT accumulates in 32 bits: its graph keeps 8-bit weights.
    assert json.loads(read_metadata(trt)["kdpipe.quantization"])["reduce_range"] is False


def test_fp16_keeps_float32_io_and_agrees(digits: Digits, fp32_onnx: Path) -> None:
    path = convert_fp16(fp32_onnx, fp32_onnx.with_name("digits.fp16.onnx"))
    session = create_onnx_session(path, threads=1)
    assert session.get_inputs()[0].type == "tensor(float)"
    assert session.get_outputs()[0].type == "tensor(float)"
    report = measure_parity(digits.model, create_onnx_runner(path, threads=1), digits.val_images, digits.val_labels)
    assert report.top1_agreement >= 0.99
    assert report.max_abs_diff < 0.1
    meta = read_metadata(path)
    assert meta["kdpipe.precision"] == "fp16" and meta["run"] == "r1"
    assert meta["kdpipe.preprocessing.classes"] == read_metadata(fp32_onnx)["kdpipe.preprocessing.classes"]


def test_tensorrt_precision_rules_are_checked_before_a_build(digits: Digits, fp32_onnx: Path, int8_onnx: Path) -> None:
    # onnxruntime's fast CPU graph uses uint8 activations, which TensorRT does not take.
    with pytest.raises(ConfigError, match="signed, symmetric int8"):
        check_onnx_for_tensorrt(int8_onnx, "int8", 10)
    symmetric = quantize_int8(
        fp32_onnx, fp32_onnx.with_name("digits.int8s.onnx"), digits.train_images[:64], activation_type="int8"
    )
    check_onnx_for_tensorrt(symmetric, "int8", 10)
    check_onnx_for_tensorrt(symmetric, "int8", 11)
    with pytest.raises(ConfigError, match="QDQ"):
        check_onnx_for_tensorrt(fp32_onnx, "int8", 10)
    # TensorRT 10 turns fp16 on with a flag; 11 builds in the graph's own types.
    check_onnx_for_tensorrt(fp32_onnx, "fp16", 10)
    with pytest.raises(ConfigError, match=r"strongly typed.*fp32, not fp16"):
        check_onnx_for_tensorrt(fp32_onnx, "fp16", 11)
    with pytest.raises(ConfigError, match="unknown TensorRT precision"):
        check_onnx_for_tensorrt(fp32_onnx, "bf16", 10)


def test_bad_quantization_settings(digits: Digits, fp32_onnx: Path, tmp_path: Path) -> None:
    calib = digits.train_images[:8]
    out = tmp_path / "q.onnx"
    with pytest.raises(ConfigError, match="minmax, entropy, percentile"):
        quantize_int8(fp32_onnx, out, calib, method="kl")
    with pytest.raises(ConfigError, match="activation_type"):
        quantize_int8(fp32_onnx, out, calib, activation_type="int4")
    with pytest.raises(ConfigError, match="not an input"):
        quantize_int8(fp32_onnx, out, calib, input_name="images")
    with pytest.raises(DataError, match="non-empty"):
        quantize_int8(fp32_onnx, out, torch.zeros(0, 1, 16, 16))
    with pytest.raises(ExportError, match="does not exist"):
        quantize_int8(tmp_path / "absent.onnx", out, calib)
    assert not out.exists()


def test_per_channel_int8_needs_opset_13(digits: Digits, tmp_path: Path) -> None:
    old = tmp_path / "opset11.onnx"
    export_onnx(digits.model, old, preprocessing=digits.preprocessing, opset=11, simplify=False)
    with pytest.raises(ConfigError, match="opset >= 13") as err:
        quantize_int8(old, tmp_path / "q.onnx", digits.train_images[:8])
    assert "per_channel=False" in (err.value.hint or "")
