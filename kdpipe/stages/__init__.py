"""Stage types, one file each. Importing this package registers all of them in ``kdpipe.registry.STAGES``."""

from kdpipe.stages import distill, model_card, teacher, verify  # noqa: F401  (registration side effects)
from kdpipe.stages.base import Stage, StageContext, StageRecord, StageResult

__all__ = ["Stage", "StageContext", "StageRecord", "StageResult"]
