"""``data.normalize`` resolved for a run: the dataset's statistics, explicit values, or what the pretrained teacher
and student expect (timm's pretrained_cfg), checked for agreement before any work is done."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kdpipe.config import LoadedConfig, NormalizeStats
from kdpipe.data.splits import Normalization
from kdpipe.errors import ConfigError
from kdpipe.models.factory import expected_normalization


@dataclass(frozen=True)
class Expectation:
    """What one pretrained network expects."""

    who: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def describe(self) -> str:
        return f"{self.who} expects mean {_fmt(self.mean)}, std {_fmt(self.std)}"


def pretrained_expectations(loaded: LoadedConfig) -> list[Expectation]:
    """Every teacher or student of the run that starts from pretrained weights with a known normalisation."""
    out = []
    for name, stage in loaded.config.stages.items():
        kind = getattr(stage, "type", None)
        weights: Any = None
        if kind == "teacher":
            weights, model, role = stage.weights, stage.model, "teacher"
        elif kind == "distill":
            weights, model, role = stage.student_weights, stage.student, "student"
        if weights is None or not (weights.pretrained or weights.checkpoint is not None):
            continue
        stats = expected_normalization(model, pretrained=weights.pretrained, checkpoint=weights.checkpoint)
        if stats is not None:
            out.append(Expectation(f"stages.{name} ({role} {model})", *stats))
    return out


def resolve_normalization(loaded: LoadedConfig) -> Normalization | None:
    """The statistics ``data.normalize`` asks for, or None for the train split's own (``dataset``)."""
    mode = loaded.config.data.normalize
    where = loaded.where(("data", "normalize"))
    if isinstance(mode, NormalizeStats):
        return Normalization(tuple(mode.mean), tuple(mode.std), "data.normalize (explicit)")
    if mode == "dataset":
        return None
    expected = pretrained_expectations(loaded)
    if not expected:
        if mode == "model":
            raise ConfigError(
                f"{where}: data.normalize: model, but no teacher or student starts from pretrained weights whose "
                "mean/std are known",
                hint="use data.normalize: dataset, or give {mean: [...], std: [...]}",
            )
        return None
    distinct = {(_key(e.mean), _key(e.std)) for e in expected}
    if len(distinct) > 1:
        raise ConfigError(
            f"{where}: data.normalize: {mode}: the pretrained networks expect different normalisations: "
            + "; ".join(e.describe() for e in expected),
            hint="pick one: data.normalize: {mean: [...], std: [...]} (usually the deployed student's), "
            "or dataset for the train split's statistics",
        )
    first = expected[0]
    return Normalization(first.mean, first.std, "model: " + ", ".join(e.who for e in expected))


def _key(values: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(round(v, 4) for v in values)


def _fmt(values: tuple[float, ...]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"
