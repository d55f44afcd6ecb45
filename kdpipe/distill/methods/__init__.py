"""KD methods, one file each. Importing this package imports every module in it, and each registers its method in
``kdpipe.registry.METHODS``: a new method is one new file (see CONTRIBUTING.md)."""

from kdpipe.distill.methods.base import KDMethod, MethodContext, MethodParams, create_method, method_params_union
from kdpipe.plugins import import_all

import_all(__name__, __path__)

__all__ = ["KDMethod", "MethodContext", "MethodParams", "create_method", "method_params_union"]
