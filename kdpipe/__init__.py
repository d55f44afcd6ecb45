"""kdpipe: distill a compact student from a timm teacher, verify it, export it, benchmark it, document it."""

from __future__ import annotations

__version__ = "0.1.0"

# Importing kdpipe registers the CIFAR-style architectures into timm's own registry, so
# ``timm.create_model("resnet8x4")`` works anywhere after ``import kdpipe``.
from kdpipe import models as _models  # noqa: F401
