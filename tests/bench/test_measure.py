"""The timing core and the backends, on a tiny resnet8 (1x16x16): statistics, per-backend cells, error rows."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import kdpipe.bench  # noqa: F401  (registers the backends)
from kdpipe.bench.measure import (
    BenchCell,
    run_benchmark,
    summarize,
    time_iterations,
)
from kdpipe.bench.memory import MEMORY_SCOPES, PeakMemory
from kdpipe.bench.target import BenchTarget
from kdpipe.environment import resolve_device
from kdpipe.errors import ConfigError
from kdpipe.models.factory import create_model
from kdpipe.registry import BACKENDS

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

SHAPE = (1, 16, 16)
FAST = {"warmup": 1, "min_iterations": 3, "min_time_s": 0.0, "max_iterations": 3}


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return create_model("resnet8", num_classes=10, in_chans=1).eval()


def export_onnx(model: nn.Module, path: Path, dynamic: bool = True) -> Path:
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None
    torch.onnx.export(
        model,
        torch.randn(1, *SHAPE),
        str(path),
        dynamo=False,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes=axes,
        opset_version=17,
    )
    return path


@pytest.fixture(scope="module")
def onnx_files(tiny: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("onnx")
    return {
        "dynamic": export_onnx(tiny, folder / "dynamic.onnx"),
        "static": export_onnx(tiny, folder / "static.onnx", dynamic=False),
    }


def check_ok(cell: BenchCell) -> None:
    assert cell.error is None, cell.error
    assert cell.p50_ms is not None and cell.p90_ms is not None and cell.p99_ms is not None
    assert 0 < cell.p50_ms <= cell.p90_ms <= cell.p99_ms
    assert cell.mean_ms is not None and cell.throughput is not None and cell.std_ms is not None
    assert cell.throughput == pytest.approx(cell.batch_size * 1000.0 / cell.mean_ms)
    assert cell.std_ms >= 0
    assert cell.iterations == 3 and cell.warmup == 1
    assert cell.memory_scope in MEMORY_SCOPES
    assert cell.peak_memory_bytes is not None and cell.peak_memory_bytes > 0
    assert cell.device == "cpu" and cell.timer == "perf_counter_ns"


def test_summarize_percentiles_are_ordered_and_throughput_is_batch_over_mean() -> None:
    stats = summarize([1.0, 2.0, 3.0, 4.0, 100.0], batch_size=8)
    assert stats["p50_ms"] == 3.0
    assert stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"] <= 100.0
    assert stats["mean_ms"] == pytest.approx(22.0)
    assert stats["throughput"] == pytest.approx(8 * 1000 / 22.0)
    assert summarize([5.0], 1)["std_ms"] == 0.0
    with pytest.raises(ValueError):
        summarize([], 1)


def test_time_iterations_stops_at_the_minimums_and_the_cap() -> None:
    calls = []
    latencies = time_iterations(lambda: calls.append(1), warmup=2, min_iterations=4, min_time_s=0.0, max_iterations=9)
    assert len(latencies) == 4 and len(calls) == 6  # 2 warm-up + 4 timed
    capped = time_iterations(lambda: None, warmup=0, min_iterations=1, min_time_s=60.0, max_iterations=5)
    assert len(capped) == 5  # the minimum time is never reached: the cap ends it


def test_torch_backend_cells(tiny: nn.Module) -> None:
    before = torch.get_num_threads()
    cells = run_benchmark([BenchTarget("r8", "torch", None, tiny)], [1, 2], SHAPE, threads=1, **FAST)
    assert [c.batch_size for c in cells] == [1, 2]
    for cell in cells:
        check_ok(cell)
        assert cell.backend == "torch" and cell.threads == 1 and cell.version.startswith("torch ")
        assert "memory_format=" in cell.notes
        assert cell.model_bytes == sum(t.numel() * t.element_size() for t in tiny.state_dict().values())
    assert torch.get_num_threads() == before
    assert next(tiny.parameters()).is_contiguous()  # the caller's module was copied, not converted


def test_torch_threads_are_set_for_the_cell_and_restored() -> None:
    seen: list[int] = []

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(torch.get_num_threads())
            return x.mean(dim=(1, 2, 3))

    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    (cell,) = run_benchmark([BenchTarget("probe", "torch", None, Probe())], [1], SHAPE, threads=wanted, **FAST)
    assert cell.error is None and cell.threads == wanted
    assert set(seen) == {wanted}
    assert torch.get_num_threads() == before


def test_onnxruntime_backend_cells(onnx_files: dict[str, Path]) -> None:
    path = onnx_files["dynamic"]
    cells = run_benchmark([BenchTarget("r8", "onnxruntime", path)], [1, 4], SHAPE, threads=1, **FAST)
    for cell in cells:
        check_ok(cell)
        assert cell.version.startswith("onnxruntime ") and cell.notes == "provider=CPUExecutionProvider"
        assert cell.model_bytes == path.stat().st_size and cell.threads == 1


def test_failing_cells_become_error_rows_and_the_rest_still_run(tiny: nn.Module, onnx_files, tmp_path) -> None:
    class FailsAtBatch4(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] >= 4:
                raise RuntimeError("CUDA out of memory (simulated)")
            return x.flatten(1)

    targets = [
        BenchTarget("static", "onnxruntime", onnx_files["static"]),
        BenchTarget("missing", "onnxruntime", tmp_path / "nope.onnx"),
        BenchTarget("oom", "torch", None, FailsAtBatch4()),
        BenchTarget("r8", "torch", None, tiny),
    ]
    cells = run_benchmark(targets, [1, 4], SHAPE, threads=1, **FAST)
    by = {(c.model, c.batch_size): c for c in cells}
    assert len(cells) == 8
    check_ok(by["static", 1])
    assert "static batch of 1" in (by["static", 4].error or "")
    assert by["static", 4].p50_ms is None and by["static", 4].throughput is None and by["static", 4].iterations == 0
    for batch in (1, 4):
        assert "nope.onnx" in (by["missing", batch].error or "") and by["missing", batch].model_bytes is None
        check_ok(by["r8", batch])
    check_ok(by["oom", 1])
    assert by["oom", 4].error == "RuntimeError: CUDA out of memory (simulated)"


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_tensorrt_without_the_package_is_an_error_row(tmp_path: Path) -> None:
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"not an engine")
    (cell,) = run_benchmark([BenchTarget("trt", "tensorrt", engine)], [1], SHAPE, **FAST)
    assert "tensorrt package" in (cell.error or "") and cell.version == "tensorrt (not installed)"
    with pytest.raises(ConfigError, match="pip install tensorrt"):
        BACKENDS.get("tensorrt").check_available()


@pytest.mark.slow
def test_torch_compile_backend_records_compile_time_apart(tiny: nn.Module) -> None:
    cells = run_benchmark([BenchTarget("r8", "torch-compile", None, tiny)], [1, 2], SHAPE, threads=1, **FAST)
    for cell in cells:
        check_ok(cell)
        assert cell.compile_s is not None and cell.compile_s > 0


def test_bad_settings_and_targets_are_config_errors(tiny: nn.Module) -> None:
    target = BenchTarget("r8", "torch", None, tiny)
    with pytest.raises(ConfigError, match="did you mean 'onnxruntime'"):
        run_benchmark([BenchTarget("r8", "onnxruntim", Path("x.onnx"))], [1], SHAPE)
    with pytest.raises(ConfigError, match=r"runs an nn\.Module"):
        run_benchmark([BenchTarget("r8", "torch", Path("x.pt"))], [1], SHAPE)
    with pytest.raises(ConfigError, match="no path"):
        run_benchmark([BenchTarget("r8", "onnxruntime", None, tiny)], [1], SHAPE)
    with pytest.raises(ConfigError, match="batch sizes"):
        run_benchmark([target], [0], SHAPE)
    with pytest.raises(ConfigError, match="input_shape"):
        run_benchmark([target], [1], (16, 16))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_iterations"):
        run_benchmark([target], [1], SHAPE, min_iterations=10, max_iterations=5)


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match=r"'tpu' is not a device"):
        resolve_device("tpu")
    with pytest.raises(ConfigError, match=r"'meta' is not supported"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available here"):
            resolve_device("cuda")


def test_progress_advances_once_per_cell(tiny: nn.Module) -> None:
    advanced: list[int] = []

    class Task:
        def advance(self, n: int = 1, **fields: object) -> None:
            advanced.append(n)

        def close(self) -> None:
            advanced.append(0)

    class Recorder:
        def task(self, description: str, total: int | None) -> Task:
            assert total == 2
            return Task()

    run_benchmark([BenchTarget("r8", "torch", None, tiny)], [1, 2], SHAPE, progress=Recorder(), **FAST)
    assert advanced == [1, 1, 0]


def test_cpu_peak_memory_is_the_process_high_water_mark() -> None:
    tracker = PeakMemory(None, torch.device("cpu"))
    assert tracker.scope in ("process-rss-cell", "process-rss-lifetime")
    tracker.reset()
    block = bytearray(64 << 20)  # touch 64 MiB so the resident set grows
    block[::4096] = b"\x01" * len(block[::4096])
    peak = tracker.peak()
    assert peak is not None and peak >= 64 << 20


@pytest.mark.parametrize("name", BACKENDS.names(), ids=lambda n: f"backend={n}")
def test_every_registered_backend_documents_what_it_times(name: str) -> None:
    entry = BACKENDS.get_entry(name)
    assert entry.obj.name == name and len(entry.obj.timed) > 40 and entry.summary
