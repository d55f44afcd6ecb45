"""Model factory: model names and construction through timm.

Every model kdpipe trains or exports is a timm model; kdpipe's CIFAR nets are registered into timm's own registry
(see ``cifar_resnet``, ``cifar_resnet50``, ``wrn``, ``cifar_vgg``, ``mobilenetv2``, ``cifar_shufflenet``), so one
name space and one ``create_model`` serve both. None of their names shadows a timm model: where the literature's
name is taken (``resnet50``, ``vgg13``), kdpipe's net carries a ``_cifar`` suffix.

Weight files (``save_weights``, ``load_weights``, ``read_weights_metadata``) live in ``kdpipe.models.weights``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import timm.models
from torch import nn

from kdpipe.errors import ConfigError, DataError
from kdpipe.models import cifar_resnet, cifar_resnet50, cifar_shufflenet, cifar_vgg, mobilenetv2, wrn
from kdpipe.models.weights import (
    HeadChange,
    _as_tuple,
    _first_line,
    fit_pretrained_state,
    read_state_dict,
    read_weights_metadata,
)
from kdpipe.registry import suggest

log = logging.getLogger(__name__)

_ARCH_MODULES = (cifar_resnet, cifar_resnet50, wrn, cifar_vgg, mobilenetv2, cifar_shufflenet)
# Names timm resolves at build time (a hub repo, a local folder): they cannot be checked without I/O.
_SOURCE_PREFIXES = ("hf-hub:", "local-dir:")
_WEIGHTS_HINT = "weights: {checkpoint: path/to/weights.safetensors}"


def list_models(pattern: str = "*") -> list[str]:
    """Return every model name timm can build that matches the glob ``pattern``, kdpipe's CIFAR nets included."""
    return list(timm.list_models(pattern))


def list_kdpipe_models() -> list[str]:
    """Return the names kdpipe itself registers into timm (the CIFAR-style architectures), in timm's order."""
    ours = {name for module in _ARCH_MODULES for name in module.default_cfgs}
    return [name for name in timm.list_models() if name in ours]


def check_model_name(name: str, field: str) -> None:
    """Raise ``ConfigError`` unless timm can build ``name``; ``field`` is the config path named in the message.

    Only the registry is consulted (no model is built), so this is cheap enough for config validation.
    ``hf-hub:`` and ``local-dir:`` names are accepted as written: checking them needs the network or the disk.
    """
    if name.startswith(_SOURCE_PREFIXES) or timm.is_model(name):
        return
    raise ConfigError(
        f"{field}: unknown model {name!r}{suggest(name, list_models())}; it is neither a timm model nor one of "
        f"kdpipe's CIFAR models ({', '.join(list_kdpipe_models())})",
        hint="run `kdpipe list models` to see every name",
    )


# What a timm hub folder (``push_to_hf_hub``/``save_for_hf``) holds, in timm's order of preference.
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# The preprocessing keys of a timm pretrained_cfg that a run can adopt.
_PREPROCESSING_KEYS = ("mean", "std", "input_size", "interpolation", "crop_pct", "crop_mode")


@dataclass(frozen=True)
class WeightsInfo:
    """Where a model's weights came from, and what was adapted to the run."""

    source: str
    """"random initialisation", "timm pretrained <name>", "file <path>" or "timm folder <path>"."""
    head: HeadChange | None = None
    """The class head, when it was re-initialised for the run's number of classes."""
    preprocessing: dict[str, Any] = field(default_factory=dict)
    """The weights' own preprocessing (timm's pretrained_cfg mean, std, input_size, ...); empty from scratch."""

    @property
    def pretrained(self) -> bool:
        return self.source != RANDOM_INIT

    def describe_head(self) -> str:
        return f"the {self.source} weights' {self.head.describe()}" if self.head is not None else ""

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source, "pretrained": self.pretrained}
        if self.head is not None:
            out["head"] = {
                "adapted": True,
                "file_classes": self.head.file_classes,
                "classes": self.head.classes,
                "layers": list(self.head.layers),
            }
        if self.preprocessing:
            out["preprocessing"] = self.preprocessing
        return out


RANDOM_INIT = "random initialisation"


def hub_folder_weights(folder: Path) -> Path:
    """The weight file of a timm hub folder (``config.json`` beside ``model.safetensors`` or
    ``pytorch_model.bin``); a ``DataError`` that names the folder when either is missing."""
    if not (folder / "config.json").is_file():
        raise DataError(
            f"{folder} is a folder but not a timm hub folder: it has no config.json",
            hint="point weights.checkpoint at the weight file itself, or at a folder written by timm's "
            "save_for_hf / push_to_hf_hub (config.json + model.safetensors)",
        )
    for name in HUB_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise DataError(
        f"timm hub folder {folder} has a config.json but no weights ({' or '.join(HUB_WEIGHT_FILES)})",
        hint="copy the folder again, with its weight file",
    )


def weight_source_files(checkpoint: Path) -> list[Path]:
    """The files a checkpoint source reads (for fingerprints): the file, or a hub folder's config and weights."""
    if checkpoint.is_dir():
        files = [checkpoint / "config.json"]
        files += [checkpoint / name for name in HUB_WEIGHT_FILES if (checkpoint / name).is_file()]
        return files
    return [checkpoint]


def create_model(
    name: str,
    *,
    num_classes: int,
    in_chans: int = 3,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build ``name`` with ``timm.create_model`` and optionally load weights (``create_model_with_info``)."""
    return create_model_with_info(
        name, num_classes=num_classes, in_chans=in_chans, pretrained=pretrained, checkpoint=checkpoint, **kwargs
    )[0]


def create_model_with_info(
    name: str,
    *,
    num_classes: int,
    in_chans: int = 3,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    **kwargs: Any,
) -> tuple[nn.Module, WeightsInfo]:
    """Build ``name`` with ``timm.create_model``, optionally with pretrained weights, and say where they came from.

    Args:
        name: a timm model name (``list_models()``), kdpipe's CIFAR nets included; a pretrained tag
            (``resnet50.a1_in1k``) picks timm's weights for ``pretrained``.
        num_classes: classifier outputs. Weights with another number of classes get a fresh head (timm's rule);
            ``WeightsInfo.head`` says so.
        in_chans: input channels (1 for grayscale data); timm adapts its own pretrained stem weights.
        pretrained: timm's published weights, from the Hugging Face hub or, with ``HF_HUB_OFFLINE=1``, from the
            local hub cache only.
        checkpoint: a local state_dict file (``.safetensors``, ``.pt``, ...) or a timm hub folder
            (``config.json`` + ``model.safetensors``). Read with kdpipe's safe reader, checked key by key
            (only the class head may differ), then loaded by ``timm.models.load_pretrained``.
        **kwargs: passed to ``timm.create_model`` (``drop_rate``, ``drop_path_rate``, ...).

    Raises:
        ConfigError: unknown name, both weight sources given, pretrained weights unavailable, or a hub folder of
            another architecture.
        DataError: the checkpoint is missing, unreadable or does not fit the model outside its head.
    """
    check_model_name(name, "model")
    if pretrained and checkpoint is not None:
        raise ConfigError(
            f"model {name!r}: both pretrained weights and a checkpoint were requested",
            hint="keep one of weights: {pretrained: true} or " + _WEIGHTS_HINT,
        )
    if pretrained and not name.startswith(_SOURCE_PREFIXES) and not timm.models.is_model_pretrained(name):
        raise ConfigError(
            f"model {name!r} has no published pretrained weights",
            hint=f"use {_WEIGHTS_HINT}, or train it first (weights: {{train: ...}})",
        )
    if checkpoint is not None:
        return _from_checkpoint(name, Path(checkpoint), num_classes, in_chans, **kwargs)
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except OSError as e:
        # Hub and URL failures (no network, offline mode, missing or gated repo) all derive from OSError.
        if not pretrained:
            raise
        raise _download_error(name, e) from e
    if not pretrained:
        return model, WeightsInfo(RANDOM_INIT)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    head = None
    file_classes = cfg.get("num_classes")
    if file_classes and int(file_classes) != num_classes:
        head = HeadChange(int(file_classes), num_classes, _as_tuple(cfg.get("classifier")))
        log.info("%s: %s", name, head.describe())
    return model, WeightsInfo(f"timm pretrained {name}", head, _preprocessing(cfg))


def _from_checkpoint(
    name: str, path: Path, num_classes: int, in_chans: int, **kwargs: Any
) -> tuple[nn.Module, WeightsInfo]:
    if path.is_dir():
        weights = hub_folder_weights(path)
        try:
            model = timm.create_model(f"local-dir:{path}", num_classes=num_classes, in_chans=in_chans, **kwargs)
        except (RuntimeError, ValueError, KeyError, OSError) as e:
            raise DataError(
                f"timm hub folder {path} could not be read: {type(e).__name__}: {_first_line(e)}",
                hint="check its config.json (architecture, num_classes, pretrained_cfg)",
            ) from e
        pretrained_cfg: dict[str, Any] = getattr(model, "pretrained_cfg", None) or {}
        arch = str(pretrained_cfg.get("architecture") or "")
        wanted = timm.models.split_model_name_tag(name)[0]
        if not name.startswith(_SOURCE_PREFIXES) and arch != wanted:
            raise ConfigError(
                f"model {name!r}: the timm hub folder {path} holds a {arch!r}",
                hint=f"set the model to {arch!r}, or point to a folder of {wanted!r}",
            )
        source = f"timm folder {path}"
    else:
        weights = path
        model = timm.create_model(name, num_classes=num_classes, in_chans=in_chans, **kwargs)
        source = f"file {path}"
    state, metadata = read_state_dict(weights)
    state, head = fit_pretrained_state(model, state, metadata, weights)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    # timm's loader, fed the checked state_dict: it drops a head of another size and loads the rest.
    load_cfg = {k: v for k, v in cfg.items() if k not in ("url", "file", "hf_hub_id", "source", "label_offset")}
    load_cfg["state_dict"] = state
    load_cfg["num_classes"] = head.file_classes if head is not None else num_classes
    size = tuple(load_cfg.get("input_size") or (in_chans,))
    load_cfg["input_size"] = (in_chans, *size[1:])  # the stem was checked to fit: nothing to convert
    timm.models.load_pretrained(model, pretrained_cfg=load_cfg, num_classes=num_classes, in_chans=in_chans)
    if head is not None:
        log.info("%s from %s: %s", name, weights, head.describe())
    # A plain state_dict carries no preprocessing of its own; a hub folder's config.json does.
    return model, WeightsInfo(source, head, _preprocessing(cfg) if path.is_dir() else {})


def expected_preprocessing(name: str, *, pretrained: bool = False, checkpoint: Path | None = None) -> dict[str, Any]:
    """What pretrained weights expect of their input, known without building the model or touching the network:
    ``mean`` and ``std`` (tuples), ``image_size`` (the side of timm's ``input_size``), ``crop_pct`` (float) and
    ``interpolation`` ("bilinear" or "bicubic"), each where known.

    ``pretrained``: timm's pretrained_cfg of ``name`` (its tag, or the default one). ``checkpoint``: a timm hub
    folder's ``config.json``, or a ``.safetensors`` file's metadata (kdpipe writes mean, std and image_size).
    ``hf-hub:REPO`` with ``pretrained``: the repository's ``config.json``, from the local hub cache, else (unless
    ``HF_HUB_OFFLINE``) downloaded alone, as timm reads it when it builds the model. Empty when unknown: a bare
    state_dict, a hub repository that cannot be reached, random initialisation.
    """
    cfg: dict[str, Any] = {}
    if pretrained and name.startswith("hf-hub:"):
        cfg = _hub_repo_config(name.removeprefix("hf-hub:"))
    elif pretrained and not name.startswith(_SOURCE_PREFIXES):
        found = timm.models.get_pretrained_cfg(name)
        cfg = found.to_dict() if found is not None else {}
    elif checkpoint is not None and checkpoint.is_dir() and (checkpoint / "config.json").is_file():
        try:
            loaded = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}  # the build reports a broken folder with its own message
        cfg = (loaded.get("pretrained_cfg") or loaded) if isinstance(loaded, dict) else {}
    elif checkpoint is not None and checkpoint.suffix.lower() == ".safetensors" and checkpoint.is_file():
        try:
            meta = read_weights_metadata(checkpoint)
        except DataError:
            return {}
        try:
            cfg["mean"] = [float(v) for v in meta["mean"].split(",")]
            cfg["std"] = [float(v) for v in meta["std"].split(",")]
        except (KeyError, ValueError):
            cfg = {}
        if meta.get("image_size", "").isdigit():
            cfg["input_size"] = (0, int(meta["image_size"]), int(meta["image_size"]))
        for key in ("crop_pct", "interpolation"):
            if key in meta:
                cfg[key] = meta[key]
    out: dict[str, Any] = {}
    if cfg.get("mean") and cfg.get("std"):
        out["mean"] = tuple(float(v) for v in cfg["mean"])
        out["std"] = tuple(float(v) for v in cfg["std"])
    size = cfg.get("input_size")
    if size and len(size) == 3 and int(size[1]) == int(size[2]) and int(size[1]) > 0:
        out["image_size"] = int(size[1])
    try:
        crop = float(cfg.get("crop_pct") or 0.0)
    except (TypeError, ValueError):
        crop = 0.0
    if 0.0 < crop <= 1.0:
        out["crop_pct"] = crop
    if cfg.get("interpolation") in ("bilinear", "bicubic"):  # the filters kdpipe resizes with (timm's usual two)
        out["interpolation"] = str(cfg["interpolation"])
    return out


def _hub_repo_config(repo: str) -> dict[str, Any]:
    """The ``pretrained_cfg`` of a timm hub repository's ``config.json`` (``repo`` may end in ``@revision``): from
    the local cache, else downloaded unless ``HF_HUB_OFFLINE``; empty when it cannot be had (building the model
    reports why)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    repo_id, _, revision = repo.partition("@")
    path: Any = try_to_load_from_cache(repo_id, "config.json", revision=revision or None)
    if not isinstance(path, str) and not hub_offline():
        try:
            path = hf_hub_download(repo_id, "config.json", revision=revision or None)
        except Exception as exc:  # no network, no such repo, no access: the model build gives the precise error
            log.info("cannot read %s's config.json to learn its preprocessing: %s", repo_id, _first_line(exc))
            return {}
    if not isinstance(path, str):
        return {}
    try:
        loaded = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(loaded, dict):
        return {}
    found = loaded.get("pretrained_cfg") or loaded
    return found if isinstance(found, dict) else {}


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for the local hub cache only."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _preprocessing(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: (list(cfg[k]) if isinstance(cfg[k], tuple) else cfg[k]) for k in _PREPROCESSING_KEYS if k in cfg}


def _download_error(name: str, error: OSError) -> ConfigError:
    cfg = timm.models.get_pretrained_cfg(name) if not name.startswith(_SOURCE_PREFIXES) else None
    repo = str(getattr(cfg, "hf_hub_id", "") or "")
    if hub_offline():
        from huggingface_hub import constants

        return ConfigError(
            f"model {name!r}: HF_HUB_OFFLINE is set and its pretrained weights{f' ({repo})' if repo else ''} are "
            f"not in the local hub cache {constants.HF_HUB_CACHE}: {_first_line(error)}",
            hint=f'on a machine with network, fill the cache once (python -c "import timm; '
            f"timm.create_model('{name}', pretrained=True)\") and copy it here, or use {_WEIGHTS_HINT}",
        )
    return ConfigError(
        f"model {name!r}: pretrained weights could not be downloaded ({type(error).__name__}: {_first_line(error)})",
        hint=f"check access to the Hugging Face hub, set HF_HUB_OFFLINE=1 to use a filled local cache, "
        f"or download the weights once and use {_WEIGHTS_HINT}",
    )


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Return the number of parameters (shared ones counted once); ``trainable_only`` skips frozen ones."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
