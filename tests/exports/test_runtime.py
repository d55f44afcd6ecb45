"""onnxruntime sessions and batched runs, as parity and the benchmark use them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kdpipe.errors import ConfigError, ExportError
from kdpipe.exports import (
    OnnxRunner,
    Preprocessing,
    create_onnx_runner,
    create_onnx_session,
    export_onnx,
    onnx_providers,
    run_onnx,
    session_summary,
)

PRE = Preprocessing(mean=(0.5,), std=(0.5,), image_size=8, in_chans=1, channel_order="L", classes=("a", "b", "c"))


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).relu().mean((2, 3)))


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return Tiny().eval()


@pytest.fixture(scope="module")
def tiny_onnx(tiny: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("runtime") / "tiny.onnx"
    export_onnx(tiny, path, preprocessing=PRE, simplify=False)
    return path


def test_providers_prefer_cuda_and_always_end_with_cpu() -> None:
    providers = onnx_providers()
    assert providers[-1] == "CPUExecutionProvider"
    assert set(providers) <= {"CUDAExecutionProvider", "CPUExecutionProvider"}


def test_runner_batches_numpy_and_tensors_like_torch(tiny: nn.Module, tiny_onnx: Path) -> None:
    runner = create_onnx_runner(tiny_onnx, threads=1, batch_size=3)
    assert isinstance(runner, OnnxRunner)
    x = torch.randn(7, 1, 8, 8)
    with torch.inference_mode():
        expected = tiny(x).numpy()
    np.testing.assert_allclose(runner(x.numpy()), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(run_onnx(runner.session, x, batch_size=100), expected, rtol=1e-4, atol=1e-5)
    summary = session_summary(runner.session)
    assert summary["providers"] == ["CPUExecutionProvider"]
    assert summary["input"] == {"name": "input", "shape": ["batch", 1, 8, 8], "type": "tensor(float)"}


def test_bad_arguments_and_inputs_are_reported(tiny_onnx: Path) -> None:
    with pytest.raises(ConfigError, match="threads must be >= 0"):
        create_onnx_session(tiny_onnx, threads=-1)
    session = create_onnx_session(tiny_onnx, threads=1)
    with pytest.raises(ConfigError, match="batch_size"):
        run_onnx(session, np.zeros((2, 1, 8, 8), np.float32), batch_size=0)
    with pytest.raises(ExportError, match="shape \\(2, 3, 8, 8\\)") as err:
        run_onnx(session, np.zeros((2, 3, 8, 8), np.float32), batch_size=2)
    assert err.value.hint and "channels" in err.value.hint
    with pytest.raises(ExportError, match="cannot load"):
        create_onnx_session(b"not an onnx model")
