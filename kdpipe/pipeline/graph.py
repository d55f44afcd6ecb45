"""The stage graph: stages in file order, each depending on the one before it unless ``needs`` says otherwise.

Checked as a whole before any work starts: every ``needs`` names an earlier stage (so there are no cycles), and
every stage's requirements (a distill stage's teacher, a verify stage's student) are met by a stage upstream.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from typing import Any

from kdpipe.config import LoadedConfig
from kdpipe.errors import ConfigError
from kdpipe.registry import STAGES, suggest
from kdpipe.stages.base import Stage


@dataclass(frozen=True)
class Node:
    name: str
    type: str
    config: Any
    stage_cls: builtins.type[Stage]
    needs: tuple[str, ...]
    """Direct dependencies."""
    upstream: tuple[str, ...]
    """All transitive dependencies, in file order."""

    @property
    def scope(self) -> str | None:
        """The sub-run a sweep's member stage belongs to (``sweep/resnet8-kd`` for ``sweep/resnet8-kd/distill``):
        its folder holds the member's own lock file and pid lock. None for a stage of the run itself."""
        return scope_of(self.name)


def scope_of(name: str) -> str | None:
    """The sub-run of stage ``name`` (everything before its last "/"), or None for a stage of the run itself."""
    return name.rsplit("/", 1)[0] if "/" in name else None


def build_graph(loaded: LoadedConfig) -> list[Node]:
    """Resolve ``needs`` and check requirements; raise ConfigError naming file:line on the first problem."""
    stages: dict[str, Any] = loaded.config.stages
    names = list(stages)
    nodes: dict[str, Node] = {}
    for index, (name, cfg) in enumerate(stages.items()):
        earlier = names[:index]
        if cfg.needs is None:
            needs: tuple[str, ...] = (earlier[-1],) if earlier else ()
        else:
            needs = tuple(cfg.needs)
            for dep in needs:
                if dep in earlier:
                    continue
                where = loaded.where(("stages", name, "needs"))
                if dep == name:
                    raise ConfigError(f"{where}: stages.{name}.needs: a stage cannot need itself")
                if dep in names:
                    raise ConfigError(
                        f"{where}: stages.{name}.needs: {dep!r} is defined after {name!r}; "
                        "stages run in file order, so move it above"
                    )
                raise ConfigError(
                    f"{where}: stages.{name}.needs: no stage named {dep!r}{suggest(dep, earlier)}; "
                    f"earlier stages: {', '.join(earlier) or '(none)'}"
                )
        upstream_set: set[str] = set()
        for dep in needs:
            upstream_set.add(dep)
            upstream_set.update(nodes[dep].upstream)
        upstream = tuple(n for n in earlier if n in upstream_set)
        stage_cls = STAGES.get(cfg.type)
        nodes[name] = Node(name, cfg.type, cfg, stage_cls, needs, upstream)
        for requirement in stage_cls.requires(cfg):
            if not any(requirement in STAGES.get(nodes[u].type).provides for u in upstream):
                providers = [e.name for e in STAGES if requirement in e.obj.provides]
                raise ConfigError(
                    f"{loaded.where(('stages', name))}: stage {name!r} ({cfg.type}) needs a {requirement!r} before it "
                    f"(a stage of type {' or '.join(providers)}) among the stages it depends on",
                    hint="add one above it, or point its needs: at one",
                )
    return list(nodes.values())


def downstream_of(nodes: list[Node], name: str) -> set[str]:
    """``name`` and every stage that depends on it, transitively."""
    return {name} | {n.name for n in nodes if name in n.upstream}
