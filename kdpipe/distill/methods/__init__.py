"""KD methods, one file each. Importing this package registers all of them in ``kdpipe.registry.METHODS``."""

from kdpipe.distill.methods import ce, dkd, dml, dpk, ffsd, fusion_ratio, iakd, kd, switokd  # noqa: F401  (registration side effects)
from kdpipe.distill.methods.base import KDMethod, MethodContext, MethodParams, create_method, method_params_union

__all__ = ["KDMethod", "MethodContext", "MethodParams", "create_method", "method_params_union"]
