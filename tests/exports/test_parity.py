"""Parity on real images: a resnet8 trained for a few seconds on scikit-learn's digits, exported and compared."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import timm

import kdpipe  # noqa: F401  (registers resnet8 with timm)
from kdpipe.errors import ConfigError, DataError, ExportError, GateFailed
from kdpipe.exports import (
    ParityReport,
    ParityTolerance,
    check_parity,
    create_onnx_runner,
    enforce_parity,
    export_onnx,
    measure_parity,
)
from tests.exports.conftest import Digits


@pytest.fixture(scope="module")
def fp32_onnx(digits: Digits, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("parity") / "digits.onnx"
    export_onnx(digits.model, path, preprocessing=digits.preprocessing)
    return path


def test_fp32_export_matches_torch_on_real_digits(digits: Digits, fp32_onnx: Path) -> None:
    report = measure_parity(
        digits.model, create_onnx_runner(fp32_onnx, threads=1), digits.val_images, digits.val_labels, batch_size=128
    )
    assert report.num_samples == len(digits.val_labels) == 397
    assert report.torch_top1 > 0.9, "the model should be trained, not random"
    assert report.max_abs_diff < 1e-3
    assert report.top1_agreement == 1.0
    assert report.export_top1 == report.torch_top1
    assert 0 <= report.mean_abs_diff <= report.max_abs_diff
    assert report.max_rel_diff < 1e-4
    enforce_parity(report, ParityTolerance(max_abs_diff=1e-3, min_agreement=1.0, max_top1_drop=0.0), label="onnx")
    assert set(report.to_dict()) >= {"num_samples", "max_abs_diff", "top1_agreement", "top1_drop"}


def test_a_broken_export_fails_the_gate_with_the_numbers(digits: Digits, fp32_onnx: Path, tmp_path: Path) -> None:
    model = onnx.load(str(fp32_onnx))
    # Perturb the first convolution's weights by 20% noise: the graph still loads and runs, the logits drift.
    weight = next(t for t in model.graph.initializer if len(t.dims) == 4)
    array = onnx.numpy_helper.to_array(weight)
    noise = np.random.default_rng(0).normal(0.0, 0.2 * float(np.abs(array).mean()), array.shape)
    weight.CopyFrom(onnx.numpy_helper.from_array((array + noise).astype(np.float32), weight.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))

    report = measure_parity(digits.model, create_onnx_runner(broken, threads=1), digits.val_images, digits.val_labels)
    assert report.max_abs_diff > 1e-3
    with pytest.raises(GateFailed) as err:
        enforce_parity(report, ParityTolerance(max_abs_diff=1e-3, min_agreement=0.999), label="onnx")
    assert err.value.exit_code == 4
    assert f"onnx: max |logit diff| {report.max_abs_diff:.4g} > 0.001" in err.value.message


def test_check_parity_reports_each_failed_bound_with_numbers() -> None:
    report = ParityReport(
        num_samples=200,
        max_abs_diff=0.0123,
        mean_abs_diff=0.001,
        max_rel_diff=0.002,
        top1_agreement=0.98,
        torch_top1=0.95,
        export_top1=0.925,
    )
    tol = ParityTolerance(max_abs_diff=0.001, min_agreement=0.99, max_top1_drop=0.01)
    messages = check_parity(report, tol, label="onnx-int8")
    assert messages == [
        "onnx-int8: max |logit diff| 0.0123 > 0.001",
        "onnx-int8: top-1 agreement with PyTorch 0.9800 < 0.9900 (4 of 200 images predicted differently)",
        "onnx-int8: top-1 drop 0.0250 (0.9500 -> 0.9250) > 0.0100",
    ]
    assert check_parity(report, ParityTolerance(), label="x") == []
    # A bound equal to the measured value passes, including fractions that are not exact in binary.
    assert (
        check_parity(report, ParityTolerance(max_abs_diff=0.0123, min_agreement=0.98, max_top1_drop=0.025), label="x")
        == []
    )
    with pytest.raises(GateFailed, match=r"parity gate failed: onnx-int8: max .*; onnx-int8: top-1 agreement"):
        enforce_parity(report, tol, label="onnx-int8")


@pytest.mark.parametrize("field", ["max_abs_diff", "min_agreement", "max_top1_drop"])
def test_negative_tolerance_is_a_config_error(field: str) -> None:
    with pytest.raises(ConfigError, match=f"{field} must be >= 0"):
        ParityTolerance(**{field: -0.1})


def test_fraction_tolerances_above_one_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"min_agreement .* <= 1"):
        ParityTolerance(min_agreement=99.0)
    ParityTolerance(max_abs_diff=5.0)  # logit units: no upper bound


def test_measure_parity_rejects_bad_inputs_and_restores_train_mode(digits: Digits) -> None:
    model = timm.create_model("resnet8", num_classes=10, in_chans=1).train()
    images, labels = digits.val_images[:10], digits.val_labels[:10]

    def wrong_shape(x: np.ndarray) -> np.ndarray:
        return np.zeros((len(x), 3), np.float32)

    with pytest.raises(ExportError, match="shape"):
        measure_parity(model, wrong_shape, images, labels)
    assert model.training
    with pytest.raises(DataError, match="non-empty"):
        measure_parity(model, wrong_shape, images[:0], labels[:0])
    with pytest.raises(DataError, match="labels"):
        measure_parity(model, wrong_shape, images, labels[:5])


def test_nan_logits_fail_every_bound(digits: Digits) -> None:
    def nan_logits(x: np.ndarray) -> np.ndarray:
        return np.full((len(x), 10), np.nan, np.float32)

    report = measure_parity(digits.model, nan_logits, digits.val_images[:16], digits.val_labels[:16])
    assert check_parity(report, ParityTolerance(max_abs_diff=1.0), label="onnx")
