"""The qad stage on real digits: ModelOpt fake quantization (BatchNorm folded), calibration, KD fine-tuning from the
teacher, a QDQ int8 ONNX with parity gates (against the fake-quantized network it came from, and the top-1 drop
against the fp32 student), benchmarked and served like any export, resumable mid-epoch, refused where it cannot run."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest

pytest.importorskip("modelopt.torch.quantization", reason="needs nvidia-modelopt (kdpipe[export])")

import kdpipe.stages  # noqa: F401
from kdpipe.config import load_config
from kdpipe.errors import ConfigError, GateFailed, Interrupted
from kdpipe.pipeline.runner import Runner, preflight

QAD = """
version: 1
name: digits-qad
seed: 0
device: cpu
data: {kind: digits, image_size: 16, augment: crop, val_fraction: 0.0}
stages:
  teacher:
    type: teacher
    model: resnet8
    weights: {train: {epochs: 3, batch_size: 64, lr: 0.05}}
  distill:
    type: distill
    student: resnet8
    method: {name: kd}
    train: {epochs: 3, batch_size: 64, lr: 0.05}
  qad:
    type: qad
    train: {epochs: 1, batch_size: 64, lr: 0.005}
    calibration_samples: 256
    max_drop_vs_fp32: 0.05
  qad_trt:
    type: qad
    needs: [distill]
    int8_layout: tensorrt
    train: {epochs: 1, batch_size: 64, lr: 0.005}
    calibration_samples: 256
    max_drop_vs_fp32: 0.05
  bench:
    type: benchmark
    needs: [qad, qad_trt]
    backends: [onnxruntime]
    batch_sizes: [1]
    warmup: 1
    min_iterations: 2
    min_time_s: 0.01
  serve:
    type: serve
    needs: [qad]
"""


@pytest.fixture(scope="module")
def qad_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("qad")
    (root / "stages.yaml").write_text(QAD)
    Runner(load_config(root / "stages.yaml"), root / "run").run()
    return root / "run"


@pytest.mark.parametrize("stage", ["qad", "qad_trt"])
def test_qad_exports_a_gated_qdq_graph_of_the_fine_tuned_student(qad_run: Path, stage: str) -> None:
    result = json.loads((qad_run / stage / "result.json").read_text())
    graph = onnx.load(str(qad_run / stage / "model.onnx"))
    ops = Counter(n.op_type for n in graph.graph.node)
    assert ops["QuantizeLinear"] >= 9 and ops["DequantizeLinear"] >= 9  # every conv and the classifier
    assert ops["BatchNormalization"] == 0  # folded into the convolutions before quantization
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["kdpipe.preprocessing.image_size"] == "16"
    if stage == "qad_trt":  # ModelOpt's own graph
        assert meta["kdpipe.precision"] == "int8-qdq"
    gates = {g["name"]: g for g in result["info"]["gates"]}
    assert set(gates) == {"min_agreement", "max_top1_drop", "max_drop_vs_fp32"} and all(
        g["passed"] for g in gates.values()
    )
    m = result["metrics"]
    # the drop gate compares the export with the fp32 student; the graph is faithful to the fake-quant network
    assert gates["max_drop_vs_fp32"]["value"] == pytest.approx(m["fp32_top1"] - m["top1"])
    assert m["top1_agreement"] >= 0.95 and m["top1"] > 0.6  # digits, 10 classes
    qad = result["info"]["qad"]
    assert qad["quantizers"] >= 18 and qad["batchnorm_folded"] and len(qad["history"]) == 1
    assert result["info"]["format"] == "onnx-int8-qad"
    assert qad["int8_layout"] == ("tensorrt" if stage == "qad_trt" else "onnxruntime")


def test_the_onnxruntime_layout_fuses_into_integer_convolutions(qad_run: Path, tmp_path: Path) -> None:
    """onnxruntime's optimizer turns the default layout's convolutions into QLinearConv (integer kernels); ModelOpt's
    own layout (inputs quantized, conv outputs not) stays float convolutions there, hence the default."""
    import onnxruntime as ort

    def optimized_ops(path: Path) -> Counter[str]:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"{path.parent.name}.opt.onnx")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)

    assert optimized_ops(qad_run / "qad" / "model.onnx")["QLinearConv"] >= 9
    assert optimized_ops(qad_run / "qad_trt" / "model.onnx")["QLinearConv"] == 0


def test_qad_export_is_benchmarked_and_served(qad_run: Path) -> None:
    cells = json.loads((qad_run / "bench" / "result.json").read_text())["info"]["cells"]
    assert sum(c["model"] == "resnet8 onnx-int8-qad" and not c.get("error") for c in cells) == 2  # both layouts
    config = (qad_run / "serve" / "model_repository" / "digits-qad" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config


def test_a_qad_run_stopped_mid_epoch_resumes_to_the_same_graph(
    qad_run: Path, tmp_path: Path, write_config: Callable[..., Path]
) -> None:
    cfg = write_config(QAD)
    rd = tmp_path / "run"
    with pytest.raises(Interrupted, match="checkpoint saved"):
        Runner(load_config(cfg), rd, options={"stop_after_steps": {"qad": 5}}).run()
    assert (rd / "qad" / "checkpoints" / "last.pt").is_file()
    Runner(load_config(cfg), rd).run()
    resumed = json.loads((rd / "qad" / "result.json").read_text())
    reference = json.loads((qad_run / "qad" / "result.json").read_text())
    assert resumed["info"]["qad"]["resumed_from"] == 0
    assert resumed["metrics"]["top1"] == reference["metrics"]["top1"]
    a, b = onnx.load(str(rd / "qad" / "model.onnx")), onnx.load(str(qad_run / "qad" / "model.onnx"))
    assert [i.raw_data for i in a.graph.initializer] == [i.raw_data for i in b.graph.initializer]


def test_qad_gate_on_the_fp32_drop_fails_the_run(
    qad_run: Path, tmp_path: Path, write_config: Callable[..., Path]
) -> None:
    cfg = write_config(QAD.replace("max_drop_vs_fp32: 0.05", "max_drop_vs_fp32: 0.0").replace("lr: 0.005", "lr: 0.5"))
    with pytest.raises(GateFailed, match="max_drop_vs_fp32") as info:
        Runner(load_config(cfg), tmp_path / "run").run()
    assert "max_drop_vs_fp32" in [g.name for g in info.value.failed]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (QAD.replace("  teacher:\n    type: teacher\n    model: resnet8\n    weights: {train: {epochs: 3, batch_size: 64, lr: 0.05}}\n", "").replace("method: {name: kd}", "method: {name: ce}"), r"stage 'qad' \(qad\) needs a 'teacher' before it"),
        (QAD.replace("  bench:", "  int8:\n    type: export\n    format: onnx-int8-qad\n  bench:"), "made by a stage of type 'qad'"),
    ],
    ids=["no-teacher", "as-an-export-format"],
)  # fmt: skip
def test_qad_without_a_teacher_or_as_an_export_format_is_refused(
    write_config: Callable[..., Path], text: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        preflight(load_config(write_config(text)))


def test_the_export_stores_int8_weights(qad_run: Path) -> None:
    """The exported graph keeps int8 weights behind DequantizeLinear: no float weight quantized at every run."""
    import numpy as np
    from onnx import numpy_helper

    from kdpipe.exports.qad import fold_weight_quantizers

    graph = onnx.load(str(qad_run / "qad_trt" / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    weights = [n.input[0] for n in graph.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(weights) >= 9 and all(inits[w].dtype == np.int8 for w in weights)
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] in inits for n in graph.graph.node)
    assert fold_weight_quantizers(graph) == 0  # nothing left to fold


def test_folding_a_weight_quantizer_is_the_same_arithmetic_done_once() -> None:
    """Golden: a per-channel QuantizeLinear of a constant weight becomes the int8 tensor rint(w / scale) + zp
    (clipped), the float weight is dropped, and onnxruntime gives the same output before and after."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from kdpipe.exports.qad import fold_weight_quantizers

    w = np.array([[[[0.26]]], [[[-0.5]]], [[[30.0]]]], dtype=np.float32)  # 30 / 0.2 saturates at 127
    scale = np.array([0.1, 0.25, 0.2], dtype=np.float32)
    zero = np.zeros(3, dtype=np.int8)
    nodes = [
        helper.make_node("QuantizeLinear", ["w", "s", "z"], ["wq"], axis=0),
        helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"], axis=0),
        helper.make_node("Conv", ["x", "wd"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 2, 2])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero, "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    x = np.arange(4, dtype=np.float32).reshape(1, 1, 2, 2)
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    assert fold_weight_quantizers(model) == 1
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert "w" not in inits and [n.op_type for n in model.graph.node] == ["DequantizeLinear", "Conv"]
    assert inits["wq"].dtype == np.int8 and inits["wq"].ravel().tolist() == [3, -2, 127]  # rint(2.6), rint(-2), clip
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.array_equal(before, after)


def test_a_layer_modelopt_cannot_quantize_is_named() -> None:
    """A layer with a weight that ModelOpt does not wrap (here a hand-written linear) would stay float in the int8
    graph: it is listed by name, so the qad stage can refuse it or keep it in float as configured."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from kdpipe.exports.qad import quantize_model, unquantized_layers

    class HandLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.weight)

    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), HandLinear())
    quantized = quantize_model(net, torch.randn(8, 1, 6, 6))
    assert unquantized_layers(quantized) == {"4": "HandLinear"}  # the conv is wrapped, the hand-written one is not


def test_the_qad_stage_refuses_unquantized_layers_unless_kept_in_float(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, write_config: Callable[..., Path]
) -> None:
    import kdpipe.stages.qad as qad_stage

    monkeypatch.setattr(qad_stage, "unquantized_layers", lambda model: {"head.fc": "HandLinear"})
    text = QAD.replace("  qad_trt:", "  skip_trt:").split("  skip_trt:")[0]  # teacher, distill, qad only
    with pytest.raises(ConfigError, match=r"cannot quantize 1 layer\(s\) of resnet8: head\.fc \(HandLinear\)") as info:
        Runner(load_config(write_config(text)), tmp_path / "run").run()
    assert "stages.qad.float_layers: ['head.fc']" in str(info.value)
    kept = text.replace("    max_drop_vs_fp32: 0.05\n", "    max_drop_vs_fp32: 0.05\n    float_layers: ['head.*']\n")
    Runner(load_config(write_config(kept)), tmp_path / "run").run()  # allowed: the stage finishes
    assert (tmp_path / "run" / "qad" / "result.json").is_file()
