"""Run a validated pipeline in a run directory: skip what is up to date, run what is not, record everything.

A stage is up to date when run.lock.json holds its current fingerprint (``kdpipe.pipeline.fingerprint``) and every
output it recorded still has the recorded hash; so editing one stage reruns it and everything downstream, and
nothing upstream.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

import kdpipe
from kdpipe import distributed
from kdpipe.config import LoadedConfig
from kdpipe.data import Splits, create_splits
from kdpipe.data.splits import data_identity
from kdpipe.environment import describe_environment, resolve_device
from kdpipe.errors import ConfigError, GateFailed, KdpipeError, StageError, status_of
from kdpipe.fileio import WriteError, atomic_write_json, atomic_write_text
from kdpipe.pipeline import summary
from kdpipe.pipeline.checks import preflight
from kdpipe.pipeline.expand import expand_stages
from kdpipe.pipeline.fingerprint import fingerprint
from kdpipe.pipeline.graph import Node, downstream_of, scope_of
from kdpipe.pipeline.normalization import resolve_preprocessing
from kdpipe.pipeline.outcome import RunSummary, StageOutcome
from kdpipe.pipeline.rundir import RunDir, hash_outputs, outputs_intact
from kdpipe.progress import NullProgress, Progress
from kdpipe.registry import suggest
from kdpipe.stages.base import StageContext, StageRecord
from kdpipe.tracking import Tracker

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"


def default_run_dir(loaded: LoadedConfig) -> Path:
    return Path("runs") / loaded.config.name


def _best_effort(write: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Bookkeeping after a stage failed (its event, error.log): on a full or read-only disk it fails too, and the
    stage's own error, which names the file that failed first, must be the one the user sees."""
    try:
        write(*args, **kwargs)
    except (WriteError, OSError) as exc:
        log.warning("could not record the failure (%s)", exc)


def _measures_the_rest(node: Node, failed: set[str]) -> bool:
    """A sweep member's benchmark still runs when some of the exports it measures missed their gates: it measures
    the ones that passed (an int8 export out of parity must not take its fp32 sibling out of the choice)."""
    return node.type == "benchmark" and bool(set(node.needs) - failed)


class Runner:
    """Runs one pipeline. ``options`` are passed to stages (e.g. ``stop_after_steps`` for interruption tests)."""

    def __init__(
        self,
        loaded: LoadedConfig,
        run_dir: Path | None = None,
        *,
        force: bool = False,
        from_stage: str | None = None,
        only: str | None = None,
        progress: Progress | None = None,
        on_stage: Callable[[StageOutcome], None] | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.loaded = loaded
        self.run_dir = RunDir(run_dir or default_run_dir(loaded))
        self.force = force
        self.from_stage = from_stage
        self.only = only
        self.progress = progress or NullProgress()
        self.on_stage = on_stage
        self.options = dict(options or {})
        self._splits: Splits | None = None
        self._data_files: str | None = None  # data_identity, taken once by plan() and reused by the loader
        self._fingerprints: dict[str, str] = {}
        self._records: dict[str, StageRecord] = {}
        self._failed_gates: dict[str, list[dict[str, Any]]] = {}
        """Per stage whose gate failed in this run, every gate it checked (``Gate.to_dict``)."""
        self.summary_document: dict[str, Any] | None = None
        """The last run's summary (what summary.json holds), once a run got as far as writing one."""
        self.loaded = loaded = expand_stages(loaded)  # a sweep's members are stages like the others
        self.nodes = preflight(loaded)
        names = [n.name for n in self.nodes]
        self.scopes = sorted({n.scope for n in self.nodes if n.scope is not None})
        """The sub-runs of the run (a sweep's candidates), each with its own folder, lock file and pid lock."""
        for flag, value in (("--from", from_stage), ("--only", only)):
            known = names + self.scopes if flag == "--only" else names
            if value is not None and value not in known:
                plain = [n for n in known if "/" not in n] + self.scopes
                raise ConfigError(f"{flag} {value}: no such stage{suggest(value, known)}; stages: {', '.join(plain)}")
        self.only_scope = only if only in self.scopes else (scope_of(only) if only is not None else None)
        """The sub-run an ``--only`` run works in (its own lock, events and summary), or None for the run itself."""
        self.world = distributed.world()
        self.device = resolve_device(loaded.config.device, self.world.local_rank if self.world.enabled else None)

    def _data(self) -> Splits:
        if self._splits is None:
            cfg = self.loaded.config
            pre = resolve_preprocessing(self.loaded)  # an unset data.image_size, data.normalize: the models' own
            data = cfg.data.model_copy(update=pre.data_updates())
            self._splits = create_splits(
                data,
                seed=cfg.seed,
                base_dir=self.loaded.base_dir,
                data_files=self._data_files,
                normalization=pre.normalization,
            )
        return self._splits

    def _write_run_files(self, home: RunDir, env: dict[str, Any]) -> None:
        resolved = self.loaded.written.config.model_dump(mode="json")
        header = f"# resolved from {self.loaded.path} by kdpipe {kdpipe.__version__}; every default filled in\n"
        atomic_write_text(home.root / "resolved.yaml", header + yaml.safe_dump(resolved, sort_keys=False))
        atomic_write_json(home.root / "environment.json", {**env, "argv": sys.argv})

    def _selected(self) -> set[str]:
        """The stages ``--only`` names: one stage, or every stage of one sub-run."""
        return {n.name for n in self.nodes if self.only in (n.name, n.scope)}

    def _read_locks(self) -> dict[str, Any]:
        """Every stage's lock entry: the run's own from its run.lock.json, a sub-run's members from the sub-run's."""
        entries = {k: v for k, v in self.run_dir.read_lock().items() if scope_of(k) is None}
        for scope in self.scopes:
            sub = RunDir(self.run_dir.root / scope).read_lock()
            entries.update({k: v for k, v in sub.items() if scope_of(k) == scope})
        return entries

    def _write_lock(self, scope: str | None, lock: dict[str, Any]) -> None:
        """Write the lock file that holds ``scope``'s stages (the run's own for None) from the merged entries."""
        rd = self.run_dir if scope is None else RunDir(self.run_dir.root / scope)
        rd.write_lock({k: v for k, v in lock.items() if scope_of(k) == scope})

    def _hold(self, stack: contextlib.ExitStack) -> RunDir:
        """Take the writer locks and return the directory this run keeps its events and summary in. A whole run
        holds the run directory and every sub-run exclusively; ``--only`` of a sub-run (or of one of its stages)
        holds the run directory shared and its sub-run exclusively, so sub-runs of a sweep can run at once (on
        several machines sharing the folder) while a whole run waits for none of them."""
        if self.only_scope is None:
            for scope in self.scopes:  # first, so a refusal names the sub-run in use and its pid
                stack.enter_context(RunDir(self.run_dir.root / scope))
            return stack.enter_context(self.run_dir)
        stack.enter_context(RunDir(self.run_dir.root, shared=True))
        return stack.enter_context(RunDir(self.run_dir.root / self.only_scope))

    def plan(self, lock: dict[str, Any]) -> dict[str, str]:
        """Decide, before any work, what each stage will do: "run", "skip" (up to date) or "omit" (--only)."""
        forced = downstream_of(self.nodes, self.from_stage) if self.from_stage else set()
        actions: dict[str, str] = {}
        fps: dict[str, str] = {}
        self._data_files = data_identity(self.loaded.config.data, self.loaded.base_dir)
        selected = self._selected() if self.only is not None else set()
        needed = {u for n in self.nodes if n.name in selected for u in n.upstream} - selected
        for node in self.nodes:
            fps[node.name] = fp = fingerprint(node, self.loaded, fps, self._data_files)
            entry = lock.get(node.name)
            up_to_date = (
                entry is not None
                and entry.get("fingerprint") == fp
                and entry.get("status") == "ok"
                and outputs_intact(self.run_dir.stage_dir(node.name), entry.get("outputs", {}))
            )
            if self.only is not None and node.name not in selected:
                if not up_to_date and node.name in needed:
                    raise ConfigError(
                        f"--only {self.only}: it needs stage {node.name!r}, which has no up-to-date result in "
                        f"{self.run_dir.root}",
                        hint=f"run without --only first (kdpipe run {self.loaded.path})",
                    )
                actions[node.name] = "omit"
            elif self.force or node.name in forced or not up_to_date:
                actions[node.name] = "run"
            elif any(actions.get(dep) == "run" for dep in node.needs):
                actions[node.name] = "run"  # an upstream stage is rerun: its outputs may change
            else:
                actions[node.name] = "skip"
        self._fingerprints = fps
        return actions

    def run(self) -> RunSummary:
        if not self.world.is_main:
            return self._run_worker()
        t_start, started_at = time.perf_counter(), time.time()
        outcomes: list[StageOutcome] = []
        self._records, self._failed_gates, self.summary_document = {}, {}, None
        with contextlib.ExitStack() as stack:
            rd = self._hold(stack)
            lock = self._read_locks()
            actions = self.plan(lock)
            if "run" in actions.values():
                self._data()  # a data problem must surface before anything in the run directory changes
            distributed.broadcast_object((actions, self._fingerprints))  # torchrun: the other ranks follow rank 0
            env = describe_environment(self.device)
            env["world_size"] = self.world.size
            env["distributed_backend"] = self.world.backend  # None: no process group (not launched by torchrun)
            # From here on the run directory changes, so however the run ends, summary.json records it.
            self._write_run_files(rd, env)
            error: BaseException | None = None
            tracker = None
            try:
                tracker = self._start_tracking(rd)
                rd.event(None, "run_start", config=str(self.loaded.path), argv=sys.argv, plan=actions)
                self._run_nodes(rd, actions, lock, env, outcomes)
            except BaseException as exc:
                error = exc
                raise
            finally:
                self._finish(rd, outcomes, error, tracker, started_at, time.perf_counter() - t_start)
        return RunSummary(rd.root, outcomes, time.perf_counter() - t_start)

    def _run_nodes(
        self, rd: RunDir, actions: dict[str, str], lock: dict[str, Any], env: dict[str, Any], out: list[StageOutcome]
    ) -> None:
        records, outcomes = self._records, out
        failed: set[str] = set()  # members of a sweep whose gate failed in this run, and what depends on them
        for node in self.nodes:
            fp = self._fingerprints[node.name]
            stage_dir = self.run_dir.stage_dir(node.name)
            action = actions[node.name]
            if node.scope is not None and failed.intersection(node.needs) and not _measures_the_rest(node, failed):
                failed.add(node.name)  # the rest of a candidate that missed a gate: the sweep reports it as failed
                continue
            if action != "run":
                if lock.get(node.name, {}).get("fingerprint") == fp:
                    records[node.name] = self._record(node, stage_dir)
                if action == "skip":
                    outcome = StageOutcome(node.name, node.type, "skipped", summary="up to date")
                    outcome.metrics = records[node.name].metrics
                    rd.event(node.name, "stage_skip", fingerprint=fp, metrics=outcome.metrics)
                    self._report(outcome, outcomes)
                continue
            t0 = time.perf_counter()
            try:
                outcome = self._run_stage(rd, node, fp, stage_dir, records, env, lock)
            except BaseException as exc:
                message = exc.message if isinstance(exc, KdpipeError) else f"{type(exc).__name__}: {exc}"
                outcomes.append(StageOutcome(node.name, node.type, "failed", time.perf_counter() - t0, error=message))
                if isinstance(exc, GateFailed) and node.scope is not None and self.only_scope is None:
                    # a sweep member missing its gate takes its candidate out of the choice, not the whole run
                    log.warning("%s: %s; its candidate is left out of the selection", node.name, exc.message)
                    failed.add(node.name)
                    continue
                raise
            distributed.barrier()  # the other ranks trained with this stage or waited for it
            self._report(outcome, outcomes)

    def _start_tracking(self, rd: RunDir) -> Tracker | None:
        """Experiment tracking, when configured."""
        tracker = Tracker.create(self.loaded, rd.root)
        if tracker is not None:
            resolved = self.loaded.written.config.model_dump(mode="json")
            tracker.start(resolved, yaml.safe_dump(resolved, sort_keys=False))
            rd.sinks.append(tracker.on_event)
        return tracker

    def _finish(
        self,
        rd: RunDir,
        outcomes: list[StageOutcome],
        error: BaseException | None,
        tracker: Tracker | None,
        started_at: float,
        seconds: float,
    ) -> None:
        """Record how the run ended: the run_end event, summary.json, tracking's artifacts and status. After a failure
        nothing here may hide that failure, so a problem recording it is only a warning then."""
        code = summary.exit_code_of(error)
        try:
            rd.event(None, "run_end", seconds=seconds, status=status_of(code), exit_code=code)
            doc = summary.document(
                name=self.loaded.config.name,
                config=self.loaded.path,
                run_dir=rd.root,
                stages=summary.stage_entries(
                    self.run_dir.root, self._summary_nodes(), outcomes, self._records, self._failed_gates, error
                ),
                error=error,
                started_at=started_at,
                finished_at=time.time(),
                seconds=seconds,
                tracking=tracker.info() if tracker is not None else None,
            )
            self.summary_document = doc
            atomic_write_json(rd.root / summary.SUMMARY_FILE, doc)
            if tracker is not None:
                training = {n.name for n in self.nodes if n.stage_cls.data_parallel}
                files = summary.stage_files(self.run_dir.root, self._records, self._failed_gates)
                tracker.log_artifacts(files, training, [rd.root / f for f in summary.RUN_FILES])
                tracker.finish(doc["status"], code)
                if tracker.info() != doc["tracking"]:  # a backend failed at the end: say so in the summary
                    doc["tracking"] = tracker.info()
                    atomic_write_json(rd.root / summary.SUMMARY_FILE, doc)
        except Exception as exc:
            if error is None:
                raise
            log.warning("could not record the end of the run in %s: %s", rd.root, exc)
        finally:
            rd.sinks = []

    def _summary_nodes(self) -> list[Node]:
        """The stages a run's summary lists: all of them, or a sub-run's own when ``--only`` ran one."""
        if self.only_scope is None:
            return self.nodes
        return [n for n in self.nodes if n.scope == self.only_scope]

    def _run_worker(self) -> RunSummary:
        """A rank other than 0 of a torchrun job: follow rank 0's plan, train the data-parallel stages' shards
        (their writes are rank 0's), and wait at each stage rank 0 runs; nothing in the run directory is touched."""
        t_start = time.perf_counter()
        actions, fps = distributed.broadcast_object(None)
        records: dict[str, StageRecord] = {}
        outcomes: list[StageOutcome] = []
        for node in self.nodes:
            fp = fps[node.name]
            stage_dir = self.run_dir.stage_dir(node.name)
            if actions[node.name] == "run":
                if node.stage_cls.data_parallel:
                    ctx = self._context(node, fp, stage_dir, records, {}, lambda *a, **k: None, is_main=False)
                    node.stage_cls(ctx).run()
                distributed.barrier()
                outcomes.append(StageOutcome(node.name, node.type, "ran"))
            if (stage_dir / RESULT_FILE).exists():
                records[node.name] = self._record(node, stage_dir)
        return RunSummary(self.run_dir.root, outcomes, time.perf_counter() - t_start)

    def _context(
        self,
        node: Node,
        fp: str,
        stage_dir: Path,
        records: dict[str, StageRecord],
        env: dict[str, Any],
        event: Callable[..., None],
        *,
        is_main: bool = True,
        failed: dict[str, list[dict[str, Any]]] | None = None,
    ) -> StageContext:
        # A stage that chose among candidates (a sweep) hides the ones it did not choose from the stages after it, so
        # they find the chosen candidate's student, exports and benchmark as in a run without a sweep.
        hidden = {h for u in node.upstream if u in records for h in records[u].result.get("info", {}).get("hides", [])}
        return StageContext(
            name=node.name,
            dir=stage_dir,
            config=node.config,
            loaded=self.loaded,
            fingerprint=fp,
            device=self.device,
            upstream=[records[u] for u in node.upstream if u in records and u not in hidden],
            failed_upstream={u: g for u, g in (failed or {}).items() if u in node.upstream},
            needs=node.needs,
            data_provider=self._data,
            event=event,
            progress=self.progress if is_main else NullProgress(),
            environment=env,
            options=self.options,
            is_main=is_main,
        )

    def _report(self, outcome: StageOutcome, outcomes: list[StageOutcome]) -> None:
        outcomes.append(outcome)
        if self.on_stage is not None:
            self.on_stage(outcome)

    def _record(self, node: Node, stage_dir: Path) -> StageRecord:
        try:
            result = json.loads((stage_dir / RESULT_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise StageError(
                f"cannot read {stage_dir / RESULT_FILE}: {exc}", hint=f"rerun with --from {node.name}"
            ) from exc
        return StageRecord(node.name, node.type, stage_dir, result)

    def _run_stage(
        self,
        rd: RunDir,
        node: Node,
        fp: str,
        stage_dir: Path,
        records: dict[str, StageRecord],
        env: dict[str, Any],
        lock: dict[str, Any],
    ) -> StageOutcome:
        stage_dir.mkdir(parents=True, exist_ok=True)
        # Without result.json the stage's recorded outputs no longer match, so a run that dies half-way through
        # this stage can never leave it looking up to date.
        (stage_dir / RESULT_FILE).unlink(missing_ok=True)
        ctx = self._context(
            node,
            fp,
            stage_dir,
            records,
            env,
            lambda event, **kw: rd.event(node.name, event, **kw),
            failed=self._failed_gates,
        )
        rd.event(node.name, "stage_start", fingerprint=fp, type=node.type)
        t0 = time.perf_counter()
        try:
            result = node.stage_cls(ctx).run()
        except GateFailed as exc:
            # The one place a failed gate becomes an event and a summary entry: from the gates the exception carries.
            self._failed_gates[node.name] = [g.to_dict() for g in exc.gates]
            _best_effort(rd.event, node.name, "gate_failed", gates=self._failed_gates[node.name])
            _best_effort(rd.event, node.name, "stage_fail", error=str(exc), exit_code=exc.exit_code)
            raise
        except KdpipeError as exc:
            _best_effort(rd.event, node.name, "stage_fail", error=str(exc), exit_code=exc.exit_code)
            if not exc.message.startswith(f"stage {node.name!r}"):
                exc.message = f"stage {node.name!r} ({node.type}): {exc.message}"
            raise
        except Exception as exc:
            log_path = stage_dir / "error.log"
            _best_effort(atomic_write_text, log_path, traceback.format_exc())
            _best_effort(rd.event, node.name, "stage_fail", error=repr(exc), exit_code=5)
            raise StageError(
                f"stage {node.name!r} ({node.type}) crashed: {type(exc).__name__}: {exc}",
                hint=f"full traceback in {log_path}",
            ) from exc
        seconds = time.perf_counter() - t0
        try:  # what later stages read must be what the stage type declares
            node.stage_cls.Output.model_validate(result.info)
        except ValidationError as exc:
            declared = node.stage_cls.Output.__name__
            raise StageError(
                f"stage {node.name!r} ({node.type}) recorded an output that is not its {declared}: "
                + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()),
                hint="a bug in the stage type: report it with this message",
            ) from None
        record = {
            "stage": node.name,
            "type": node.type,
            "fingerprint": fp,
            "metrics": result.metrics,
            "artifacts": result.artifacts,
            "info": result.info,
            "summary": result.summary,
            "seconds": seconds,
            "finished_at": time.time(),
        }
        atomic_write_json(stage_dir / RESULT_FILE, record)
        # Training checkpoints are only for resuming this stage; the finished stage's outputs replace them.
        shutil.rmtree(stage_dir / "checkpoints", ignore_errors=True)
        outputs = [*result.artifacts.values(), RESULT_FILE]
        lock[node.name] = {
            "fingerprint": fp,
            "status": "ok",
            "outputs": hash_outputs(stage_dir, outputs),
            "seconds": seconds,
            "finished_at": record["finished_at"],
        }
        self._write_lock(node.scope, lock)
        rd.event(node.name, "stage_end", seconds=seconds, metrics=result.metrics)
        records[node.name] = StageRecord(node.name, node.type, stage_dir, record)
        return StageOutcome(node.name, node.type, "ran", seconds, result.summary, result.metrics)
