"""Extension seams, exercised from outside the package as a plugin would: a KD method, a stage type, an export
format and a file-consuming benchmark backend registered after ``import kdpipe`` are honoured by validation,
``kdpipe schema``, the pipeline, ``kdpipe bench`` and ``kdpipe list``; an installed entry point is imported."""

from __future__ import annotations

import contextlib
import json
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from pydantic import BaseModel, ConfigDict

import kdpipe.stages  # noqa: F401
from kdpipe.bench.backends import Backend, make_input
from kdpipe.bench.standalone import benchmark_file
from kdpipe.cli import cli
from kdpipe.config import StageConfig, get_pipeline_model, load_config
from kdpipe.distill.methods.kd import HintonKD, KDParams
from kdpipe.errors import ConfigError, StageError
from kdpipe.exports.formats import ExportFormat, ExportJob, Runner, register_format
from kdpipe.pipeline.runner import Runner as PipelineRunner
from kdpipe.registry import BACKENDS, FORMATS, METHODS, STAGES, Registry
from kdpipe.stages.base import Stage, StageRecord, StageResult
from kdpipe.stages.outputs import ModelOutput
from tests.conftest import TINY

# ---------------------------------------------------------------------------------------------------------------------
# The plugin: what a third-party package would define
# ---------------------------------------------------------------------------------------------------------------------


class SharpKDParams(KDParams):
    name: Literal["sharp_kd"] = "sharp_kd"  # type: ignore[assignment]


class SharpKD(HintonKD):
    """Hinton KD under another name: a method added by a plugin."""

    Params = SharpKDParams


class EchoConfig(StageConfig):
    type: Literal["echo"]
    message: str


class EchoStage(Stage):
    """A stage added by a plugin: reports its message's length."""

    Config = EchoConfig
    provides = frozenset({"echo"})
    config: EchoConfig

    def run(self) -> StageResult:
        return StageResult(metrics={"length": len(self.config.message)}, summary=self.config.message)


class TorchScriptOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    freeze: bool = True


class TorchScriptFormat(ExportFormat):
    """A TorchScript export, traced on one input; Triton's ONNX/TensorRT platforms cannot serve it."""

    name = "torchscript"
    summary = "TorchScript (torch.jit.trace), a plugin format"
    suffix = ".ts"
    requires = ("torch",)
    hint = "pip install torch"
    Params = TorchScriptOptions
    triton_platform = None

    def export(self, job: ExportJob) -> Path:
        example = torch.zeros(1, *job.input_shape)
        with torch.no_grad():
            traced = torch.jit.trace(job.model, example)
        if job.options.freeze:  # type: ignore[attr-defined]
            traced = torch.jit.freeze(traced)
        out = job.out_dir / "model.ts"
        traced.save(str(out))
        job.info["frozen"] = job.options.freeze  # type: ignore[attr-defined]
        return out

    def open_runner(self, path: Path, job: ExportJob) -> tuple[Runner, int]:
        module = torch.jit.load(str(path))

        def run(x: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return module(torch.from_numpy(x)).numpy()

        return run, 64


class TorchScriptFileBackend(Backend):
    """Runs a saved ``.ts`` file: a backend that consumes an artifact, as onnxruntime does."""

    name = "torchscript-file"
    needs = "path"
    consumes = (".ts",)
    timed = "module(x) of torch.jit.load(path) under no_grad"

    def version(self) -> str:
        return f"torch {torch.__version__}"

    def load(self) -> None:
        self.module = torch.jit.load(str(self.target.path))

    @contextlib.contextmanager
    def cell(self, batch_size: int, input_shape: tuple[int, int, int]) -> Iterator[Callable[[], object]]:
        x = make_input(batch_size, input_shape)

        def step() -> object:
            with torch.no_grad():
                return self.module(x)

        yield step


@contextlib.contextmanager
def registered(registry: Registry[Any], name: str, obj: Any) -> Iterator[None]:
    registry.register(name)(obj)
    try:
        yield
    finally:
        registry.unregister(name)


@pytest.fixture
def plugin() -> Iterator[None]:
    with (
        registered(METHODS, "sharp_kd", SharpKD),
        registered(STAGES, "echo", EchoStage),
        registered(BACKENDS, "torchscript-file", TorchScriptFileBackend),
    ):
        register_format(TorchScriptFormat())
        try:
            yield
        finally:
            FORMATS.unregister("torchscript")


# ---------------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------------


def test_a_method_registered_after_import_is_validated_and_in_the_schema(write_config: Callable[..., Path]) -> None:
    text = TINY.replace("method: {name: kd, temperature: 4.0}", "method: {name: sharp_kd, temperature: 2.0}")
    with pytest.raises(ConfigError, match="sharp_kd"):  # not registered yet: refused
        load_config(write_config(text))
    with registered(METHODS, "sharp_kd", SharpKD):
        loaded = load_config(write_config(text))
        method = loaded.config.stages["distill"].method
        assert isinstance(method, SharpKDParams) and method.temperature == 2.0
        assert "SharpKDParams" in json.dumps(get_pipeline_model().model_json_schema())
        with pytest.raises(ConfigError, match=r"stages\.distill\.method\.temperature"):  # its own fields checked
            load_config(write_config(text.replace("temperature: 2.0", "temperature: -1")))
    with pytest.raises(ConfigError, match="sharp_kd"):  # unregistered again: refused again
        load_config(write_config(text))


def test_a_stage_type_registered_after_import_runs(write_config: Callable[..., Path], tmp_path: Path) -> None:
    text = """
    version: 1
    name: echo
    device: cpu
    data: {kind: synthetic, num_classes: 2, num_samples: 16, image_size: 8}
    stages:
      hello: {type: echo, message: hello plugin}
    """
    with registered(STAGES, "echo", EchoStage):
        summary = PipelineRunner(load_config(write_config(text)), tmp_path / "run").run()
        assert "EchoConfig" in json.dumps(get_pipeline_model().model_json_schema())
        with pytest.raises(ConfigError, match=r"stages\.hello\.message"):
            load_config(write_config(text.replace("message: hello plugin", "mesage: hi")))
    result = json.loads((tmp_path / "run" / "hello" / "result.json").read_text())
    assert result["metrics"] == {"length": len("hello plugin")}
    assert [s.name for s in summary.stages] == ["hello"]


PLUGIN_PIPELINE = """
version: 1
name: plugin-format
seed: 0
device: cpu
data: {kind: digits, image_size: 16, augment: none, val_fraction: 0.0}
stages:
  distill:
    type: distill
    student: resnet8
    method: {name: ce}
    train: {epochs: 1, batch_size: 64, lr: 0.05}
  ts:
    type: export
    format: torchscript
    options: {freeze: false}
  onnx:
    type: export
    needs: [distill]
  bench:
    type: benchmark
    needs: [ts, onnx]
    backends: [torchscript-file, onnxruntime]
    batch_sizes: [1]
    warmup: 1
    min_iterations: 2
    min_time_s: 0.01
    threads: 1
  serve:
    type: serve
    needs: [ts]
"""


def test_a_plugin_format_and_backend_run_through_the_pipeline(
    plugin: None, write_config: Callable[..., Path], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    with pytest.raises(StageError, match="'torchscript', which Triton cannot serve"):  # the format says so
        PipelineRunner(load_config(write_config(PLUGIN_PIPELINE)), run).run()

    ts = json.loads((run / "ts" / "result.json").read_text())
    assert ts["artifacts"]["model"] == "model.ts" and (run / "ts" / "model.ts").is_file()
    assert ts["info"]["format"] == "torchscript" and ts["info"]["frozen"] is False  # its options reached it
    # parity ran the TorchScript file against the PyTorch student, with the base class's fp32 gates
    assert ts["info"]["parity"]["passed"] and ts["info"]["parity"]["tolerances"]["max_abs_diff"] == 1e-3
    assert ts["metrics"]["top1_agreement"] == 1.0

    cells = json.loads((run / "bench" / "result.json").read_text())["info"]["cells"]
    by_backend = {(c["backend"], c["model"]) for c in cells if not c.get("error")}
    # the file backend got the .ts export and nothing else (not the student's safetensors, not the .onnx);
    # onnxruntime got the .onnx only
    assert by_backend == {("torchscript-file", "resnet8 torchscript"), ("onnxruntime", "resnet8 onnx")}

    # stand-alone kdpipe bench picks the plugin backend for a .ts file
    cells = benchmark_file(
        run / "ts" / "model.ts", batch_sizes=[1], input_shape=(1, 16, 16), warmup=0, min_iterations=1, min_time_s=0
    )
    assert [c.backend for c in cells] == ["torchscript-file"] and not cells[0].error

    listed = CliRunner().invoke(cli, ["list", "formats"])
    assert "torchscript" in listed.output and ".ts" in listed.output


def test_plugin_format_options_are_validated_and_unservable_formats_refused(
    plugin: None, write_config: Callable[..., Path]
) -> None:
    bad = PLUGIN_PIPELINE.replace("options: {freeze: false}", "options: {freze: false}")
    with pytest.raises(ConfigError, match=r"stages\.ts\.options.*freze"):
        load_config(write_config(bad))
    with pytest.raises(ConfigError, match=r"torchscrpt.*did you mean 'torchscript'"):
        load_config(write_config(PLUGIN_PIPELINE.replace("format: torchscript", "format: torchscrpt")))


def test_an_installed_entry_point_plugin_is_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kdpipe import plugins

    # A distribution as pip would install it: a module and a dist-info whose entry_points.txt names it.
    (tmp_path / "kdpipe_demo_plugin.py").write_text(
        textwrap.dedent(
            """
            from typing import Literal
            from kdpipe.distill.methods.kd import HintonKD, KDParams
            from kdpipe.registry import METHODS

            class DemoParams(KDParams):
                name: Literal["demo_kd"] = "demo_kd"

            @METHODS.register("demo_kd", summary="a method from an installed plugin")
            class DemoKD(HintonKD):
                Params = DemoParams
            """
        )
    )
    (tmp_path / "broken_plugin.py").write_text("raise ImportError('missing dependency foo')\n")
    info = tmp_path / "kdpipe_demo_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kdpipe-demo-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[kdpipe.plugins]\ndemo = kdpipe_demo_plugin\nbroken = broken_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        loaded = plugins.load_plugins()
        assert loaded["demo"] == "kdpipe_demo_plugin" and "demo_kd" in METHODS
        assert "missing dependency foo" in plugins.FAILED["broken"]  # reported, not fatal
        listed = CliRunner().invoke(cli, ["list", "methods"])
        assert "demo_kd" in listed.output and "installed plugin" in listed.output
    finally:
        if "demo_kd" in METHODS:
            METHODS.unregister("demo_kd")
        plugins._LOADED.pop("demo", None)
        plugins.FAILED.pop("broken", None)
        sys.modules.pop("kdpipe_demo_plugin", None)


def test_contributing_recipes_name_what_exists() -> None:
    """CONTRIBUTING.md's recipes stay true: every file and test they name exists, every test function they cite is
    in this module (so each recipe is exercised), and the base classes and hooks they tell you to use are real."""
    import re

    from kdpipe.bench.backends import Backend as BackendBase
    from kdpipe.stages.base import StageContext

    text = (Path(__file__).resolve().parents[1] / "CONTRIBUTING.md").read_text(encoding="utf-8")
    root = Path(__file__).resolve().parents[1]
    paths = set(re.findall(r"`((?:kdpipe|tests)/[\w/]+\.py)`", text))
    assert len(paths) >= 10
    assert all((root / p).is_file() for p in paths), [p for p in paths if not (root / p).is_file()]
    cited = set(re.findall(r"`(test_\w+)`", text))
    here = {name for name in globals() if name.startswith("test_")}
    assert cited and cited <= here | {"test_every_offline_method_is_pinned"}, cited - here
    for cls, attrs in (
        (ExportFormat, ("name", "suffix", "requires", "hint", "needs_cuda", "parity", "Params", "triton_platform",
                        "export", "open_runner")),
        (BackendBase, ("needs", "consumes", "needs_cuda", "timed", "load", "cell", "version", "check_available")),
        (Stage, ("Config", "provides", "requires", "requirements", "run")),
        (StageContext, ("find", "find_all", "dir")),
    ):  # fmt: skip
        declared = {*getattr(cls, "__dataclass_fields__", {}), *getattr(cls, "__annotations__", {})}
        missing = [a for a in attrs if not hasattr(cls, a) and a not in declared]
        assert not missing, (cls.__name__, missing)


class BrokenModelStage(EchoStage):
    """Says it provides a model but records no model name: the engine must refuse its output."""

    Output = ModelOutput
    provides = frozenset({"model"})


def test_a_stage_output_is_checked_against_its_declared_type(write_config: Callable[..., Path], tmp_path: Path) -> None:
    text = """
    version: 1
    name: broken
    device: cpu
    data: {kind: synthetic, num_classes: 2, num_samples: 16, image_size: 8}
    stages:
      hello: {type: echo, message: hi}
    """
    with (
        registered(STAGES, "echo", BrokenModelStage),
        pytest.raises(StageError, match=r"not its ModelOutput: model_name: Field required"),
    ):
        PipelineRunner(load_config(write_config(text)), tmp_path / "run").run()
    assert not (tmp_path / "run" / "hello" / "result.json").exists()  # never recorded as finished
    with registered(STAGES, "echo", EchoStage):
        PipelineRunner(load_config(write_config(text)), tmp_path / "ok").run()
        record = StageRecord("hello", "echo", tmp_path / "ok" / "hello", {"info": {}})
        with pytest.raises(StageError, match=r"records a Output, not a ModelOutput"):
            record.output(ModelOutput)
