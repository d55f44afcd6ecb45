"""``data.normalize`` and an unset ``data.image_size``, ``data.crop_pct`` and ``data.interpolation`` resolved for a
run: the dataset's statistics, explicit values, or what the pretrained teacher and student expect (timm's
pretrained_cfg, as timm's resolve_data_config reads it), checked for agreement before any work is done."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from kdpipe.config import LoadedConfig, NormalizeStats
from kdpipe.data.splits import Normalization
from kdpipe.errors import ConfigError
from kdpipe.models.factory import expected_preprocessing


@dataclass(frozen=True)
class Preprocessing:
    """What a run's data loader uses in place of its defaults: fixed statistics, an image size, an evaluation crop
    and a resampling filter (None: the config's value or the defaults)."""

    normalization: Normalization | None
    image_size: int | None
    crop_pct: float | None = None
    interpolation: str | None = None

    def data_updates(self) -> dict[str, Any]:
        """The ``DataConfig`` fields to replace for the run (those resolved from the pretrained networks)."""
        fields = {"image_size": self.image_size, "crop_pct": self.crop_pct, "interpolation": self.interpolation}
        return {k: v for k, v in fields.items() if v is not None}


def resolve_preprocessing(loaded: LoadedConfig) -> Preprocessing:
    """``data.normalize`` and an unset ``data.image_size`` (and, for imagefolder data, ``crop_pct`` and
    ``interpolation``) for ``loaded``, from the pretrained teacher and student (each weight source read once).
    Disagreements the config must settle are ``ConfigError``s naming both sides."""
    sources = _pretrained_sources(loaded)
    data = loaded.config.data
    image_size = _image_size(loaded, sources)
    crop = interpolation = None
    if data.image_size is None and image_size is None:  # images kept at their own size: nothing is resized
        if data.crop_pct is not None or data.interpolation is not None:
            raise ConfigError(
                f"{loaded.where(('data',))}: data.crop_pct and data.interpolation say how images are resized, but "
                "data.image_size is unset and no pretrained network gives an input size",
                hint="set data.image_size, or remove data.crop_pct and data.interpolation",
            )
    elif data.kind == "imagefolder":  # the one kind whose images kdpipe resizes and crops
        crop = _agreed(loaded, sources, "crop_pct", "evaluation crops", lambda v: f"crop_pct {v:g}")
        interpolation = _agreed(loaded, sources, "interpolation", "resampling filters", str)
    return Preprocessing(_normalization(loaded, sources), image_size, crop, interpolation)


class Source(NamedTuple):
    """A pretrained network of the run: who it is (for messages), its role and what its weights expect."""

    who: str
    role: str
    pre: dict[str, Any]


def _pretrained_sources(loaded: LoadedConfig) -> list[Source]:
    """(who, role, expected_preprocessing) of every teacher or student of the run that starts from pretrained
    weights."""
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
        pre = expected_preprocessing(model, pretrained=weights.pretrained, checkpoint=weights.checkpoint)
        out.append(Source(f"stages.{name} ({role} {model})", role, pre))
    return out


def _image_size(loaded: LoadedConfig, sources: list[Source]) -> int | None:
    """For an unset ``data.image_size``: the pretrained networks' input side (timm's input_size), else None (the
    data kind's default). Networks that expect different sizes are a ``ConfigError`` asking for one."""
    if loaded.config.data.image_size is not None:
        return None
    sizes = [(who, pre["image_size"]) for who, _, pre in sources if "image_size" in pre]
    if len({size for _, size in sizes}) > 1:
        raise ConfigError(
            f"{loaded.where(('data',))}: data.image_size is unset and the pretrained networks expect different "
            "input sizes: " + "; ".join(f"{who} {size} px" for who, size in sizes),
            hint="set data.image_size (usually the deployed student's)",
        )
    return sizes[0][1] if sizes else None


def _agreed(loaded: LoadedConfig, sources: list[Source], key: str, what: str, show: Any) -> Any:
    """For an unset ``data.<key>``: the deployed network's value, that of the pretrained students where one is
    pretrained (the teacher is evaluated on the same test images, and a crop or filter that differs slightly from its
    own costs it little), else the pretrained teachers'; None when none knows it (the default). Students (or, without
    one, teachers) that disagree are a ``ConfigError`` asking for one."""
    if getattr(loaded.config.data, key) is not None:
        return None
    found = [(who, pre[key]) for who, role, pre in sources if key in pre and role == "student"]
    found = found or [(who, pre[key]) for who, _, pre in sources if key in pre]
    if len({value for _, value in found}) > 1:
        raise ConfigError(
            f"{loaded.where(('data',))}: data.{key} is unset and the pretrained networks expect different {what}: "
            + "; ".join(f"{who} {show(value)}" for who, value in found),
            hint=f"set data.{key} (usually the deployed student's)",
        )
    return found[0][1] if found else None


def _normalization(loaded: LoadedConfig, sources: list[Source]) -> Normalization | None:
    """The statistics ``data.normalize`` asks for, or None for the train split's own (``dataset``)."""
    mode = loaded.config.data.normalize
    where = loaded.where(("data", "normalize"))
    if isinstance(mode, NormalizeStats):
        return Normalization(tuple(mode.mean), tuple(mode.std), "data.normalize (explicit)")
    if mode == "dataset":
        return None
    expected = [(who, pre["mean"], pre["std"]) for who, _, pre in sources if "mean" in pre]
    if not expected:
        if mode == "model":
            raise ConfigError(
                f"{where}: data.normalize: model, but no teacher or student starts from pretrained weights whose "
                "mean/std are known",
                hint="use data.normalize: dataset, or give {mean: [...], std: [...]}",
            )
        return None
    if len({(_key(mean), _key(std)) for _, mean, std in expected}) > 1:
        raise ConfigError(
            f"{where}: data.normalize: {mode}: the pretrained networks expect different normalisations: "
            + "; ".join(f"{who} expects mean {_fmt(mean)}, std {_fmt(std)}" for who, mean, std in expected),
            hint="pick one: data.normalize: {mean: [...], std: [...]} (usually the deployed student's), "
            "or dataset for the train split's statistics",
        )
    _, mean, std = expected[0]
    return Normalization(mean, std, "model: " + ", ".join(who for who, _, _ in expected))


def _key(values: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(round(v, 4) for v in values)


def _fmt(values: tuple[float, ...]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"
