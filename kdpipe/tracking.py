"""Experiment tracking: MLflow and TensorBoard, fed by the run's event stream.

Off unless stages.yaml has a ``tracking:`` section (``kdpipe.config.TrackingConfig``). Then rank 0's engine creates a
``Tracker`` once the run starts and hands it every event it appends to events.jsonl (``RunDir.sinks``):

- run start: the resolved config flattened to ``key.path = value`` params (MLflow), as text (TensorBoard);
- ``epoch`` events (the trainer's per-epoch rows): every number in them as metric ``<stage>/<name>``, step = epoch;
- ``stage_end`` and ``stage_skip``: the stage's metrics as ``<stage>/<name>`` at step 0, and its duration;
- run end: the outputs as MLflow artifacts (``MlflowConfig.artifacts``) and the run's status.

mlflow and tensorboard are imported only when their backend is on; a missing one is a config error before any work
(``requirements``). A backend that fails during the run is logged once as a warning and switched off: tracking never
fails a run and never costs a result (every result is in the run directory whatever happens to tracking).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import kdpipe
from kdpipe.config import LoadedConfig, MlflowConfig, TensorBoardConfig
from kdpipe.overrides import flatten
from kdpipe.requirements import TRACKING_HINT, Requirement, needs_module

log = logging.getLogger(__name__)

_NOT_METRICS = {"time", "stage", "event", "epoch"}
_MLFLOW_PARAM_CHARS = 6000
_MLFLOW_BATCH = 100


def requirements(loaded: LoadedConfig) -> list[Requirement]:
    """The libraries the config's tracking section needs (fatal: a run would otherwise lose its tracking)."""
    cfg = loaded.config.tracking
    reqs = []
    for backend, module in (("mlflow", "mlflow"), ("tensorboard", "tensorboard")):
        if getattr(cfg, backend) is not None:
            where = loaded.where(("tracking", backend))
            reqs.append(needs_module(module, field=f"tracking.{backend}", where=where, value=None, hint=TRACKING_HINT))
    return reqs


def params_of(config: Mapping[str, Any]) -> dict[str, str]:
    """The resolved config as MLflow params (the tracking section itself, which may hold credentials, left out)."""
    flat = flatten({k: v for k, v in config.items() if k != "tracking"})
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in flat.items()}


def numbers(values: Mapping[str, Any], stage: str) -> dict[str, float]:
    """Every number (nested ones too; booleans as 0/1) of ``values`` as ``<stage>/<key>``."""
    out = {}
    for key, value in flatten(values, sep="/").items():
        if isinstance(value, (bool, int, float)):
            out[f"{stage}/{key}"] = float(value)
    return out


class Backend(Protocol):
    name: str

    def start(self, params: dict[str, str], config_text: str) -> None: ...

    def metrics(self, values: dict[str, float], step: int, timestamp: float) -> None: ...

    def flush(self) -> None: ...

    def artifacts(self, stage_files: Mapping[str, list[Path]], training: set[str], run_files: list[Path]) -> None: ...

    def finish(self, status: str, exit_code: int) -> None: ...

    def info(self) -> dict[str, Any]: ...


class MlflowBackend:
    """One MLflow run per ``kdpipe run``, through ``MlflowClient`` (no global MLflow state is touched)."""

    name = "mlflow"

    def __init__(self, cfg: MlflowConfig, loaded: LoadedConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or (loaded.base_dir / "mlruns").as_uri()
        if self.uri.startswith("file:"):
            # MLflow 3 keeps its file store behind this switch; a file store is what the config (or default) asks for.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment = cfg.experiment or str(loaded.config.name)
        self.run_name = cfg.run_name or run_dir.absolute().name
        self.tags = {
            "kdpipe.version": kdpipe.__version__,
            "kdpipe.config": str(loaded.path.absolute()),
            "kdpipe.run_dir": str(run_dir.absolute()),
            **cfg.tags,
        }
        self.experiment_id = ""
        self.run_id = ""

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return str(found.experiment_id)
        try:
            return str(self.client.create_experiment(self.experiment))
        except Exception:  # another run created it meanwhile
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return str(found.experiment_id)

    def start(self, params: dict[str, str], config_text: str) -> None:
        from mlflow.entities import Param

        self.experiment_id = self._experiment_id()
        self.run_id = self.client.create_run(self.experiment_id, run_name=self.run_name, tags=self.tags).info.run_id
        items = [Param(k, v[:_MLFLOW_PARAM_CHARS]) for k, v in params.items()]
        for i in range(0, len(items), _MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _MLFLOW_BATCH])

    def metrics(self, values: dict[str, float], step: int, timestamp: float) -> None:
        from mlflow.entities import Metric

        items = [Metric(k, v, int(timestamp * 1000), step) for k, v in values.items()]
        for i in range(0, len(items), _MLFLOW_BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + _MLFLOW_BATCH])

    def flush(self) -> None:
        pass

    def artifacts(self, stage_files: Mapping[str, list[Path]], training: set[str], run_files: list[Path]) -> None:
        if self.cfg.artifacts == "none":
            return
        for path in run_files:
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path), artifact_path="run")
        for stage, files in stage_files.items():
            if stage in training and self.cfg.artifacts != "all":
                continue
            for path in files:
                if path.is_file():
                    self.client.log_artifact(self.run_id, str(path), artifact_path=stage)

    def finish(self, status: str, exit_code: int) -> None:
        self.client.set_tag(self.run_id, "kdpipe.status", status)
        self.client.set_tag(self.run_id, "kdpipe.exit_code", str(exit_code))
        mlflow_status = "FINISHED" if exit_code == 0 else "KILLED" if exit_code == 130 else "FAILED"
        self.client.set_terminated(self.run_id, status=mlflow_status)

    def info(self) -> dict[str, Any]:
        return {
            "tracking_uri": self.uri,
            "experiment": self.experiment,
            "experiment_id": self.experiment_id,
            "run_id": self.run_id,
            "run_name": self.run_name,
        }


class TensorBoardBackend:
    """Scalars in an event file (``torch.utils.tensorboard.SummaryWriter``); the config as text."""

    name = "tensorboard"

    def __init__(self, cfg: TensorBoardConfig, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = (cfg.log_dir or run_dir / "tensorboard").absolute()
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def start(self, params: dict[str, str], config_text: str) -> None:
        # indented: TensorBoard renders text as Markdown, and this keeps the YAML a code block
        self.writer.add_text("config", "\n".join("    " + line for line in config_text.splitlines()), 0)

    def metrics(self, values: dict[str, float], step: int, timestamp: float) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step, walltime=timestamp)

    def flush(self) -> None:
        self.writer.flush()

    def artifacts(self, stage_files: Mapping[str, list[Path]], training: set[str], run_files: list[Path]) -> None:
        pass

    def finish(self, status: str, exit_code: int) -> None:
        self.writer.add_text("status", f"{status} (exit code {exit_code})", 0)
        self.writer.close()

    def info(self) -> dict[str, Any]:
        return {"log_dir": str(self.log_dir)}


class Tracker:
    """The enabled backends behind one interface that never raises: a failing backend is warned about once and
    dropped, and its error is kept for the run summary."""

    def __init__(self, backends: list[Backend], errors: dict[str, str] | None = None) -> None:
        self.all = list(backends)
        self.active = list(backends)
        self.errors: dict[str, str] = dict(errors or {})

    @classmethod
    def create(cls, loaded: LoadedConfig, run_dir: Path) -> Tracker | None:
        """The tracker for the config's ``tracking`` section (None when it is off). Importing a library or opening a
        store happens here; a backend that cannot start is a warning and is left out."""
        cfg = loaded.config.tracking
        if not cfg.enabled:
            return None
        makers: list[tuple[str, Callable[[], Backend]]] = []
        if cfg.mlflow is not None:
            mlflow_cfg = cfg.mlflow
            makers.append(("mlflow", lambda: MlflowBackend(mlflow_cfg, loaded, run_dir)))
        if cfg.tensorboard is not None:
            tb_cfg = cfg.tensorboard
            makers.append(("tensorboard", lambda: TensorBoardBackend(tb_cfg, run_dir)))
        backends: list[Backend] = []
        errors: dict[str, str] = {}
        for name, make in makers:
            try:
                backends.append(make())
            except Exception as exc:
                errors[name] = f"start: {type(exc).__name__}: {exc}"
                log.warning("tracking: %s could not start (%s); the run goes on without it", name, errors[name])
        return cls(backends, errors)

    def _each(self, what: str, call: Callable[[Backend], None]) -> None:
        for backend in list(self.active):
            try:
                call(backend)
            except Exception as exc:
                self.errors[backend.name] = f"{what}: {type(exc).__name__}: {exc}"
                self.active.remove(backend)
                log.warning(
                    "tracking: %s failed (%s); the run goes on without it, and its results stay in the run directory",
                    backend.name,
                    self.errors[backend.name],
                )

    def start(self, config: Mapping[str, Any], config_text: str) -> None:
        params = params_of(config)
        self._each("start", lambda b: b.start(params, config_text))

    def on_event(self, record: Mapping[str, Any]) -> None:
        """A ``RunDir`` event sink."""
        stage, event = record.get("stage"), record.get("event")
        if not isinstance(stage, str):
            return
        timestamp = float(record.get("time") or time.time())
        if event == "epoch":
            values = numbers({k: v for k, v in record.items() if k not in _NOT_METRICS}, stage)
            step = int(record.get("epoch") or 0)
            self._each("log metrics", lambda b: b.metrics(values, step, timestamp))
        elif event in ("stage_end", "stage_skip"):
            values = numbers(record.get("metrics") or {}, stage)
            if event == "stage_end" and isinstance(record.get("seconds"), (int, float)):
                values[f"{stage}/seconds"] = float(record["seconds"])
            if values:
                self._each("log metrics", lambda b: b.metrics(values, 0, timestamp))
            self._each("flush", lambda b: b.flush())

    def log_artifacts(self, stage_files: Mapping[str, list[Path]], training: set[str], run_files: list[Path]) -> None:
        self._each("log artifacts", lambda b: b.artifacts(stage_files, training, run_files))

    def finish(self, status: str, exit_code: int) -> None:
        self._each("finish", lambda b: b.finish(status, exit_code))

    def info(self) -> dict[str, Any]:
        """Per backend: where it logged (URI, run id, folder) and whether it kept working."""
        out: dict[str, Any] = {}
        for backend in self.all:
            out[backend.name] = {**backend.info(), "ok": backend.name not in self.errors}
        for name, error in self.errors.items():
            out.setdefault(name, {"ok": False})["error"] = error
        return out
