"""Stage types, one file each. Importing this package registers all of them in ``kdpipe.registry.STAGES``."""

from kdpipe.stages import (  # noqa: F401  (registration side effects)
    benchmark,
    distill,
    export,
    model_card,
    serve,
    teacher,
    verify,
)
from kdpipe.stages.base import Stage, StageContext, StageRecord, StageResult

__all__ = ["Stage", "StageContext", "StageRecord", "StageResult"]
