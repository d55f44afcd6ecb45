"""Stage types, one file each. Importing this package imports every module in it, and each registers its stage type
in ``kdpipe.registry.STAGES`` (a new stage is one new file, see CONTRIBUTING.md); then the installed plugins
(entry points in the ``kdpipe.plugins`` group) register theirs."""

from kdpipe.plugins import import_all, load_plugins
from kdpipe.stages.base import Stage, StageContext, StageRecord, StageResult

import_all(__name__, __path__)
load_plugins()

__all__ = ["Stage", "StageContext", "StageRecord", "StageResult"]
