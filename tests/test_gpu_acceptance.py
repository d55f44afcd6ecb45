"""benchmarks/gpu_acceptance.py, the one prepared GPU check (issue 21), rehearsed on CPU: its ``--dry-run`` really
trains, exports and benchmarks here, on scikit-learn's digits (no shared data needed), and must leave every part
either ok or skipped because it needs CUDA; and tests/conftest.py's ``--require-gpu``, which turns the skips of gpu and
tensorrt tests into failures on the machine that must run them."""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from tests.conftest import REPO, load_module

SCRIPT = REPO / "benchmarks" / "gpu_acceptance.py"
CPU_PARTS = ("wheels", "environment", "methods", "throughput", "torchrun", "gpu_tests")
CUDA_PARTS = ("onnxruntime_cuda", "tensorrt")
PROBE = "kdpipe_acceptance_probe"


def _wheel(folder: Path) -> Path:
    """A real, minimal pure-Python wheel (module, METADATA, WHEEL and a hashed RECORD) for ``--wheels``."""
    folder.mkdir(parents=True, exist_ok=True)
    info = f"{PROBE}-0.1.dist-info"
    files = {
        f"{PROBE}/__init__.py": '__version__ = "0.1"\n',
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {PROBE}\nVersion: 0.1\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }

    def digest(text: str) -> str:
        raw = hashlib.sha256(text.encode()).digest()
        return "sha256=" + base64.urlsafe_b64encode(raw).decode().rstrip("=")

    record = "".join(f"{name},{digest(text)},{len(text.encode())}\n" for name, text in files.items())
    path = folder / f"{PROBE}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in {**files, f"{info}/RECORD": record + f"{info}/RECORD,,\n"}.items():
            archive.writestr(name, text)
    return path


@pytest.fixture(scope="module")
def acceptance() -> Iterator[ModuleType]:
    sys.path.insert(0, str(REPO / "benchmarks"))  # the script imports its siblings _common and acceptance/
    try:
        yield load_module(SCRIPT, "gpu_acceptance")
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, str]:
    """One ``--dry-run`` on digits with a carried wheel: (the JSON, its path, the output). About a minute on 2 cores."""
    tmp = tmp_path_factory.mktemp("acceptance")
    _wheel(tmp / "wheels")
    out = tmp / "gpu_acceptance_dryrun.json"
    env = {k: v for k, v in os.environ.items() if k != "KDPIPE_REQUIRE_GPU"}
    env["KDPIPE_CACHE"] = str(tmp / "cache")  # the autouse isolation fixture has not run yet at module scope
    argv = [sys.executable, str(SCRIPT), "--dry-run", "--data", "digits", "--wheels", str(tmp / "wheels")]
    proc = subprocess.run(
        [*argv, "--out", str(out), "--work", str(tmp / "work")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return json.loads(out.read_text(encoding="utf-8")), out, output


def test_dry_run_writes_one_json_and_one_markdown(dry_run: tuple[dict[str, Any], Path, str]) -> None:
    result, path, _ = dry_run
    assert result["benchmark"] == "gpu_acceptance_dryrun" and result["dry_run"] is True
    assert result["environment"]["commit"] and result["environment"]["torch"] == torch.__version__
    markdown = path.with_suffix(".md").read_text(encoding="utf-8")
    assert markdown.startswith("# kdpipe GPU acceptance (dry run on CPU)")
    for name in (*CPU_PARTS, *CUDA_PARTS):
        assert f"| {name} | " in markdown


def test_every_part_has_a_status_cpu_parts_ran_and_cuda_parts_say_why(
    dry_run: tuple[dict[str, Any], Path, str], acceptance: ModuleType
) -> None:
    parts = dry_run[0]["parts"]
    assert list(parts) == list(acceptance.PARTS)
    for name in CPU_PARTS:
        assert parts[name]["status"] == "ok", (name, parts[name]["error"], parts[name]["reason"])
    for name in CUDA_PARTS:
        assert parts[name]["status"] == "skipped" and "CUDA" in parts[name]["reason"], parts[name]
    assert all(p["seconds"] >= 0 for p in parts.values())
    # What needs CUDA is "not measured" with the reason, never a met or missed target.
    targets = dry_run[0]["targets"]
    assert not [k for k, t in targets.items() if t["met"] is False]
    assert targets["throughput.images_per_s_eager"]["met"] is None
    assert "CUDA" in targets["throughput.images_per_s_eager"]["why"]
    assert dry_run[0]["all_targets_met"] is True


def test_the_carried_wheel_was_installed_and_kdpipe_comes_from_the_checkout(
    dry_run: tuple[dict[str, Any], Path, str],
) -> None:
    wheels = dry_run[0]["parts"]["wheels"]["results"]
    assert wheels["wheels"] == [f"{PROBE}-0.1-py3-none-any.whl"]
    assert f"{PROBE}-0.1.dist-info" in wheels["installed"]
    kdpipe = wheels["importable"]["kdpipe"]
    assert kdpipe["importable"] and Path(kdpipe["from"]) == REPO / "kdpipe"
    assert wheels["importable"]["onnxruntime"]["providers"]


def test_every_registered_method_trained_in_every_cpu_precision(dry_run: tuple[dict[str, Any], Path, str]) -> None:
    import kdpipe.distill.methods  # noqa: F401  (registers the methods)
    from kdpipe.registry import METHODS

    methods = dry_run[0]["parts"]["methods"]["results"]
    registered = [entry.name for entry in METHODS.in_registration_order()]
    assert methods["methods"] == registered and len(registered) >= 9
    cells = {(c["method"], c["precision_requested"]): c for c in methods["cells"]}
    for name in registered:
        for precision in ("fp32", "bf16"):
            cell = cells[name, precision]
            assert cell["status"] == "ok" and cell["loss_finite"] and cell["steps"] == 3, cell
        assert cells[name, "fp16"]["status"] == "skipped" and "CUDA" in cells[name, "fp16"]["reason"]


def test_the_stand_ins_really_ran(dry_run: tuple[dict[str, Any], Path, str]) -> None:
    """Not mocks: a data-parallel run on two gloo ranks, a real export in parity, QDQ graphs TensorRT accepts, the
    throughput smoke run and the suite's gpu tests, all measured here."""
    parts = dry_run[0]["parts"]
    torchrun = parts["torchrun"]["results"]
    assert torchrun["summary_status"] == "ok" and torchrun["world_size"] == 2
    assert torchrun["distributed_backend"] == "gloo" and parts["torchrun"]["targets"]["kdpipe_backend"]["met"] is True
    assert torchrun["kdpipe_process_group"] == "gloo" and torchrun["probe"]["all_reduce_ok"]
    assert torchrun["probe"]["kdpipe_world"]["backend"] == "gloo"

    onnx = parts["onnxruntime_cuda"]["results"]
    assert onnx["student"]["test_top1"] > 0.3  # a few epochs on digits: far above chance (0.1)
    stand_in = onnx["cpu_stand_in"]
    assert stand_in["session_providers"][0] == "CPUExecutionProvider"
    assert stand_in["parity"]["passed"] and stand_in["parity"]["num_samples"] > 300
    assert all(c["error"] is None and c["throughput"] > 0 for c in stand_in["bench"])

    trt = parts["tensorrt"]["results"]
    assert {"fp16", "int8"} <= set(trt["graphs"])
    assert trt["cpu_stand_in"]["kdpipe_bench_cli"]["rc"] == 0
    if trt["qad"]["status"] != "skipped":  # nvidia-modelopt is in the export extra, so it runs in CI
        assert trt["qad"]["status"] == "ok" and "qad-int8" in trt["graphs"]

    eager = parts["throughput"]["results"]["variants"]["eager"]
    assert eager["status"] == "ok" and eager["kdpipe_images_per_s"] > 0 and eager["plain_images_per_s"] > 0

    tests = parts["gpu_tests"]["results"]
    assert tests["require_gpu"] is False and tests["counts"]["failed"] == 0
    assert tests["counts"]["skipped"] >= 5
    assert all("CUDA" in c["message"] or "tensorrt" in c["message"] for c in tests["cases"])


def test_the_gpu_command_lines_parse(acceptance: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """The train_throughput.py arguments of the GPU run are accepted (a typo there would cost a GPU lease)."""
    throughput = load_module(REPO / "benchmarks" / "train_throughput.py", "train_throughput")
    training = importlib.import_module("acceptance.training")  # the package the script runs the parts from
    modes = []
    for name, args, timeout in training.throughput_variants(dry_run=False):
        monkeypatch.setattr(sys, "argv", ["train_throughput.py", *args])
        parsed = throughput.parse_args()
        assert parsed.batch_sizes == [512] and parsed.precision == "bf16" and timeout > 0
        modes.append((name, parsed.compile, parsed.compile_mode))
    assert modes == [
        ("eager", False, "default"),
        ("compile", True, "default"),
        ("reduce-overhead", True, "reduce-overhead"),
    ]
    monkeypatch.setattr(sys, "argv", ["train_throughput.py", "--compile-mode", "reduce-overhead"])
    with pytest.raises(SystemExit):
        throughput.parse_args()  # a mode without --compile would silently measure eager


def test_engines_are_gated_as_the_export_stage_gates_them(acceptance: ModuleType) -> None:
    """The TensorRT part takes its parity gates from the registered format, per engine precision: an int8 engine
    gets onnx-int8's (no bound on logits), an fp16 one the tensorrt format's own."""
    from kdpipe.exports.formats import OnnxFormat, OnnxInt8Format, TensorRTFormat

    exports = importlib.import_module("acceptance.exports")
    assert exports.default_gates("tensorrt", "int8") == OnnxInt8Format.parity
    assert exports.default_gates("tensorrt", "fp16") == TensorRTFormat.parity
    assert exports.default_gates("onnx") == OnnxFormat.parity


_DUMMY_TESTS = """
import pytest

@pytest.mark.gpu
def test_needs_a_gpu():
    pass

@pytest.mark.tensorrt
def test_needs_tensorrt():
    pass

def test_plain():
    pass

def test_skips_for_its_own_reason():
    pytest.skip("not a gpu test")
"""


def _pytest(folder: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "KDPIPE_REQUIRE_GPU"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *args, str(folder)],
        cwd=folder,
        capture_output=True,
        text=True,
        env={**environ, "COLUMNS": "300", **env},  # the short summary keeps whole lines
        timeout=120,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="the switch is checked where gpu tests cannot run")
def test_require_gpu_turns_the_skips_of_gpu_and_tensorrt_tests_into_failures(tmp_path: Path) -> None:
    """The project's own conftest.py on dummy tests: skipped by default, failed with the reason under the switch
    (option or environment variable); a test without the markers keeps its skip either way."""
    (tmp_path / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text(encoding="utf-8"))
    (tmp_path / "pytest.ini").write_text(
        textwrap.dedent(
            """\
            [pytest]
            addopts = --strict-markers
            markers =
                slow: slow
                gpu: gpu
                tensorrt: tensorrt
            """
        )
    )
    (tmp_path / "test_dummy.py").write_text(_DUMMY_TESTS)

    default = _pytest(tmp_path)
    assert default.returncode == 0, default.stdout
    assert "1 passed, 3 skipped" in default.stdout
    assert "needs a CUDA GPU" in default.stdout and "FAILED" not in default.stdout

    for run in (_pytest(tmp_path, "--require-gpu"), _pytest(tmp_path, KDPIPE_REQUIRE_GPU="1")):
        assert run.returncode == 1, run.stdout
        assert "2 failed, 1 passed, 1 skipped" in run.stdout
        assert (
            "FAILED test_dummy.py::test_needs_a_gpu - --require-gpu: this gpu test cannot run here: needs a CUDA GPU"
            in (run.stdout)
        )
        assert (
            "test_needs_tensorrt - --require-gpu: this tensorrt test cannot run here: needs the tensorrt package"
            in (run.stdout)
        )
        assert "SKIPPED [1] test_dummy.py" in run.stdout and "not a gpu test" in run.stdout
