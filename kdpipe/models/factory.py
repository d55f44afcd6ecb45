"""Model factory: model names and construction through timm.

Every model kdpipe trains or exports is a timm model; kdpipe's CIFAR nets are registered into timm's own registry
(see ``cifar_resnet``, ``cifar_resnet50``, ``wrn``, ``cifar_vgg``, ``mobilenetv2``, ``cifar_shufflenet``), so one
name space and one ``create_model`` serve both. None of their names shadows a timm model: where the literature's
name is taken (``resnet50``, ``vgg13``), kdpipe's net carries a ``_cifar`` suffix.

Weight files live in ``weights``; ``save_weights``, ``load_weights`` and ``read_weights_metadata`` are re-exported
here, where callers have always imported them from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import timm.models
from torch import nn

from kdpipe.errors import ConfigError
from kdpipe.models import cifar_resnet, cifar_resnet50, cifar_shufflenet, cifar_vgg, mobilenetv2, wrn
from kdpipe.models.weights import _first_line, load_weights

# ``name as name``: re-exported, callers import the weight-file functions from here.
from kdpipe.models.weights import read_weights_metadata as read_weights_metadata
from kdpipe.models.weights import save_weights as save_weights
from kdpipe.registry import suggest

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


def create_model(
    name: str,
    *,
    num_classes: int,
    in_chans: int = 3,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build ``name`` with ``timm.create_model`` and optionally load weights.

    Args:
        name: a timm model name (``list_models()``), kdpipe's CIFAR nets included.
        num_classes: classifier outputs; pretrained weights with another head get a fresh one (timm's rule).
        in_chans: input channels (1 for grayscale data); timm adapts pretrained stem weights.
        pretrained: download timm's published weights from the Hugging Face hub.
        checkpoint: a local weight file loaded with ``load_weights`` after construction.
        **kwargs: passed to ``timm.create_model`` (``drop_rate``, ``drop_path_rate``, ...).

    Raises:
        ConfigError: unknown name, both weight sources given, or pretrained weights unavailable.
        DataError: the checkpoint is missing, unreadable or does not fit the model.
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
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except OSError as e:
        # Hub and URL failures (no network, offline mode, missing or gated repo) all derive from OSError.
        if not pretrained:
            raise
        raise ConfigError(
            f"model {name!r}: pretrained weights could not be downloaded ({type(e).__name__}: {_first_line(e)})",
            hint=f"check access to the Hugging Face hub, or download the weights once and use {_WEIGHTS_HINT}",
        ) from e
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Return the number of parameters (shared ones counted once); ``trainable_only`` skips frozen ones."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
