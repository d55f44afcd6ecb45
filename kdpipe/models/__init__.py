"""CIFAR-style architectures registered into timm's model registry, plus the model factory and weight files.

Importing this package registers the CIFAR architectures of the CRD / mdistiller benchmarks with timm, so
``timm.create_model(name)`` builds them anywhere after ``import kdpipe``:

- ``resnet8 ... resnet110``, ``resnet8x4``, ``resnet32x4`` (``cifar_resnet``);
- ``resnet50_cifar``, CRD's bottleneck ResNet-50 (``cifar_resnet50``);
- ``wrn_16_1``, ``wrn_16_2``, ``wrn_16_8``, ``wrn_40_1``, ``wrn_40_2`` (``wrn``);
- ``vgg8_cifar``, ``vgg11_cifar``, ``vgg13_cifar``, ``vgg16_cifar``, ``vgg19_cifar``, VGGs with BN (``cifar_vgg``);
- ``mobilenetv2_x0_5_cifar`` (``mobilenetv2``);
- ``shufflenet_v1``, ``shufflenet_v2`` (``cifar_shufflenet``).

Where timm already has a model of the literature's name (``resnet50``, ``vgg11`` ... ``vgg19``, MobileNetV2), ours
carries a ``_cifar`` suffix instead of replacing timm's ImageNet model in the shared registry.
"""

from __future__ import annotations

# The architecture modules are imported for their registration side effect.
from kdpipe.models import cifar_resnet, cifar_resnet50, cifar_shufflenet, cifar_vgg, mobilenetv2, wrn  # noqa: F401
from kdpipe.models.factory import (
    check_model_name,
    count_params,
    create_model,
    list_kdpipe_models,
    list_models,
)
from kdpipe.models.weights import load_weights, read_weights_metadata, save_weights

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
