"""Stage types, one file each. Importing this package registers all of them in ``kdpipe.registry.STAGES``, then
imports the installed plugins (entry points in the ``kdpipe.plugins`` group), which register theirs."""

from kdpipe.plugins import load_plugins
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

load_plugins()

__all__ = ["Stage", "StageContext", "StageRecord", "StageResult"]
