"""TensorRT: engine stamps and the refusal of mismatched engines (pure, tested here); builds where TensorRT runs."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import kdpipe  # noqa: F401  (registers resnet8 with timm)
from kdpipe.errors import ConfigError, ExportError
from kdpipe.exports import (
    EngineStamp,
    Preprocessing,
    build_engine,
    check_stamp,
    create_onnx_runner,
    export_onnx,
    load_engine,
    require_tensorrt,
    tensorrt_version,
)
from kdpipe.exports.tensorrt import read_stamp, stamp_path

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None

A100 = EngineStamp(
    tensorrt="10.3.0",
    cuda="12.4",
    gpu="NVIDIA A100-SXM4-80GB",
    compute_capability="8.0",
    precision="fp16",
    min_batch=1,
    opt_batch=8,
    max_batch=64,
)


def test_matching_stamp_passes_even_with_another_cuda_or_profile() -> None:
    check_stamp(A100, replace(A100, cuda="12.6", max_batch=8, precision="int8"))


@pytest.mark.parametrize(
    "current",
    [
        replace(A100, gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0"),
        replace(A100, tensorrt="11.0.0"),
        replace(A100, compute_capability="8.6"),
    ],
    ids=["other-gpu", "other-tensorrt", "other-capability"],
)
def test_mismatched_stamp_says_what_was_built_and_to_rebuild(current: EngineStamp) -> None:
    with pytest.raises(ExportError) as err:
        check_stamp(A100, current, engine_path=Path("run/exports/model.engine"))
    message = err.value.message
    assert message.startswith("engine run/exports/model.engine was built for NVIDIA A100-SXM4-80GB")
    assert "with TensorRT 10.3.0" in message
    assert f"this machine has {current.gpu}" in message and f"TensorRT {current.tensorrt}" in message
    assert message.endswith("rebuild it")
    assert err.value.exit_code == 5


def test_stamp_round_trips_and_sits_beside_the_engine(tmp_path: Path) -> None:
    engine = tmp_path / "model.engine"
    assert stamp_path(engine) == tmp_path / "model.engine.json"
    stamp_path(engine).write_text(json.dumps(A100.to_dict()), encoding="utf-8")
    assert read_stamp(engine) == A100
    stamp_path(engine).write_text(json.dumps({"tensorrt": "10.3.0"}), encoding="utf-8")
    with pytest.raises(ExportError, match="lacks compute_capability"):
        read_stamp(engine)
    with pytest.raises(ExportError, match="rebuild"):
        read_stamp(tmp_path / "other.engine")


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here")
def test_require_tensorrt_says_how_to_install() -> None:
    assert tensorrt_version() is None
    with pytest.raises(ConfigError, match="format tensorrt needs the tensorrt package") as err:
        require_tensorrt()
    assert "pip install tensorrt" in str(err.value)
    assert err.value.exit_code == 2
    with pytest.raises(ConfigError):
        build_engine(Path("m.onnx"), Path("m.engine"))


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_builds_loads_and_matches_onnxruntime(precision: str, tmp_path: Path) -> None:
    from kdpipe.exports import convert_fp16

    pre = Preprocessing(
        mean=(0.5,) * 3, std=(0.25,) * 3, image_size=32, in_chans=3, channel_order="RGB", classes=tuple("abcdefghij")
    )
    model = timm.create_model("resnet8", num_classes=10, in_chans=3).eval()
    onnx_path = tmp_path / "m.onnx"
    export_onnx(model, onnx_path, preprocessing=pre)
    major = int(str(tensorrt_version()).split(".")[0])
    if precision == "fp16" and major >= 11:
        onnx_path = convert_fp16(onnx_path, tmp_path / "m.fp16.onnx")
    engine = tmp_path / "m.engine"
    stamp = build_engine(onnx_path, engine, precision=precision, min_batch=1, opt_batch=4, max_batch=16)
    assert engine.stat().st_size > 0 and read_stamp(engine) == stamp
    assert stamp.gpu == torch.cuda.get_device_name()

    runner = load_engine(engine)
    x = torch.randn(37, 3, 32, 32).numpy()  # not a multiple of max_batch: the last chunk is short
    expected = create_onnx_runner(tmp_path / "m.onnx", providers=["CPUExecutionProvider"])(x)
    tol = 1e-3 if precision == "fp32" else 5e-2
    np.testing.assert_allclose(runner(x), expected, atol=tol * float(np.abs(expected).max()), rtol=0)

    # A stamp from another machine is refused before TensorRT sees the engine.
    stamp_path(engine).write_text(json.dumps({**stamp.to_dict(), "gpu": "Some Other GPU"}), encoding="utf-8")
    with pytest.raises(ExportError, match="rebuild it"):
        load_engine(engine)


def test_an_int8_engine_is_gated_as_int8_not_as_fp16() -> None:
    """TensorRT's default parity gates follow the engine's precision: int8 ones as onnx-int8's (agreement and top-1
    drop, no bound on logits), fp16/fp32 ones as fp16's."""
    from kdpipe.exports.formats import OnnxInt8Format, TensorRTFormat
    from kdpipe.stages.export import ExportConfig

    fmt = TensorRTFormat()
    int8 = ExportConfig(type="export", format="tensorrt", tensorrt={"precision": "int8"})
    fp16 = ExportConfig(type="export", format="tensorrt", tensorrt={"precision": "fp16"})
    assert fmt.parity_defaults(int8) == OnnxInt8Format.parity and fmt.parity_defaults(int8)["max_abs_diff"] is None
    assert fmt.parity_defaults(fp16) == TensorRTFormat.parity
