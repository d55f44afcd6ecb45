"""What a model card says, as data: ``CardFacts`` (the run's results, method, data, gates, environment) and the
mapping of metric keys ("top1", "top5") to model-index metric types."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

STUDENT_ROLE = "student"
TOP_K = re.compile(r"top(\d+)")
_TOP_K_TYPE = re.compile(r"top_(\d+)_accuracy")


@dataclass
class ModelResult:
    """One evaluated model: the teacher, the student, or an exported format of the student."""

    role: str
    """"teacher" | "student" | "onnx" | ...; unique within a card, it tags the model's results in model-index."""
    model_name: str
    """Architecture or artifact name, e.g. "resnet8x4"."""
    metrics: dict[str, float]
    """Metric key -> value, e.g. {"top1": 0.95, "top5": 0.99}; accuracies are fractions in [0, 1]."""
    params: int | None = None
    """Number of parameters; None when unknown (e.g. a TensorRT engine)."""
    split: str = "test"
    """Dataset split the metrics were measured on."""


@dataclass
class CardFacts:
    """Everything a model card says, gathered by the pipeline. ``card.json`` is this object as JSON."""

    name: str
    """Run name; the model's name in model-index."""
    student: ModelResult
    teacher: ModelResult | None
    extra_results: list[ModelResult]
    """Exported formats and other networks (can be empty)."""
    method: dict[str, Any]
    """KD method and its hyperparameters, e.g. {"name": "kd", "temperature": 4.0}."""
    dataset: dict[str, Any]
    """kind, name, classes, splits ({"train": n, ...}), image_size, mean, std; optional hub_id."""
    train: dict[str, Any]
    """Training settings (epochs, lr, ...)."""
    gates: list[dict[str, Any]]
    """Verification gates: [{"name": ..., "threshold": ..., "value": ..., "passed": bool}, ...]."""
    environment: dict[str, Any]
    """Package versions, device, git SHA, kdpipe version."""
    resolved_config_yaml: str
    """The resolved stages.yaml text, shown so the run can be reproduced."""
    base_model: str | None = None
    """Teacher id (Hub id or local name); defaults to the teacher's model_name when a teacher exists."""
    license: str = "apache-2.0"
    extra_sections: dict[str, str] = field(default_factory=dict)
    """Section title -> Markdown, added by later stages (latency table, parity)."""
    library_name: str = "timm"
    method_provenance: str = ""
    """Where the method's implementation departs from a published source as a whole ("" when it follows one)."""

    def all_results(self) -> list[ModelResult]:
        """Return student, teacher (when present) and extra results, in that order."""
        return [self.student, *([self.teacher] if self.teacher else []), *self.extra_results]


def get_metric_type(key: str) -> tuple[str, str]:
    """Map a metric key to its model-index ``(type, pretty name)``: top1 -> accuracy, top5 -> top_5_accuracy."""
    match = TOP_K.fullmatch(key)
    if match is None:
        return key, key
    k = int(match.group(1))
    return ("accuracy" if k == 1 else f"top_{k}_accuracy"), f"top-{k} accuracy"


def get_metric_key(metric_type: str) -> str:
    """Inverse of ``get_metric_type``: the metric key a model-index metric type came from."""
    if metric_type == "accuracy":
        return "top1"
    match = _TOP_K_TYPE.fullmatch(metric_type)
    return f"top{match.group(1)}" if match else metric_type


def to_jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, Real):
        value = float(obj)
        return value if math.isfinite(value) else None
    if hasattr(obj, "item"):  # numpy / torch scalars
        return to_jsonable(obj.item())
    return str(obj)  # Path, enums, ...
