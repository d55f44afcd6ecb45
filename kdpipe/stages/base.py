"""What a stage is: its config model, what it provides to later stages, what it requires from earlier ones, and
the context the engine hands it. One stage type per file in this package; each registers in ``STAGES``."""

from __future__ import annotations

import builtins
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch

from kdpipe.config import LoadedConfig, StageConfig
from kdpipe.errors import StageError
from kdpipe.progress import NullProgress, Progress
from kdpipe.requirements import Requirement
from kdpipe.stages.outputs import Output

if TYPE_CHECKING:
    from kdpipe.data import Splits

OutputT = TypeVar("OutputT", bound=Output)


@dataclass
class StageRecord:
    """A finished upstream stage as a downstream stage sees it: its folder and its result.json."""

    name: str
    type: str
    dir: Path
    result: dict[str, Any]

    def artifact(self, key: str) -> Path:
        try:
            return self.dir / self.result["artifacts"][key]
        except KeyError:
            raise StageError(
                f"stage {self.name!r} recorded no {key!r} artifact", hint=f"rerun with --from {self.name}"
            ) from None

    @property
    def metrics(self) -> dict[str, Any]:
        return dict(self.result.get("metrics", {}))

    def output(self, kind: builtins.type[OutputT]) -> OutputT:
        """This stage's output (its result's ``info``) as ``kind``; a StageError when its type provides another."""
        from kdpipe.registry import STAGES

        declared = STAGES.get(self.type).Output
        if not issubclass(declared, kind):
            raise StageError(f"stage {self.name!r} ({self.type}) records a {declared.__name__}, not a {kind.__name__}")
        return kind.model_validate(self.result.get("info", {}))


@dataclass
class Expansion:
    """What a stage expands into (``Stage.expand``). Member names are ``<stage>/<sub-run>/<member>``: each sub-run
    (``<stage>/<sub-run>``, e.g. one student and method of a sweep) has its own folder, lock and pid file, so several
    can run at once (``kdpipe run --only <stage>/<sub-run>``) and a later whole run collects them."""

    members: dict[str, StageConfig]
    """Member stage configs by full name, in the order they run."""
    stage: StageConfig
    """The expanding stage's own config as it runs after its members (its ``needs`` set to them)."""
    locations: dict[str, tuple[str | int, ...]] = field(default_factory=dict)
    """Per member, the key path in the user's file that made it (for file:line in its errors)."""


@dataclass
class StageResult:
    """What a stage returns: metrics (JSON-able), artifacts (key -> path relative to the stage folder), a one-line
    summary for the terminal, and facts later stages may read (``info``)."""

    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    summary: str = ""
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageContext:
    """Everything a running stage may use. Built by the engine; stages never look around the run directory."""

    name: str
    dir: Path
    config: Any  # the stage's own config model
    loaded: LoadedConfig
    fingerprint: str
    device: torch.device
    upstream: list[StageRecord]
    """Finished stages this one depends on (transitively), in file order."""
    data_provider: Callable[[], Splits]
    needs: tuple[str, ...] = ()
    """Its direct dependencies (``needs:``, or the stage before it)."""
    event: Callable[..., None] = lambda *a, **k: None
    progress: Progress = field(default_factory=NullProgress)
    environment: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    """Engine options stages may honour (e.g. ``stop_after_steps`` for interruption tests)."""
    is_main: bool = True
    """False on the other ranks of a torchrun job: the stage computes (trains its shard) but writes nothing."""
    failed_upstream: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Stages this one depends on that missed a gate in this run (a sweep's members: the run goes on without them),
    with every gate each checked (``Gate.to_dict``)."""

    @property
    def pipeline(self) -> Any:
        return self.loaded.config

    @property
    def seed(self) -> int:
        return int(self.loaded.config.seed)

    def data(self) -> Splits:
        """The run's dataset splits (loaded once per run and shared by all stages)."""
        return self.data_provider()

    def find(self, provides: str) -> StageRecord | None:
        """The upstream stage providing ``provides`` (e.g. "teacher", "student", "export"): the first of the
        direct ``needs`` that does, else the nearest one above in the file."""
        from kdpipe.registry import STAGES

        by_name = {r.name: r for r in self.upstream}
        direct = [by_name[n] for n in self.needs if n in by_name]
        for record in [*direct, *reversed(self.upstream)]:
            if provides in STAGES.get(record.type).provides:
                return record
        return None

    def find_all(self, provides: str) -> list[StageRecord]:
        """Every upstream stage providing ``provides``, in file order (e.g. all exports for a benchmark)."""
        from kdpipe.registry import STAGES

        return [r for r in self.upstream if provides in STAGES.get(r.type).provides]

    def require(self, provides: str) -> StageRecord:
        record = self.find(provides)
        if record is None:  # the graph check makes this unreachable for declared requirements
            raise StageError(f"stage {self.name!r} needs a {provides!r} stage before it")
        return record


class Stage:
    """Base class of a stage type. Subclasses set ``Config``, ``provides`` and implement :meth:`run`."""

    Config: ClassVar[type[StageConfig]]
    Output: ClassVar[type[Output]] = Output
    """What ``run`` records in ``StageResult.info`` for later stages (validated by the engine when it finishes)."""
    provides: ClassVar[frozenset[str]] = frozenset()
    data_parallel: ClassVar[bool] = False
    """Under torchrun, every rank runs this stage (training); other stages run on rank 0 alone."""

    @classmethod
    def config_model(cls) -> type[StageConfig]:
        """The model that validates this stage's block. ``Config`` unless a field depends on a registry (the distill
        stage's ``method``), in which case it is rebuilt from the registry's current entries."""
        return cls.Config

    @classmethod
    def requires(cls, config: Any) -> tuple[str, ...]:
        """What this stage needs from upstream stages, given its config (e.g. ("student",))."""
        return ()

    @classmethod
    def requirements(cls, name: str, config: Any, loaded: LoadedConfig) -> list[Requirement]:
        """What this stage's config needs from the machine (libraries, CUDA), met or not. The engine refuses to start
        while a fatal one is missing; ``kdpipe doctor`` lists them all."""
        return []

    @classmethod
    def input_files(cls, config: Any) -> list[Path]:
        """Files outside the run directory this stage reads (e.g. a teacher checkpoint): their identity (size and
        modification time) is part of the stage's fingerprint, so a file replaced in place reruns the stage."""
        return []

    @classmethod
    def expand(cls, name: str, config: Any, loaded: LoadedConfig) -> Expansion | None:
        """The member stages this stage stands for (a sweep's candidates), or None for an ordinary stage. The engine
        puts the members before it in file order, each run as a stage of its own (cached, locked, resumable), and
        the stage itself becomes ``Expansion.stage`` (which needs the members it collects)."""
        return None

    @classmethod
    def preflight(cls, name: str, config: Any, loaded: LoadedConfig) -> None:
        """Checks that need more than the config's own fields (files, opsets). Raise KdpipeErrors. Installed
        libraries are declared in :meth:`requirements` instead."""

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.config = ctx.config

    def run(self) -> StageResult:
        raise NotImplementedError
