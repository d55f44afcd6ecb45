"""CIFAR-style architectures registered into timm's model registry, plus the model factory and weight files.

Importing this package registers ``resnet8 ... resnet110``, ``resnet8x4``, ``resnet32x4``, ``wrn_16_1``,
``wrn_16_2``, ``wrn_40_1``, ``wrn_40_2`` and ``mobilenetv2_x0_5_cifar`` with timm, so ``timm.create_model(name)``
builds them anywhere after ``import kdpipe``.
"""

from __future__ import annotations

# The architecture modules are imported for their registration side effect.
from kdpipe.models import cifar_resnet, mobilenetv2, wrn  # noqa: F401
from kdpipe.models.factory import (
    check_model_name,
    count_params,
    create_model,
    list_kdpipe_models,
    list_models,
    load_weights,
    read_weights_metadata,
    save_weights,
)

__all__ = [
    "check_model_name",
    "count_params",
    "create_model",
    "list_kdpipe_models",
    "list_models",
    "load_weights",
    "read_weights_metadata",
    "save_weights",
]
