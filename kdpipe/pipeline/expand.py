"""Stages that stand for many (a sweep): expanded into their member stages before the graph is built, so every
member is an ordinary stage the engine caches, locks, resumes and reports, and errors in a member point at the line
of the user's file that made it."""

from __future__ import annotations

from typing import Any

from kdpipe.config import LoadedConfig
from kdpipe.registry import STAGES


def expand_stages(loaded: LoadedConfig) -> LoadedConfig:
    """``loaded`` with every expanding stage's members inserted before it (``Stage.expand``); ``loaded`` itself when
    nothing expands or it is already expanded. The result's ``source`` is the config as written."""
    if loaded.source is not None:
        return loaded
    stages: dict[str, Any] = {}
    lines = dict(loaded.lines)
    expanded = False
    for name, cfg in loaded.config.stages.items():
        expansion = STAGES.get(cfg.type).expand(name, cfg, loaded)
        if expansion is None:
            stages[name] = cfg
            continue
        expanded = True
        for member, member_cfg in expansion.members.items():
            stages[member] = member_cfg
            line = loaded.line_of(expansion.locations.get(member, ("stages", name)))
            if line is not None:
                lines[("stages", member)] = line
        stages[name] = expansion.stage
    if not expanded:
        return loaded
    return LoadedConfig(
        config=loaded.config.model_copy(update={"stages": stages}),
        path=loaded.path,
        base_dir=loaded.base_dir,
        raw=loaded.raw,
        lines=lines,
        source=loaded,
    )
