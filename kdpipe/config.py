"""pydantic v2 models of stages.yaml, YAML loading with line numbers, and ``--set`` overrides.

The top-level model is assembled from the registries (stage types, KD methods), so a stage type or method
added by a plugin is validated and appears in ``kdpipe schema`` without touching this file. Every model
forbids unknown keys; every error is reported as ``file:line: field.path: message`` with a did-you-mean.
"""

from __future__ import annotations

import os
import re
import types
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from kdpipe.errors import ConfigError
from kdpipe.overrides import Override, apply_override, parse_set, source_of
from kdpipe.registry import suggest
from kdpipe.yamlio import Lines, lookup_line, parse_yaml


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors, assignments are validated, docs go to the schema."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


DataKind = Literal["digits", "cifar10", "cifar100", "imagefolder", "synthetic"]
Augment = Literal["cifar", "cifar-reflect", "crop", "imagenet", "none"]


class NormalizeStats(StrictModel):
    """Explicit per-channel normalisation, in [0, 1] pixel units."""

    mean: list[float] = Field(min_length=1)
    std: list[PositiveFloat] = Field(min_length=1)

    @model_validator(mode="after")
    def _same_length(self) -> NormalizeStats:
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean has {len(self.mean)} values and std {len(self.std)}: give one per channel")
        return self


class DataConfig(StrictModel):
    """The dataset every stage of a run uses."""

    kind: DataKind = "digits"
    """digits (scikit-learn's bundled 8x8 digits, no download) | cifar10 | cifar100 (torchvision format) |
    imagefolder (folder or .tar/.tar.gz with train/<class>/*, test/<class>/*) | synthetic (unit tests only)."""
    root: Path | None = None
    """Dataset location; relative paths are resolved against the stages.yaml's folder. Required for
    cifar10, cifar100 and imagefolder."""
    image_size: PositiveInt | None = None
    """Side length in pixels the images are resized to. Default: the input size of the pretrained weights a teacher
    or student starts from (timm's pretrained_cfg, a hub folder's config.json, a kdpipe weight file's metadata),
    else 16 for digits and the native size otherwise."""
    augment: Augment = "cifar"
    """Training augmentation: cifar (random crop with zero padding + horizontal flip), cifar-reflect (the same with
    reflect padding), crop (cifar without the flip, for data where a mirror image is another class, like digits),
    imagenet (random resized crop + flip), none."""
    normalize: Literal["auto", "dataset", "model"] | NormalizeStats = "auto"
    """Per-channel mean/std the images are normalised with (in training, parity checks and the exported model's
    metadata): dataset (measured on the train split), model (what the pretrained teacher and student expect:
    timm's pretrained_cfg, a timm hub folder's config.json, or a kdpipe weight file's metadata), or {mean: [...],
    std: [...]}. auto: model when a teacher or student starts from pretrained weights whose mean/std are known
    (and, when both are, agree), else dataset."""
    crop_pct: float | None = Field(None, gt=0.0, le=1.0)
    """imagefolder only: the evaluation centre crop (timm's crop_pct). Test images are resized on their short side to
    floor(image_size / crop_pct) and centre-cropped to image_size, as timm's eval transform does; train images
    (and the validation split held out of them) are resized on the short side to image_size and centre-cropped.
    Default: the crop_pct of the pretrained weights a teacher or student starts from, else 1.0."""
    interpolation: Literal["bilinear", "bicubic"] | None = None
    """imagefolder only: the resampling filter used when images are resized. Default: that of the pretrained weights
    a teacher or student starts from (timm's pretrained_cfg), else bilinear."""
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    """Share of the train split held out (seeded, stratified) as a validation split. Accuracy is reported on test."""
    subset: float | None = Field(None, gt=0.0, lt=1.0)
    """Keep only this share of the train and test splits (stratified by class; the train part depends on the
    seed, the test part never does): for smoke runs and CI, e.g. 0.02. Leave unset for real runs."""
    download: bool = False
    """cifar10/cifar100 only: download into root when missing (needs internet)."""
    cache_dir: Path | None = None
    """Where decoded uint8 tensors are cached. Default: $KDPIPE_CACHE or ~/.cache/kdpipe."""
    loader: Literal["memory", "stream"] = "memory"
    """memory: decode once into a cached uint8 tensor (on a GPU, the split lives on the device). stream (imagefolder
    only, a folder or a plain .tar): decode each batch in DataLoader workers, for data too large for memory. Both give
    the same batches."""
    workers: int = Field(4, ge=0)
    """stream only: DataLoader worker processes decoding images (0: in the training process)."""
    prefetch: PositiveInt = 2
    """stream only: batches each worker prepares ahead."""
    num_classes: PositiveInt = 10
    """synthetic only: number of classes."""
    num_samples: PositiveInt = 256
    """synthetic only: number of train images (test gets a quarter)."""

    @model_validator(mode="after")
    def _root_required(self) -> DataConfig:
        if self.kind in ("cifar10", "cifar100", "imagefolder") and self.root is None:
            raise ValueError(f"data.root is required for kind {self.kind!r}: set it to the dataset folder or archive")
        for field in ("crop_pct", "interpolation"):
            if getattr(self, field) is not None and self.kind != "imagefolder":
                raise ValueError(
                    f"data.{field} is for kind imagefolder, whose images kdpipe resizes; {self.kind!r} images are "
                    f"used as they are: remove data.{field}"
                )
        if self.loader == "stream" and self.kind != "imagefolder":
            raise ValueError(
                f"data.loader: stream is for kind imagefolder; {self.kind!r} fits in memory (use loader: memory)"
            )
        return self


class ScheduleConfig(StrictModel):
    """Learning-rate schedule, stepped once per epoch."""

    name: Literal["step", "cosine", "constant"] = "cosine"
    milestones: list[PositiveInt] = Field(default_factory=list)
    """step only: epochs at which the lr is multiplied by gamma."""
    gamma: PositiveFloat = 0.1
    warmup_epochs: int = Field(0, ge=0)
    """Linear warm-up from lr/10 over this many epochs."""


class PerformanceConfig(StrictModel):
    """Speed settings of the training loop. The defaults are fast and change results no more than run-to-run noise;
    ``precision`` (a stage field) is the other half."""

    channels_last: bool | None = None
    """Keep conv weights and inputs in NHWC. Default: on for CUDA (tensor cores) and for CPU training in bf16 (oneDNN's
    bf16 convolutions: 1.35x a KD step, benchmarks/results/train_options_cpu.md), off for CPU fp32 (no gain measured).
    """
    fused_optimizer: bool | None = None
    """PyTorch's fused SGD/AdamW kernels. Default: fused on CUDA, multi-tensor (foreach) elsewhere."""
    compile: bool = False
    """torch.compile every trained network and the frozen teacher (the first steps pay the compile time)."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    """torch.compile mode; reduce-overhead captures CUDA graphs (static shapes: the train loader's full batches)."""
    sync_bn: bool = False
    """Under torchrun on CUDA: BatchNorm statistics over the global batch (SyncBatchNorm), so N GPUs train as one
    GPU with the whole batch would. No effect in a single process; refused with gloo on CPU (PyTorch has none)."""


class EarlyStoppingConfig(StrictModel):
    """Stop when the validation top-1 stops improving, and end with the best evaluation's weights. Needs
    data.val_fraction > 0: deciding on the test split would leak it into the result."""

    patience: PositiveInt
    """Evaluations (one every eval_every epochs) without an improvement before training stops; TGeo-KD uses 10."""
    min_delta: float = Field(0.0, ge=0.0)
    """Improving means beating the best top-1 (a fraction) by more than this."""
    restore_best: bool = True
    """End with the weights of the best evaluation; false keeps the last epoch's."""
    start_epoch: int = Field(0, ge=0)
    """Evaluations after epochs up to this one (1-based) only track the best; patience counts from the first one
    after it. Set it to the last lr decay of a step schedule so a run is not stopped at the high lr before its
    decays would have helped (the TGeo-KD recipes: 210)."""


class TrainConfig(StrictModel):
    """Optimisation settings shared by teacher training and distillation."""

    epochs: PositiveInt
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 0.05
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    """sgd only."""
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0.0)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    backbone_lr_scale: PositiveFloat = 1.0
    """Fine-tuning: the trained network's parameters other than its class head get lr x this (e.g. 0.1 for a
    pretrained backbone under a fresh head); the head and a method's extra modules keep the full lr."""
    layer_decay: float | None = Field(None, gt=0.0, le=1.0)
    """Fine-tuning: timm's layer-wise lr decay (timm.optim.param_groups_layer_decay): each block from the head
    down gets lr x layer_decay once more (0.65-0.8 is usual for ViTs and ConvNeXts); norms and biases get no weight
    decay, as timm does. Combines with backbone_lr_scale."""
    freeze_backbone_epochs: int = Field(0, ge=0)
    """Fine-tuning: train only the class head (and a method's extra modules) for this many epochs, then all."""
    eval_every: PositiveInt = 1
    """Evaluate on the val split (test when val_fraction is 0) every this many epochs, and after the last."""
    early_stopping: EarlyStoppingConfig | None = None
    """Off by default: every epoch runs."""
    performance: PerformanceConfig = Field(default_factory=PerformanceConfig)


_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


class MlflowConfig(StrictModel):
    """Log the run to MLflow: the resolved config as params, per-epoch and per-stage metrics, the outputs as
    artifacts. Needs ``pip install "kdpipe[tracking]"`` (mlflow-skinny; the full mlflow works too)."""

    tracking_uri: str | None = None
    """A tracking server (http://host:5000, databricks, sqlite:///mlflow.db with the full mlflow) or a folder for a
    local file store (file:PATH or a plain path; relative to the stages.yaml's folder). Default: $MLFLOW_TRACKING_URI,
    else a file store in the folder mlruns beside the stages.yaml."""
    experiment: str | None = None
    """Experiment name (created when missing). Default: the pipeline's name."""
    run_name: str | None = None
    """Default: the run directory's folder name."""
    tags: dict[str, str] = Field(default_factory=dict)
    artifacts: Literal["deploy", "all", "none"] = "deploy"
    """What is uploaded when the run ends: deploy = every stage's outputs except the weights trained by teacher and
    distill stages, plus resolved.yaml, summary.json and events.jsonl; all = those weights too; none = nothing."""

    @field_validator("tracking_uri")
    @classmethod
    def _resolve_store(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or not value.strip():
            return None
        if value in ("databricks", "databricks-uc"):  # MLflow's names for a Databricks workspace, not folders
            return value
        local = value[len("file:") :] if value.startswith("file:") else None if _URI_SCHEME.match(value) else value
        if local is None or local.startswith("//"):  # a URI with a scheme, or already file:///absolute
            return value
        return resolve_path(Path(local), info).absolute().as_uri()


class TensorBoardConfig(StrictModel):
    """Write TensorBoard scalars (per-epoch and per-stage metrics) and the resolved config as text. Needs the
    tensorboard package (``pip install "kdpipe[tracking]"``)."""

    log_dir: Path | None = None
    """Folder of the event files; relative to the stages.yaml's folder. Default: <run dir>/tensorboard."""

    @field_validator("log_dir")
    @classmethod
    def _resolve(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else resolve_path(value, info)


class TrackingConfig(StrictModel):
    """Experiment tracking, off by default: ``tracking: {mlflow: {}, tensorboard: {}}`` turns both on. Only rank 0 of
    a torchrun job logs; a tracking failure during a run is a warning, never a failed run."""

    mlflow: MlflowConfig | None = None
    tensorboard: TensorBoardConfig | None = None

    @property
    def enabled(self) -> bool:
        return self.mlflow is not None or self.tensorboard is not None


# ---------------------------------------------------------------------------------------------------------------------
# Stage config base and the top-level model (assembled from the stage registry)
# ---------------------------------------------------------------------------------------------------------------------

STAGE_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,63}$"
"""Stage names become folder names and CLI arguments: keep them plain ("/" is reserved for a sweep's members)."""
StageName = Annotated[str, StringConstraints(pattern=STAGE_NAME_PATTERN)]


class StageConfig(StrictModel):
    """Fields every stage has. Each stage type subclasses this with ``type: Literal["<name>"]``."""

    type: str
    needs: list[str] | None = None
    """Stages this one depends on. Default: the stage before it in the file (none for the first)."""


class PipelineBase(StrictModel):
    """Top-level fields of stages.yaml other than ``stages``."""

    version: Literal[1] = 1
    """Schema version of this file."""
    name: str = Field(pattern=STAGE_NAME_PATTERN)
    """Run name; the run directory defaults to runs/<name>."""
    seed: int = 0
    """Seeds data splits, shuffling, augmentation and initialisation."""
    device: str = "auto"
    """auto (cuda when available, else cpu) | cpu | cuda | cuda:N."""
    data: DataConfig = Field(default_factory=DataConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """Experiment tracking (MLflow, TensorBoard); off unless a backend is set."""


def _stage_union() -> Any:
    from kdpipe.registry import STAGES

    models = tuple(entry.obj.config_model() for entry in STAGES)
    if not models:
        raise RuntimeError("no stage types are registered: import kdpipe.stages before loading a config")
    return Annotated[Union[models], Field(discriminator="type")]  # noqa: UP007  (a runtime tuple of classes)


_PIPELINE_MODEL: tuple[tuple[int, ...], type[PipelineBase]] | None = None


def registry_generation() -> tuple[int, ...]:
    """Changes whenever a stage type or method is registered or removed: what the config models are built from
    (formats and backends are looked up by validators when a config is validated, so they need no rebuild)."""
    from kdpipe.registry import METHODS, STAGES

    return (STAGES.generation, METHODS.generation)


def get_pipeline_model() -> type[PipelineBase]:
    """The pydantic model of a whole stages.yaml, built from the stage types and methods registered now: rebuilt when
    a plugin registers one after import, so validation and ``kdpipe schema`` honour it."""
    global _PIPELINE_MODEL
    generation = registry_generation()
    if _PIPELINE_MODEL is None or _PIPELINE_MODEL[0] != generation:
        union = _stage_union()
        model = create_model(
            "PipelineConfig",
            __base__=PipelineBase,
            __doc__="A kdpipe stages.yaml.",
            stages=(dict[StageName, union], Field(min_length=1, description="Stages, run in file order.")),  # type: ignore[valid-type]
        )
        _PIPELINE_MODEL = (generation, model)
    return _PIPELINE_MODEL[1]


# ---------------------------------------------------------------------------------------------------------------------
# Loading: YAML with line numbers, --set overrides, error formatting
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class LoadedConfig:
    """A validated config with where it came from (for error locations, relative paths and the run directory)."""

    config: Any  # an instance of get_pipeline_model()
    path: Path
    base_dir: Path
    raw: dict[str, Any]
    lines: Lines
    source: LoadedConfig | None = None
    """The config as the user wrote it, when this one has a sweep's member stages expanded into it (what
    resolved.yaml and the model card record); None when nothing was expanded."""

    @property
    def written(self) -> LoadedConfig:
        """The config as written in the file (before any stage expanded into member stages)."""
        return self.source or self

    def line_of(self, loc: tuple[str | int, ...]) -> int | None:
        return lookup_line(self.lines, loc)

    def where(self, loc: tuple[str | int, ...]) -> str:
        line = self.line_of(loc)
        return f"{self.path}:{line}" if line else str(self.path)


def format_validation_error(
    exc: ValidationError, path: Path, lines: Lines, applied: Sequence[tuple[tuple[str, ...], str]] = ()
) -> str:
    """One line per problem: ``file:line: field.path: message`` with did-you-mean for unknown keys and tags, and
    the override that set the field (``applied``: key paths and their sources) when one did."""
    out = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        line = lookup_line(lines, loc)
        where = f"{path}:{line}" if line else str(path)
        field = ".".join(str(p) for p in config_path(loc) if p != "[key]") or "(top level)"
        source = source_of(loc, applied)
        out.append(f"{where}: {field}: {_describe(err, loc)}" + (f" (set by {source})" if source else ""))
    return "\n".join(out)


def _describe(err: Any, loc: tuple[str | int, ...]) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        hint = suggest(str(loc[-1]), allowed) if allowed else ""
        valid = f"; valid keys: {', '.join(allowed)}" if allowed else ""
        return f"unknown key {loc[-1]!r}{hint}{valid}"
    if kind == "union_tag_invalid":
        expected = [t.strip().strip("'") for t in str(ctx.get("expected_tags", "")).split(",")]
        disc = str(ctx.get("discriminator", "")).strip("'")
        label = "stage type" if disc == "type" else "method" if disc == "name" else disc
        tag = str(ctx.get("tag"))
        return f"unknown {label} {tag!r}{suggest(tag, expected)}; choose one of: {', '.join(expected)}"
    if kind == "union_tag_not_found":
        disc = str(ctx.get("discriminator", "")).strip("'")
        return f"missing '{disc}'"
    if kind == "string_pattern_mismatch" and loc and loc[-1] == "[key]":
        return (
            f"stage name {err.get('input')!r}: start with a letter and use only letters, digits, '_' and '-' "
            "(it names the stage's folder and is what --only and needs: take)"
        )
    if kind == "missing":
        return "required field is missing"
    if kind == "literal_error":
        choices = [c.strip().strip("'\"") for c in str(ctx.get("expected", "")).replace(" or ", ", ").split(",")]
        given = str(err.get("input"))
        return f"{given!r} is not one of: {', '.join(choices)}{suggest(given, choices)}"
    msg = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    return msg


def config_path(loc: tuple[str | int, ...]) -> tuple[str | int, ...]:
    """``loc`` of a validation error as the file spells it (and ``--set`` takes it): without the tags pydantic puts
    into locations inside a discriminated union, so ``stages.verify.verify.min_top1`` is ``stages.verify.min_top1``
    and ``stages.distill.distill.method.kd.temperature`` is ``stages.distill.method.temperature``."""
    ann: Any = get_pipeline_model()
    out: list[str | int] = []
    rest = list(loc)
    while rest:
        part = rest.pop(0)
        ann = _unwrap(ann)
        origin = get_origin(ann)
        if origin is dict:
            ann = get_args(ann)[1]
        elif origin is list:
            ann = get_args(ann)[0]
        elif origin in (Union, types.UnionType):
            member = _union_member(ann, str(part))
            if member is None:  # not a tag here: keep the rest as it is
                return (*out, part, *rest)
            ann = member
            continue  # the tag, not a key of the file
        elif part in getattr(ann, "model_fields", {}):
            ann = ann.model_fields[part].annotation
        else:
            return (*out, part, *rest)
        out.append(part)
    return tuple(out)


def _allowed_keys(loc: tuple[str | int, ...]) -> list[str]:
    """Field names of the model at ``loc`` (best effort, for did-you-mean on unknown keys)."""
    ann: Any = get_pipeline_model()
    for part in loc:
        ann = _unwrap(ann)
        origin = get_origin(ann)
        if origin is dict:
            ann = get_args(ann)[1]
        elif origin is list:
            ann = get_args(ann)[0]
        elif origin in (Union, types.UnionType):
            # a discriminated union: pydantic puts the tag (stage type, method name) into the location
            ann = _union_member(ann, str(part))
            if ann is None:
                return []
        elif part in getattr(ann, "model_fields", {}):
            ann = ann.model_fields[part].annotation
        else:
            return []
    fields = getattr(_unwrap(ann), "model_fields", None)
    return sorted(fields) if fields else []


def _unwrap(annotation: Any) -> Any:
    """Strip Annotated[...] and Optional[...] down to the type inside."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
            continue
        if origin in (Union, types.UnionType):
            members = [a for a in get_args(annotation) if a is not type(None)]
            if len(members) == 1:
                annotation = members[0]
                continue
        return annotation


def _union_member(annotation: Any, tag: str) -> Any:
    for member in get_args(annotation):
        fields = getattr(member, "model_fields", {})
        for disc in ("type", "name"):
            f = fields.get(disc)
            if f is not None and tag in get_args(f.annotation):
                return member
    return None


def load_config(path: str | Path, overrides: Sequence[str | Override] = ()) -> LoadedConfig:
    """Read, override (``--set`` strings or ``Override``s, in order) and validate a stages.yaml. Raises ConfigError
    with file:line locations."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such file", hint="pass the path of a stages.yaml, e.g. examples/digits.yaml")
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; pass the stages.yaml file inside it")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the file: {exc}") from exc
    data, lines = parse_yaml(text, path)
    applied = []
    for override in overrides:
        override = parse_set(override) if isinstance(override, str) else override
        applied.append((apply_override(data, override), override.source))
    base_dir = path.absolute().parent
    model = get_pipeline_model()
    try:
        config = model.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, path, lines, applied)) from None
    return LoadedConfig(config=config, path=path, base_dir=base_dir, raw=data, lines=lines)


def resolve_path(value: Path, info: ValidationInfo | None) -> Path:
    """Resolve a user path against the stages.yaml folder (passed as validation context ``base_dir``)."""
    value = Path(os.path.expanduser(str(value)))
    base = (info.context or {}).get("base_dir") if info is not None else None
    return value if value.is_absolute() or base is None else Path(base) / value
