"""Helpers several stages share: building models for the run's data, loading an upstream stage's model,
creating loaders, and saving a trained model with the facts needed to rebuild it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import torch
from torch import nn

from kdpipe import distributed
from kdpipe.config import LoadedConfig, StageConfig, TrainConfig
from kdpipe.data import BatchLoader, Splits, TensorSplit
from kdpipe.data.stream import FileSplit, StreamLoader, make_loader
from kdpipe.distill.methods.base import KDMethod
from kdpipe.distill.precision import Precision
from kdpipe.distill.trainer import Trainer, TrainResult
from kdpipe.errors import ConfigError
from kdpipe.fileio import write_error
from kdpipe.models.factory import (
    WeightsInfo,
    count_params,
    create_model,
    create_model_with_info,
)
from kdpipe.models.weights import load_weights, save_weights
from kdpipe.stages.base import StageContext, StageRecord
from kdpipe.stages.outputs import ModelOutput

log = logging.getLogger(__name__)
ConfigT = TypeVar("ConfigT", bound=StageConfig)

MODEL_FILE = "model.safetensors"
Loader = BatchLoader | StreamLoader


def build_model(name: str, splits: Splits, **kwargs: Any) -> nn.Module:
    """A timm model sized for the run's data (classes, input channels)."""
    return create_model(name, num_classes=splits.num_classes, in_chans=splits.in_chans, **kwargs)


def build_model_with_info(name: str, splits: Splits, **kwargs: Any) -> tuple[nn.Module, WeightsInfo]:
    """``build_model``, with where its weights came from and whether its class head was adapted."""
    return create_model_with_info(name, num_classes=splits.num_classes, in_chans=splits.in_chans, **kwargs)


def load_stage_model(record: StageRecord, splits: Splits, device: torch.device) -> nn.Module:
    """Rebuild the model an upstream stage saved (architecture from its result, weights from its file)."""
    model = build_model(record.output(ModelOutput).model_name, splits)
    load_weights(model, record.artifact("model"))
    return model.to(device).eval()


def save_stage_model(ctx: StageContext, model: nn.Module, model_name: str, role: str, file: str = MODEL_FILE) -> str:
    """Save weights as safetensors with the facts to rebuild and trace them; returns the artifact path (rank 0
    of a torchrun job writes it; the other ranks hold the same weights and only return the path)."""
    if not ctx.is_main:
        return file
    splits = ctx.data()
    # "arch" is what timm builds (a pretrained tag or a local-dir: source dropped); "model" is the name as configured.
    arch = str((getattr(model, "pretrained_cfg", None) or {}).get("architecture") or model_name)
    metadata = {
        "arch": arch,
        "model": model_name,
        "role": role,
        "num_classes": str(splits.num_classes),
        "in_chans": str(splits.in_chans),
        "image_size": str(splits.image_size),
        "crop_pct": f"{splits.crop_pct:g}",
        "interpolation": splits.interpolation,
        "mean": ",".join(f"{v:.6f}" for v in splits.mean),
        "std": ",".join(f"{v:.6f}" for v in splits.std),
        "run": ctx.pipeline.name,
        "stage": ctx.name,
        "fingerprint": ctx.fingerprint,
        "seed": str(ctx.seed),
        **{key: str(ctx.environment.get(key, "")) for key in ("kdpipe", "torch", "timm", "git_sha")},
    }
    try:
        (ctx.dir / file).parent.mkdir(parents=True, exist_ok=True)
        save_weights(model, ctx.dir / file, metadata=metadata)
    except OSError as exc:  # disk full, read-only: a write error naming the file (exit 5), not a stage "crash"
        raise write_error(ctx.dir / file, exc) from exc
    return file


def eval_split(splits: Splits) -> TensorSplit | FileSplit:
    """The split evaluated during training: val when one is held out, else test."""
    return splits.val if splits.val is not None and len(splits.val) > 0 else splits.test


def _loader(ctx: StageContext, split: TensorSplit | FileSplit, **kwargs: Any) -> Loader:
    """A loader over ``split`` with the run's normalisation, device and (for a streamed split) DataLoader workers."""
    splits, data_cfg = ctx.data(), ctx.pipeline.data
    return make_loader(
        split,
        mean=splits.mean,
        std=splits.std,
        device=ctx.device,
        workers=data_cfg.workers,
        prefetch=data_cfg.prefetch,
        **kwargs,
    )


def create_loaders(ctx: StageContext, train: TrainConfig) -> tuple[Loader, Loader]:
    """The train loader (this rank's shard of every global batch under torchrun) and the eval loader (whole); a
    streamed split (``data.loader: stream``) gets DataLoader workers."""
    splits = ctx.data()
    world = distributed.world()
    train_loader = _loader(
        ctx,
        splits.train,
        batch_size=train.batch_size,
        train=True,
        augment=ctx.pipeline.data.augment,
        seed=ctx.seed,
        rank=world.rank,
        world_size=world.size,
    )
    eval_loader = _loader(ctx, eval_split(splits), batch_size=max(train.batch_size, 256), train=False)
    return train_loader, eval_loader


def test_loader(ctx: StageContext, batch_size: int = 256) -> Loader:
    return _loader(ctx, ctx.data().test, batch_size=batch_size, train=False)


def model_facts(model: nn.Module, model_name: str) -> dict[str, Any]:
    return {"model_name": model_name, "params": count_params(model)}


def relative(path: Path, root: Path) -> str:
    return str(path.relative_to(root))


def train_method(
    ctx: StageContext, method: KDMethod, train: TrainConfig, precision: Precision, label: str
) -> TrainResult:
    """Run the trainer for a stage: its checkpoint lives in the stage folder and resumes only for the same
    fingerprint; per-epoch metrics go to events.jsonl."""
    train_loader, eval_loader = create_loaders(ctx, train)
    splits = ctx.data()
    return Trainer(
        method,
        train,
        train_batches=train_loader,
        eval_batches=eval_loader,
        num_classes=splits.num_classes,
        device=ctx.device,
        checkpoint_path=ctx.dir / "checkpoints" / "last.pt",
        fingerprint=ctx.fingerprint,
        precision=precision,
        progress=ctx.progress,
        label=label,
        on_epoch=lambda row: ctx.event("epoch", **row),
        stop_after_steps=ctx.options.get("stop_after_steps", {}).get(ctx.name),
        input_shape=(splits.in_chans, splits.image_size, splits.image_size),
    ).fit()


_METHOD_MODELS: dict[type, tuple[int, type]] = {}


def with_method_union(
    base: type[ConfigT], field: str, annotation: Callable[[Any], Any], default: Callable[[], Any], doc: str
) -> type[ConfigT]:
    """``base`` with ``field`` typed ``annotation(union)`` over the params models of the KD methods registered now
    (a plugin's method registered after import included), rebuilt when ``METHODS`` changes: the distill, qad and
    sweep stages' ``method``/``methods``."""
    from kdpipe.distill.methods import method_params_union
    from kdpipe.registry import METHODS

    cached = _METHOD_MODELS.get(base)
    if cached is None or cached[0] != METHODS.generation:
        field_def = (annotation(method_params_union()), pydantic.Field(default_factory=default, description=doc))
        model = pydantic.create_model(base.__name__, __base__=base, __doc__=base.__doc__, **{field: field_def})  # type: ignore[call-overload]
        cached = _METHOD_MODELS[base] = (METHODS.generation, model)
    return cached[1]


def upstream_stage(loaded: LoadedConfig, name: str, provides: str) -> tuple[str, Any] | None:
    """(name, config) of the stage ``StageContext.find(provides)`` will give stage ``name`` at run time: the first
    of its direct ``needs`` that provides it, else the nearest such stage among those it depends on (``needs``
    followed transitively; a stage without ``needs`` depends on the one above it). For preflight checks."""
    from kdpipe.registry import STAGES

    stages = loaded.config.stages
    names = list(stages)
    upstream: dict[str, set[str]] = {}
    direct: dict[str, list[str]] = {}
    for index, stage_name in enumerate(names):
        cfg = stages[stage_name]
        needs = list(cfg.needs) if cfg.needs is not None else names[index - 1 : index]
        direct[stage_name] = [n for n in needs if n in upstream]
        upstream[stage_name] = set(direct[stage_name]).union(*(upstream[n] for n in direct[stage_name]))
        if stage_name == name:
            break
    before = [n for n in names if n in upstream.get(name, set())]
    for candidate in [*direct.get(name, []), *reversed(before)]:
        if provides in STAGES.get(stages[candidate].type).provides:
            return candidate, stages[candidate]
    return None


def check_early_stopping(train: TrainConfig | None, loc: tuple[str, ...], loaded: LoadedConfig) -> None:
    """``train.early_stopping`` decides on the eval split, which is the test split while data.val_fraction is 0:
    refused there, so a run never picks its weights by test accuracy. ``loc`` is the train block's key path."""
    if train is None or train.early_stopping is None or loaded.config.data.val_fraction > 0:
        return
    key = (*loc, "early_stopping")
    raise ConfigError(
        f"{loaded.where(key)}: {'.'.join(key)}: early stopping reads the eval split, which is the test split while "
        "data.val_fraction is 0, so the test accuracy would pick the weights",
        hint="set data.val_fraction (e.g. 0.1) to hold out a validation split, or remove early_stopping",
    )
