"""Parity between the PyTorch model and an exported one, measured on real validation images, and its gate.

An export can load, run and have the right shapes while computing something else (a wrong opset translation, a
broken simplification, int8 ranges calibrated on the wrong data). Random inputs hide much of that: they never
reach the activation ranges real images do. So parity is measured on the validation set the caller passes (already
normalised, as the model sees it in training), batch by batch through both models:

- ``max_abs_diff`` / ``mean_abs_diff``: over every logit of every image;
- ``max_rel_diff``: per image, max |diff| divided by that image's max |torch logit|, then the max over images. It
  is scale free, so one threshold fits a model whose logits are around 3 and one whose logits are around 30;
- ``top1_agreement``: the fraction of images where both predict the same class;
- ``torch_top1`` / ``export_top1``: each model's own accuracy against the labels.

``parity_gates`` compares a report with a ``ParityTolerance`` (each bound optional), one outcome per bound;
``check_parity`` returns the messages of the failed ones; ``enforce_parity`` turns those into ``GateFailed``
(exit 4). The caller writes its report first.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import nn

from kdpipe.errors import ConfigError, DataError, ExportError, Gate, GateFailed

log = logging.getLogger(__name__)

# A sample whose logits are all ~0 would make the relative difference explode; below this scale (in logit units)
# the difference is divided by this floor instead.
_REL_FLOOR = 1e-6


@dataclass
class ParityReport:
    """How closely an exported model reproduces the PyTorch model on ``num_samples`` validation images."""

    num_samples: int
    max_abs_diff: float
    mean_abs_diff: float
    max_rel_diff: float  # per image max |diff| / max |torch logit|, maximised over images
    top1_agreement: float  # fraction of images where both models predict the same class
    torch_top1: float
    export_top1: float

    @property
    def top1_drop(self) -> float:
        """PyTorch top-1 minus the export's top-1 (positive: the export is worse)."""
        return self.torch_top1 - self.export_top1

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, plus the derived ``top1_drop``."""
        return {**asdict(self), "top1_drop": self.top1_drop}


@dataclass(frozen=True)
class ParityTolerance:
    """Bounds for a parity gate; a bound left None is not checked.

    ``max_abs_diff`` in logit units; ``min_agreement`` and ``max_top1_drop`` as fractions in [0, 1].
    """

    max_abs_diff: float | None = None
    min_agreement: float | None = None
    max_top1_drop: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise ConfigError(f"parity tolerance {f.name} must be a number >= 0, got {value!r}")
            if value < 0:
                raise ConfigError(f"parity tolerance {f.name} must be >= 0, got {value}")
            if f.name != "max_abs_diff" and value > 1:
                raise ConfigError(f"parity tolerance {f.name} is a fraction and must be <= 1, got {value}")


def measure_parity(
    model: nn.Module,
    run_exported: Callable[[np.ndarray], np.ndarray],
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int = 256,
) -> ParityReport:
    """Run ``images`` (N, C, H, W, normalised float) through ``model`` and ``run_exported`` and compare the logits.

    ``model`` runs in eval mode under ``inference_mode`` on the device its parameters are on (its train/eval mode
    is restored afterwards); ``run_exported`` gets float32 numpy batches of up to ``batch_size`` images and must
    return (batch, num_classes) logits. A shape mismatch is an ``ExportError``; no images, or labels that do not
    match the images, a ``DataError``.
    """
    if batch_size < 1:
        raise ConfigError(f"parity batch_size must be >= 1, got {batch_size}")
    if images.ndim != 4 or len(images) == 0:
        raise DataError(
            f"parity needs a non-empty (N, C, H, W) batch of validation images, got shape {tuple(images.shape)}"
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"parity got {len(images)} images but labels of shape {tuple(labels.shape)}")

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()

    max_abs = max_rel = abs_sum = 0.0
    numel = agree = torch_correct = export_correct = 0
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                x = images[start : start + batch_size]
                y = labels[start : start + batch_size].cpu().numpy()
                ref = model(x.to(device)).float().cpu().numpy()
                got = np.asarray(run_exported(np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)))
                if got.shape != ref.shape:
                    raise ExportError(
                        f"exported model returned logits of shape {got.shape} for {len(x)} images; "
                        f"PyTorch gives {ref.shape}",
                        hint="the export's output is not the model's logits; re-export it",
                    )
                got = got.astype(np.float32, copy=False)
                # A NaN or inf logit must fail every bound, not vanish in max() (max(0.0, nan) is 0.0).
                diff = np.nan_to_num(np.abs(got - ref), nan=np.inf)
                max_abs = max(max_abs, float(diff.max()))
                abs_sum += float(diff.sum(dtype=np.float64))
                numel += diff.size
                scale = np.maximum(np.abs(ref).max(axis=1), _REL_FLOOR)
                max_rel = max(max_rel, float((diff.max(axis=1) / scale).max()))
                ref_top, got_top = ref.argmax(axis=1), got.argmax(axis=1)
                agree += int((ref_top == got_top).sum())
                torch_correct += int((ref_top == y).sum())
                export_correct += int((got_top == y).sum())
    finally:
        model.train(was_training)

    n = len(images)
    report = ParityReport(
        num_samples=n,
        max_abs_diff=max_abs,
        mean_abs_diff=abs_sum / numel,
        max_rel_diff=max_rel,
        top1_agreement=agree / n,
        torch_top1=torch_correct / n,
        export_top1=export_correct / n,
    )
    log.info(
        "parity on %d images: max |diff| %.3g, agreement %.4f, top-1 %.4f -> %.4f",
        n,
        report.max_abs_diff,
        report.top1_agreement,
        report.torch_top1,
        report.export_top1,
    )
    return report


# Fractions computed as count / n can land a hair off a bound written by hand (0.99 vs 0.98999...): compare with
# this slack so a tolerance equal to the measured value passes.
_EPS = 1e-9


def parity_gates(report: ParityReport, tol: ParityTolerance, *, label: str) -> list[Gate]:
    """One ``Gate`` per bound of ``tol`` that is set (the verify stage's type, so a run summary lists both alike)."""
    gates: list[Gate] = []

    def gate(name: str, threshold: float, value: float, passed: bool, message: str) -> None:
        gates.append(Gate(name=name, threshold=threshold, value=value, passed=passed, message=message))

    if tol.max_abs_diff is not None:
        ok = report.max_abs_diff <= tol.max_abs_diff + _EPS * tol.max_abs_diff
        rel = "<=" if ok else ">"
        gate(
            "max_abs_diff",
            tol.max_abs_diff,
            report.max_abs_diff,
            ok,
            f"{label}: max |logit diff| {report.max_abs_diff:.4g} {rel} {tol.max_abs_diff:.4g}",
        )
    if tol.min_agreement is not None:
        ok = not report.top1_agreement < tol.min_agreement - _EPS
        differ = round((1 - report.top1_agreement) * report.num_samples)
        rel = ">=" if ok else "<"
        gate(
            "min_agreement",
            tol.min_agreement,
            report.top1_agreement,
            ok,
            f"{label}: top-1 agreement with PyTorch {report.top1_agreement:.4f} {rel} {tol.min_agreement:.4f} "
            f"({differ} of {report.num_samples} images predicted differently)",
        )
    if tol.max_top1_drop is not None:
        ok = not report.top1_drop > tol.max_top1_drop + _EPS
        rel = "<=" if ok else ">"
        gate(
            "max_top1_drop",
            tol.max_top1_drop,
            report.top1_drop,
            ok,
            f"{label}: top-1 drop {report.top1_drop:.4f} ({report.torch_top1:.4f} -> {report.export_top1:.4f}) "
            f"{rel} {tol.max_top1_drop:.4f}",
        )
    return gates


def check_parity(report: ParityReport, tol: ParityTolerance, *, label: str) -> list[str]:
    """One message per bound of ``tol`` that ``report`` fails, with both numbers; empty when all pass."""
    return [g.message for g in parity_gates(report, tol, label=label) if not g.passed]


def enforce_parity(report: ParityReport, tol: ParityTolerance, *, label: str) -> None:
    """Raise ``GateFailed`` (exit 4) listing every failed bound; return quietly when all pass."""
    gates = parity_gates(report, tol, label=label)
    failures = [g.message for g in gates if not g.passed]
    if failures:
        raise GateFailed(
            "parity gate failed: " + "; ".join(failures),
            gates=gates,
            hint="inspect the export (opset, simplification, quantization settings) or loosen the tolerance "
            "in stages.yaml if the difference is expected for this format",
        )
