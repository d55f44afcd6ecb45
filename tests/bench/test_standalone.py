"""``benchmark_file`` for each kind of model file, its error cases, and the ``kdpipe bench`` click command."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from kdpipe.bench.standalone import bench_command, benchmark_file, parse_shape, shape_from_preprocessing
from kdpipe.errors import ConfigError, DataError
from kdpipe.models.factory import create_model
from kdpipe.models.weights import save_weights

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

SHAPE = (1, 16, 16)
FAST = {"warmup": 1, "min_iterations": 2, "min_time_s": 0.0, "max_iterations": 2, "threads": 1}
FAST_CLI = ["--warmup", "1", "--min-iterations", "2", "--min-time", "0", "--threads", "1"]


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return create_model("resnet8", num_classes=10, in_chans=1).eval()


@pytest.fixture(scope="module")
def files(tiny: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    out: dict[str, Path] = {}
    for name, axes in (("static", None), ("dynamic", {"input": {0: "batch", 2: "h", 3: "w"}})):
        out[name] = folder / f"{name}.onnx"
        torch.onnx.export(
            tiny,
            torch.randn(1, *SHAPE),
            str(out[name]),
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=17,
        )
    graph = onnx.load(str(out["dynamic"]))
    # the flat keys kdpipe.exports.export_onnx writes, one per Preprocessing field (values are JSON)
    onnx.helper.set_model_props(
        graph,
        {"kdpipe.preprocessing.in_chans": "1", "kdpipe.preprocessing.image_size": "16", "kdpipe.precision": "fp32"},
    )
    out["with_meta"] = folder / "with_meta.onnx"
    onnx.save(graph, str(out["with_meta"]))
    out["safetensors"] = save_weights(tiny, folder / "student.safetensors", metadata={"image_size": "16"})
    out["state_dict"] = folder / "state.pt"
    torch.save({"state_dict": tiny.state_dict(), "epoch": 3}, out["state_dict"])
    scripted = torch.jit.trace(tiny, torch.randn(1, *SHAPE))
    out["torchscript"] = folder / "scripted.pt"
    torch.jit.save(scripted, str(out["torchscript"]))
    out["torchscript_meta"] = folder / "scripted_meta.pt"
    torch.jit.save(
        scripted,
        str(out["torchscript_meta"]),
        _extra_files={"kdpipe.preprocessing": '{"in_chans": 1, "image_size": 16}'},
    )
    return out


def assert_all_ok(cells: list, batches: list[int], backend: str) -> None:
    assert [c.batch_size for c in cells] == batches
    for c in cells:
        assert c.error is None, c.error
        assert c.backend == backend and c.p50_ms is not None and c.p50_ms <= c.p90_ms <= c.p99_ms


def test_onnx_with_static_dims_reads_its_shape_from_the_graph(files: dict[str, Path]) -> None:
    cells = benchmark_file(files["static"], batch_sizes=[1, 4], **FAST)
    assert cells[0].error is None and cells[0].model == "static.onnx"
    assert "static batch of 1" in (cells[1].error or "")  # the graph's batch is fixed: an error row, not a crash
    with pytest.raises(ConfigError, match="contradicts"):
        benchmark_file(files["static"], batch_sizes=[1], input_shape=(3, 16, 16), **FAST)


def test_onnx_with_dynamic_dims_takes_the_shape_from_metadata_or_the_caller(files: dict[str, Path]) -> None:
    assert_all_ok(benchmark_file(files["with_meta"], batch_sizes=[1, 2], **FAST), [1, 2], "onnxruntime")
    assert_all_ok(benchmark_file(files["dynamic"], batch_sizes=[2], input_shape=SHAPE, **FAST), [2], "onnxruntime")
    with pytest.raises(ConfigError, match="no static input shape") as info:
        benchmark_file(files["dynamic"], batch_sizes=[1], **FAST)
    assert "--input-shape" in str(info.value)


def test_safetensors_written_by_kdpipe_needs_nothing_else(files: dict[str, Path]) -> None:
    cells = benchmark_file(files["safetensors"], batch_sizes=[1, 2], **FAST)
    assert_all_ok(cells, [1, 2], "torch")
    assert cells[0].model_bytes == files["safetensors"].stat().st_size


def test_torchscript_archive(files: dict[str, Path]) -> None:
    assert_all_ok(benchmark_file(files["torchscript"], batch_sizes=[1], input_shape=SHAPE, **FAST), [1], "torch")
    assert_all_ok(benchmark_file(files["torchscript_meta"], batch_sizes=[2], **FAST), [2], "torch")
    with pytest.raises(ConfigError, match="TorchScript archives carry no input shape"):
        benchmark_file(files["torchscript"], batch_sizes=[1], **FAST)


def test_state_dict_checkpoint_needs_an_architecture(files: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="--arch"):
        benchmark_file(files["state_dict"], batch_sizes=[1], input_shape=SHAPE, **FAST)
    cells = benchmark_file(files["state_dict"], batch_sizes=[1], arch="resnet8", input_shape=SHAPE, **FAST)
    assert_all_ok(cells, [1], "torch")
    with pytest.raises(ConfigError, match="did you mean"):
        benchmark_file(files["state_dict"], batch_sizes=[1], arch="resnet88", input_shape=SHAPE, **FAST)


def test_missing_or_unknown_files_name_the_path_and_the_accepted_kinds(tmp_path: Path, files) -> None:
    with pytest.raises(ConfigError, match=r"nope\.onnx does not exist") as info:
        benchmark_file(tmp_path / "nope.onnx", batch_sizes=[1])
    assert ".safetensors" in str(info.value) and ".plan" in str(info.value)
    other = tmp_path / "model.h5"
    other.write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"model\.h5.*\.h5 file") as info:
        benchmark_file(other, batch_sizes=[1])
    assert "TorchScript" in str(info.value)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="not a readable tensors-only checkpoint"):
        benchmark_file(junk, batch_sizes=[1], arch="resnet8", input_shape=SHAPE)
    with pytest.raises(ConfigError, match=r"cannot run static\.onnx"):
        benchmark_file(files["static"], batch_sizes=[1], backends=["torch"])
    with pytest.raises(ConfigError, match="did you mean 'torch'"):
        benchmark_file(files["safetensors"], batch_sizes=[1], backends=["trch"])


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_engine_without_tensorrt_is_a_config_error(tmp_path: Path) -> None:
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"engine")
    with pytest.raises(ConfigError, match="tensorrt package"):
        benchmark_file(engine, batch_sizes=[1], input_shape=SHAPE)


def test_parse_shape_and_preprocessing_records() -> None:
    assert parse_shape("3x32x32") == (3, 32, 32) and parse_shape("1,16,16") == (1, 16, 16)
    for bad in ("32x32", "3x0x32", "axbxc"):
        with pytest.raises(ConfigError, match="CxHxW"):
            parse_shape(bad)
    assert shape_from_preprocessing({"in_chans": "3", "image_size": "[24, 32]"}) == (3, 24, 32)
    assert shape_from_preprocessing({"in_chans": 1, "image_size": 8, "mean": [0.5]}) == (1, 8, 8)
    assert shape_from_preprocessing({"mean": "[0.5]"}) is None
    assert shape_from_preprocessing({"in_chans": "x", "image_size": "8"}) is None


def test_cli_prints_a_table_and_writes_the_report_beside_the_model(files: dict[str, Path]) -> None:
    result = CliRunner().invoke(bench_command, [str(files["with_meta"]), "--batch-sizes", "1,2", *FAST_CLI])
    assert result.exit_code == 0, result.output
    assert "onnxruntime" in result.stdout and "p50 ms" in result.stdout
    out = files["with_meta"].with_name("with_meta.bench")
    assert {p.name for p in out.iterdir()} == {"bench.json", "bench.md", "bench.png"}


def test_cli_json_output_and_out_dir(files: dict[str, Path], tmp_path: Path) -> None:
    args = [
        str(files["safetensors"]),
        "--batch-sizes",
        "1",
        "--backend",
        "torch",
        "--json",
        "--out",
        str(tmp_path / "r"),
    ]
    result = CliRunner().invoke(bench_command, [*args, *FAST_CLI])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert row["backend"] == "torch" and row["batch_size"] == 1 and row["error"] is None
    assert (tmp_path / "r" / "bench.json").is_file()


def test_cli_errors_are_one_line_with_their_exit_code(tmp_path: Path, files: dict[str, Path]) -> None:
    result = CliRunner().invoke(bench_command, [str(tmp_path / "missing.onnx")])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: model file") and "Traceback" not in result.output
    result = CliRunner().invoke(bench_command, [str(files["static"]), "--batch-sizes", "1,x"])
    assert result.exit_code == 2 and "comma-separated" in result.output
