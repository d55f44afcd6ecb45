"""Triton model repository: a real ONNX export written as config.pbtxt + 1/model.onnx + labels.txt, parsed back with
tritonclient's ModelConfig, run through onnxruntime the way Triton would batch it, and validated (no server)."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[grpc] (kdpipe[export])")
ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime (kdpipe[export])")
pytest.importorskip("onnx", reason="needs onnx (kdpipe[export])")

import timm  # noqa: E402
import torch  # noqa: E402
from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402

import kdpipe  # noqa: E402, F401  (registers resnet8 with timm)
from kdpipe.errors import ConfigError, StageError  # noqa: E402
from kdpipe.model_cards.triton import (  # noqa: E402
    TritonModelSpec,
    create_model_config,
    read_model_config,
    spec_from_onnx,
    write_triton_repository,
)
from kdpipe.model_cards.triton_check import validate_repository  # noqa: E402

LABELS = tuple(f"class_{i}" for i in range(10))


def _export(path: Path, *, dynamic: bool) -> Path:
    model = timm.create_model("resnet8", num_classes=10, in_chans=1).eval()
    dynamic_axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model,
            (torch.randn(1, 1, 16, 16),),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes=dynamic_axes,
        )
    return path


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tmp_path_factory.mktemp("export") / "student.onnx", dynamic=True)


@pytest.fixture(scope="module")
def static_onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tmp_path_factory.mktemp("export-static") / "student.onnx", dynamic=False)


@pytest.fixture
def spec(onnx_path: Path) -> TritonModelSpec:
    return spec_from_onnx(
        onnx_path,
        name="student",
        max_batch_size=8,
        labels=LABELS,
        preferred_batch_sizes=(4, 8),
        max_queue_delay_us=250,
        instance_kind="cpu",
        instance_count=2,
        parameters={"mean": "0.5", "std": "0.25"},
    )


@pytest.fixture
def written(tmp_path: Path, spec: TritonModelSpec) -> tuple[Path, dict[str, Path]]:
    repo = tmp_path / "model_repository"
    return repo, write_triton_repository(repo, spec)


def test_config_pbtxt_states_the_batching_contract(
    written: tuple[Path, dict[str, Path]], spec: TritonModelSpec
) -> None:
    repo, paths = written
    assert paths["config"] == repo / "student" / "config.pbtxt"
    assert paths["model"] == repo / "student" / "1" / "model.onnx"
    config = text_format.Parse(paths["config"].read_text(), model_config_pb2.ModelConfig())
    assert config.name == "student"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 8
    assert config.version_policy.latest.num_versions == 1
    (inp,), (out,) = config.input, config.output
    assert (inp.name, tuple(inp.dims), inp.data_type) == ("input", (1, 16, 16), model_config_pb2.TYPE_FP32)
    assert (out.name, tuple(out.dims), out.data_type) == ("logits", (10,), model_config_pb2.TYPE_FP32)
    assert out.label_filename == "labels.txt"
    assert config.HasField("dynamic_batching")
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 250
    (group,) = config.instance_group
    assert (group.kind, group.count) == (model_config_pb2.ModelInstanceGroup.KIND_CPU, 2)
    assert {k: v.string_value for k, v in config.parameters.items()} == {"mean": "0.5", "std": "0.25"}
    assert read_model_config(paths["config"]) == config == create_model_config(spec)


def test_labels_one_per_line_in_class_order(written: tuple[Path, dict[str, Path]]) -> None:
    _, paths = written
    assert paths["labels"].read_text().splitlines() == list(LABELS)


def test_model_is_a_byte_identical_copy(written: tuple[Path, dict[str, Path]], onnx_path: Path) -> None:
    _, paths = written
    assert not paths["model"].is_symlink()
    assert paths["model"].read_bytes() == onnx_path.read_bytes()
    assert not list(paths["model"].parent.glob(".*.tmp"))


def test_onnxruntime_takes_the_batch_triton_sends(written: tuple[Path, dict[str, Path]]) -> None:
    """Triton prepends the batch dim to the config's dims: batch 3 of [1, 16, 16] must run and give [3, 10]."""
    _, paths = written
    config = read_model_config(paths["config"])
    session = ort.InferenceSession(str(paths["model"]), providers=["CPUExecutionProvider"])
    batch = np.random.default_rng(0).standard_normal((3, *config.input[0].dims)).astype(np.float32)
    (logits,) = session.run([config.output[0].name], {config.input[0].name: batch})
    assert logits.shape == (3, *config.output[0].dims)
    assert config.max_batch_size >= 3


def test_validate_repository_passes_a_written_repository(written: tuple[Path, dict[str, Path]]) -> None:
    repo, _ = written
    assert validate_repository(repo) == []


def _remove_model(paths: dict[str, Path]) -> str:
    paths["model"].unlink()
    return "1/model.onnx: missing"


def _change_dims(paths: dict[str, Path]) -> str:
    config = read_model_config(paths["config"])
    del config.input[0].dims[:]
    config.input[0].dims.extend([1, 32, 32])
    paths["config"].write_text(text_format.MessageToString(config))
    return "input 'input' dims [1, 32, 32] do not match the ONNX graph's [1, 16, 16]"


def _keep_batch_dim(paths: dict[str, Path]) -> str:
    config = read_model_config(paths["config"])
    config.input[0].dims.insert(0, -1)
    paths["config"].write_text(text_format.MessageToString(config))
    return "dims [-1, 1, 16, 16] do not match the ONNX graph's [1, 16, 16] (batch dim left out)"


def _corrupt_config(paths: dict[str, Path]) -> str:
    paths["config"].write_text('name: "student"\nmax_batch_size: 8\ninput { name: "input" dims: [1, 16\n')
    return "config.pbtxt:4:1: not a valid Triton model config"


def _wrong_dtype(paths: dict[str, Path]) -> str:
    config = read_model_config(paths["config"])
    config.output[0].data_type = model_config_pb2.TYPE_FP16
    paths["config"].write_text(text_format.MessageToString(config))
    return "output 'logits' is TYPE_FP16, the graph's is TYPE_FP32"


def _short_labels(paths: dict[str, Path]) -> str:
    paths["labels"].write_text("cat\ndog\n")
    return "2 labels for output 'logits' of 10 classes"


@pytest.mark.parametrize(
    "plant", [_remove_model, _change_dims, _keep_batch_dim, _corrupt_config, _wrong_dtype, _short_labels]
)
def test_validate_repository_finds_planted_problems(written: tuple[Path, dict[str, Path]], plant) -> None:
    repo, paths = written
    expected = plant(paths)
    problems = validate_repository(repo)
    assert len(problems) == 1, problems
    assert expected in problems[0]


def test_validate_repository_reports_a_missing_repository_and_config(tmp_path: Path) -> None:
    assert "does not exist" in validate_repository(tmp_path / "absent")[0]
    (tmp_path / "empty_model").mkdir()
    assert validate_repository(tmp_path) == [f"{tmp_path / 'empty_model'}: no config.pbtxt"]


def test_static_batch_export_cannot_serve_a_batch(static_onnx_path: Path) -> None:
    with pytest.raises(ConfigError, match="not dynamic-batch") as info:
        spec_from_onnx(static_onnx_path, name="student", max_batch_size=8)
    assert "max_batch_size: 0" in str(info.value)


def test_static_batch_export_with_max_batch_size_zero_keeps_the_full_shape(
    static_onnx_path: Path, tmp_path: Path
) -> None:
    spec = spec_from_onnx(static_onnx_path, name="static", max_batch_size=0, labels=LABELS)
    assert (spec.input_dims, spec.output_dims) == ((1, 1, 16, 16), (1, 10))
    paths = write_triton_repository(tmp_path, spec)
    config = read_model_config(paths["config"])
    assert config.max_batch_size == 0
    assert not config.HasField("dynamic_batching")
    assert validate_repository(tmp_path) == []


def test_dynamic_export_with_max_batch_size_zero_needs_no_batch_stripping(onnx_path: Path) -> None:
    spec = spec_from_onnx(onnx_path, name="student", max_batch_size=0)
    assert (spec.input_dims, spec.output_dims) == ((-1, 1, 16, 16), (-1, 10))


def test_max_batch_size_one_sets_no_dynamic_batching(spec: TritonModelSpec) -> None:
    config = create_model_config(dataclasses.replace(spec, max_batch_size=1, preferred_batch_sizes=()))
    assert config.max_batch_size == 1
    assert not config.HasField("dynamic_batching")


@pytest.mark.parametrize("name", ["my model", "a/b", "..", ".hidden", "", "café"])
def test_bad_model_name_is_a_config_error(spec: TritonModelSpec, name: str) -> None:
    with pytest.raises(ConfigError, match="model name"):
        dataclasses.replace(spec, name=name)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"preferred_batch_sizes": (4, 16)}, r"preferred_batch_sizes \[16\] are outside 1..max_batch_size \(8\)"),
        ({"max_batch_size": 1}, "need max_batch_size > 1"),
        ({"instance_kind": "gpus"}, "instance_kind 'gpus' is not one of auto, cpu, gpu"),
        ({"platform": "onnx"}, "platform 'onnx' is not one of"),
        ({"platform": "tensorrt_plan"}, "serves a .plan file"),
        ({"input_dtype": "FP32"}, "input_dtype 'FP32'"),
        ({"labels": ("a", "b")}, "2 labels for an output of 10 classes"),
        ({"labels": (*LABELS[:9], "two\nlines")}, "non-empty single lines"),
        ({"input_dims": (0, 16, 16)}, "each >= 1 or -1"),
        ({"version": 0}, "version >= 1"),
        ({"platform": "tensorrt_plan", "model_file": Path("m.plan")}, "a TensorRT plan runs on a GPU only"),
    ],
)
def test_invalid_spec_is_a_config_error(spec: TritonModelSpec, change: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        dataclasses.replace(spec, **change)


def test_unknown_spec_from_onnx_field_suggests_the_nearest(onnx_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown TritonModelSpec field") as info:
        spec_from_onnx(onnx_path, name="student", max_batch_size=8, prefered_batch_sizes=(4,))
    assert "preferred_batch_sizes" in str(info.value.hint)


def test_second_write_replaces_files_and_keeps_sibling_models(
    written: tuple[Path, dict[str, Path]], spec: TritonModelSpec
) -> None:
    repo, first = written
    sibling = repo / "teacher" / "1" / "model.onnx"
    sibling.parent.mkdir(parents=True)
    sibling.write_bytes(b"teacher bytes")
    (repo / "teacher" / "config.pbtxt").write_text('name: "teacher"\n')
    first_inode = first["model"].stat().st_ino

    second = write_triton_repository(
        repo, dataclasses.replace(spec, labels=(), max_batch_size=16, preferred_batch_sizes=(16,))
    )
    config = read_model_config(second["config"])
    assert (config.max_batch_size, list(config.dynamic_batching.preferred_batch_size)) == (16, [16])
    assert config.output[0].label_filename == ""
    assert "labels" not in second
    assert not first["labels"].exists()  # no stale labels file the config no longer names
    assert second["model"].stat().st_ino != first_inode  # a new file renamed into place, not rewritten in place
    assert sibling.read_bytes() == b"teacher bytes"
    assert sorted(p.name for p in repo.iterdir()) == ["student", "teacher"]
    assert not [p for p in repo.rglob("*") if p.name.endswith(".tmp")]


def test_newer_version_folder_is_refused(written: tuple[Path, dict[str, Path]], spec: TritonModelSpec) -> None:
    repo, paths = written
    newer = repo / "student" / "2"
    newer.mkdir()
    (newer / "model.onnx").write_bytes(paths["model"].read_bytes())
    with pytest.raises(ConfigError, match="newer version than 1"):
        write_triton_repository(repo, spec)
    write_triton_repository(repo, dataclasses.replace(spec, version=3))
    assert validate_repository(repo) == []


def test_tensorrt_plan_goes_to_model_plan(spec: TritonModelSpec, tmp_path: Path) -> None:
    plan = tmp_path / "student.plan"
    plan.write_bytes(b"not a real engine")
    repo = tmp_path / "repo"
    paths = write_triton_repository(
        repo, dataclasses.replace(spec, platform="tensorrt_plan", model_file=plan, instance_kind="gpu")
    )
    assert paths["model"] == repo / "student" / "1" / "model.plan"
    assert read_model_config(paths["config"]).platform == "tensorrt_plan"
    assert validate_repository(repo) == []  # without TensorRT the engine's dims cannot be read back
    paths["model"].rename(paths["model"].with_suffix(".onnx"))
    (problem,) = validate_repository(repo)
    assert "model.plan: missing; platform 'tensorrt_plan' loads model.plan (found model.onnx)" in problem


def test_missing_model_file_is_a_stage_error(spec: TritonModelSpec, tmp_path: Path) -> None:
    with pytest.raises(StageError, match="does not exist"):
        write_triton_repository(tmp_path, dataclasses.replace(spec, model_file=tmp_path / "gone.onnx"))
    assert not list(tmp_path.iterdir())


def test_read_model_config_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.pbtxt"
    path.write_text('name: "x"\nmax_batch_sise: 8\n')
    with pytest.raises(ConfigError, match=rf"{path}:2:1: .*max_batch_sise"):
        read_model_config(path)
