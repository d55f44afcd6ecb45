"""``kdpipe doctor``: the machine's versions, devices and providers as they really are, and for a config every
requirement its stages, device and tracking declare, with exit 2 and one line (and install hint) per missing one."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import onnxruntime
import pytest
import torch
from click.testing import CliRunner, Result

import kdpipe
from kdpipe.doctor import doctor_command, facts, render
from kdpipe.requirements import module_available
from tests.conftest import TINY


def doctor(*args: str | Path) -> Result:
    return CliRunner().invoke(doctor_command, [str(a) for a in args], catch_exceptions=False)


def test_json_report_matches_the_machine() -> None:
    result = doctor("--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["kdpipe"] == kdpipe.__version__ and report["ok"] and report["missing"] == []
    assert report["python"]["executable"] == sys.executable
    packages = report["packages"]
    assert packages["torch"]["version"] == torch.__version__
    assert packages["onnxruntime"]["version"] == onnxruntime.__version__
    assert report["onnxruntime_providers"] == onnxruntime.get_available_providers()
    assert (packages["tensorrt"]["version"] is None) == (not module_available("tensorrt"))
    for name in ("torchvision", "timm", "onnx", "onnxslim", "pydantic", "mlflow", "tensorboard"):
        assert name in packages
    assert report["cuda"]["available"] == torch.cuda.is_available()
    assert len(report["cuda"]["devices"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert report["cpu"]["count"] == os.cpu_count() and report["cpu"]["torch_threads"] == torch.get_num_threads()


def test_human_report() -> None:
    result = doctor()
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0] == f"kdpipe {kdpipe.__version__} doctor"
    by_label = {line.split()[0]: line for line in lines[1:] if line.startswith("  ")}
    assert torch.__version__ in by_label["torch"] and "providers: " in by_label["onnxruntime"]
    assert by_label["tensorrt"].split(None, 1)[1].startswith("not installed") != module_available("tensorrt")
    assert ("not available" in by_label["CUDA"]) != torch.cuda.is_available()
    assert f"of {os.cpu_count()}" in by_label["CPUs"]


def test_config_with_everything_here(write_config: Callable[..., Path]) -> None:
    result = doctor(write_config())
    assert result.exit_code == 0, result.stderr
    assert "stages.yaml: valid; stages: teacher, distill, verify, card" in result.stdout


NEEDY = (
    TINY.replace("device: cpu", "device: cuda")
    + """\
  onnx:
    type: export
    needs: [distill]
    format: onnx
  trt:
    type: export
    needs: [distill]
    format: tensorrt
  bench:
    type: benchmark
    needs: [onnx]
    device: cuda
    backends: [torch, onnxruntime]
tracking:
  mlflow: {}
"""
)


def test_config_needs_what_is_missing(write_config: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if mlflow were not installed
    cfg = write_config(NEEDY)
    lines = cfg.read_text().splitlines()

    def at(text: str, start: int = 0) -> str:
        return f"{cfg}:{lines.index(text, start) + 1}"

    cuda = torch.cuda.is_available()
    expected = [f"{at('  mlflow: {}')}: tracking.mlflow: needs mlflow"]
    if not cuda:
        expected.insert(0, f"{at('device: cuda')}: device: 'cuda' asked for, but CUDA is not available here")
    if not module_available("tensorrt"):
        expected.append(f"{at('    format: tensorrt')}: stages.trt.format: 'tensorrt' needs tensorrt")
    if not cuda:
        expected.append(f"{at('    format: tensorrt')}: stages.trt.format: 'tensorrt' asked for, but CUDA is not")
        expected.append(f"{at('    device: cuda')}: stages.bench.device: 'cuda' asked for, but CUDA is not")
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        expected.append(f"{at('    backends: [torch, onnxruntime]')}: stages.bench.backends: 'onnxruntime' on the GPU")

    result = doctor(cfg)
    assert result.exit_code == 2
    assert f"{cfg}: {len(expected)} thing(s) needed are missing here" in result.stderr
    listed = [line.strip()[2:] for line in result.stderr.splitlines() if line.startswith("  - ")]
    assert len(listed) == len(expected)
    for line, start in zip(listed, expected, strict=True):
        assert line.startswith(start), (line, start)
        assert "; hint: " in line
    assert 'pip install "kdpipe[tracking]"' in listed[expected.index(next(e for e in expected if "mlflow" in e))]
    report = json.loads(doctor(cfg, "--json").stdout)
    assert report["missing"] == listed and report["exit_code"] == 2 and not report["ok"]
    met = {(r["what"], r["field"]) for r in report["requirements"] if r["available"]}
    assert {
        ("onnx", "stages.onnx.format"),
        ("onnxruntime", "stages.onnx.format"),
        ("torch", "stages.bench.backends"),
    } <= met
    assert "MISSING  mlflow" in result.stdout and "(kdpipe run refuses to start)" in result.stdout


def test_invalid_config_and_missing_data(write_config: Callable[..., Path]) -> None:
    result = doctor(write_config(TINY.replace("seed: 0", "seed: 0\nsead: 1")))
    assert result.exit_code == 2 and "unknown key 'sead'" in result.stderr and "INVALID" in result.stdout
    report = json.loads(doctor(write_config(TINY.replace("seed: 0", "seed: 0\nsead: 1")), "--json").stdout)
    assert report["config"]["valid"] is False and "sead" in report["config"]["error"]["message"]
    missing_data = write_config(TINY.replace("kind: synthetic,", "kind: imagefolder, root: /nonexistent/data,"))
    result = doctor(missing_data)
    assert result.exit_code == 3 and "/nonexistent/data does not exist" in result.stderr


def test_require(monkeypatch: pytest.MonkeyPatch) -> None:
    assert doctor("--require", "onnx").exit_code == 0
    result = doctor("--require", "cuda", "--require", "onnx")
    assert result.exit_code == (0 if torch.cuda.is_available() else 2)
    if not torch.cuda.is_available():
        assert "--require: 'cuda' asked for, but CUDA is not available here" in result.stderr
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    result = doctor("--require", "tensorboard")
    assert result.exit_code == 2 and "needs tensorboard, which is not installed" in result.stderr
    assert doctor("--require", "gpu").exit_code == 2  # not a choice: a usage error


def test_vnni_is_read_from_the_cpu_flags(tmp_path: Path) -> None:
    from kdpipe.doctor import cpu_vnni

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n")
    assert cpu_vnni(info) is True
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx avx2\n")  # this session's AMD EPYC
    assert cpu_vnni(info) is False
    assert cpu_vnni(tmp_path / "absent") is None
    report = facts()
    assert report["cpu"]["vnni"] == cpu_vnni()
    assert ("  VNNI " in render(report)) == (cpu_vnni() is not None)
