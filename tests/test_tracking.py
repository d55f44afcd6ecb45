"""Experiment tracking against the real libraries: a local MLflow file store read back with MlflowClient (params,
per-epoch metric history, artifacts, status) and a TensorBoard event file read back with EventAccumulator; a missing
library is a config error before any work; a tracking failure mid-run is a warning, never a lost result; with
tracking off neither library is even imported."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import kdpipe.stages  # noqa: F401
from kdpipe.config import MlflowConfig, load_config
from kdpipe.errors import ConfigError, GateFailed
from kdpipe.pipeline.runner import Runner
from tests.conftest import REPO, TINY

mlflow = pytest.importorskip("mlflow", reason="needs mlflow-skinny (kdpipe[tracking], part of kdpipe[dev])")
event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator", reason="needs tensorboard (kdpipe[tracking])"
)
from mlflow.tracking import MlflowClient  # noqa: E402


@pytest.fixture(autouse=True)
def _clean_mlflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # kdpipe must enable MLflow's file store itself; and whatever it sets is undone after each test
    for name in ("MLFLOW_ALLOW_FILE_STORE", "MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def tracked(tracking: str) -> str:
    return TINY.lstrip("\n") + textwrap.dedent(tracking)


def artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> Iterator[str]:
    for item in client.list_artifacts(run_id, path):
        if item.is_dir:
            yield from artifacts(client, run_id, item.path)
        else:
            yield item.path


def scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    acc = event_accumulator.EventAccumulator(str(log_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_mlflow_and_tensorboard_record_a_run(write_config: Callable[..., Path], tmp_path: Path) -> None:
    cfg = write_config(
        tracked("""
        tracking:
          mlflow: {tracking_uri: store, experiment: kd-tests, tags: {team: vision}}
          tensorboard: {log_dir: tb}
        """)
    )
    rd = tmp_path / "run"
    runner = Runner(load_config(cfg), rd)
    runner.run()
    summary = json.loads((rd / "summary.json").read_text())
    info = summary["tracking"]["mlflow"]
    assert info["ok"] and info["tracking_uri"] == (tmp_path / "store").as_uri()  # relative to the stages.yaml
    client = MlflowClient(info["tracking_uri"])
    got = client.get_run(info["run_id"])
    assert got.info.status == "FINISHED" and got.info.run_name == "run"
    assert client.get_experiment(got.info.experiment_id).name == "kd-tests"
    assert got.data.tags["team"] == "vision" and got.data.tags["kdpipe.status"] == "ok"
    params = got.data.params
    assert params["stages.distill.train.epochs"] == "2" and params["seed"] == "0"
    assert params["stages.distill.method.name"] == "kd" and params["data.kind"] == "synthetic"
    assert not any(k.startswith("tracking") for k in params)
    history = client.get_metric_history(info["run_id"], "distill/train_loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2]
    events = [json.loads(line) for line in (rd / "events.jsonl").read_text().splitlines()]
    epochs = [e for e in events if e["event"] == "epoch" and e["stage"] == "distill"]
    assert sorted(m.value for m in history) == sorted(e["train_loss"] for e in epochs)
    final = client.get_metric_history(info["run_id"], "verify/student_top1")
    assert [m.value for m in final] == [summary["stages"][2]["metrics"]["student_top1"]]
    files = set(artifacts(client, info["run_id"]))
    expected = {"run/summary.json", "run/resolved.yaml", "run/events.jsonl", "card/README.md", "verify/report.json"}
    assert expected <= files
    assert "teacher/model.safetensors" not in files  # trained weights stay out unless artifacts: all

    tb = summary["tracking"]["tensorboard"]
    assert tb["ok"] and tb["log_dir"] == str(tmp_path / "tb")
    teacher = scalars(tmp_path / "tb", "teacher/eval_top1")
    assert [step for step, _ in teacher] == [1, 2]
    last = [e for e in events if e["stage"] == "teacher" and e["event"] == "epoch"][-1]
    assert teacher[-1][1] == pytest.approx(last["eval_top1"])
    assert [v for _, v in scalars(tmp_path / "tb", "verify/student_top1")] == pytest.approx(
        [summary["stages"][2]["metrics"]["student_top1"]]
    )


def test_failed_gate_is_a_failed_mlflow_run(write_config: Callable[..., Path], tmp_path: Path) -> None:
    cfg = write_config(tracked("tracking: {mlflow: {tracking_uri: store, artifacts: all}}\n"))
    rd = tmp_path / "run"
    with pytest.raises(GateFailed):
        Runner(load_config(cfg, ["stages.verify.min_top1=1.0"]), rd).run()
    info = json.loads((rd / "summary.json").read_text())["tracking"]["mlflow"]
    client = MlflowClient(info["tracking_uri"])
    got = client.get_run(info["run_id"])
    assert got.info.status == "FAILED" and got.data.tags["kdpipe.status"] == "gate_failed"
    files = set(artifacts(client, info["run_id"]))
    assert {"verify/report.json", "teacher/model.safetensors", "run/summary.json"} <= files


def test_tracking_failure_mid_run_is_a_warning(
    write_config: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from kdpipe.tracking import MlflowBackend

    calls = {"n": 0}
    real = MlflowBackend.metrics

    def flaky(self: MlflowBackend, *args: Any) -> None:
        calls["n"] += 1
        if calls["n"] > 1:
            raise ConnectionError("tracking server went away")
        real(self, *args)

    monkeypatch.setattr(MlflowBackend, "metrics", flaky)
    cfg = write_config(tracked("tracking: {mlflow: {tracking_uri: store}, tensorboard: {}}\n"))
    rd = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="kdpipe"):
        summary = Runner(load_config(cfg), rd).run()
    assert [o.status for o in summary.stages] == ["ran"] * 4
    assert calls["n"] == 2  # switched off after the first failure, not retried per event
    assert any("mlflow failed" in r.getMessage() and "went away" in r.getMessage() for r in caplog.records)
    doc = json.loads((rd / "summary.json").read_text())
    assert doc["exit_code"] == 0 and doc["tracking"]["mlflow"]["ok"] is False
    assert "went away" in doc["tracking"]["mlflow"]["error"]
    assert doc["tracking"]["tensorboard"]["ok"]  # the other backend carried on, into <run>/tensorboard by default
    assert [s for s, _ in scalars(rd / "tensorboard", "distill/train_loss")] == [1, 2]


def test_missing_library_is_a_config_error_before_any_work(
    write_config: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write_config(tracked("tracking:\n  tensorboard: {}\n  mlflow: {}\n"))
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if it were not installed
    with pytest.raises(ConfigError) as info:
        Runner(load_config(cfg), tmp_path / "run")
    message = str(info.value)
    line = cfg.read_text().splitlines().index("  mlflow: {}") + 1
    assert f"stages.yaml:{line}: tracking.mlflow: needs mlflow, which is not installed" in message
    assert 'pip install "kdpipe[tracking]"' in message
    assert not (tmp_path / "run").exists()


def test_missing_library_on_the_command_line(write_config: Callable[..., Path], tmp_path: Path) -> None:
    cfg = write_config(tracked("tracking: {mlflow: {}}\n"))
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['mlflow'] = None\n")
    env = {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{REPO}"}
    proc = subprocess.run(
        [sys.executable, "-m", "kdpipe", "run", str(cfg), "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "tracking.mlflow" in proc.stderr and "kdpipe[tracking]" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_nothing_is_imported_when_tracking_is_off(write_config: Callable[..., Path], tmp_path: Path) -> None:
    cfg = write_config()
    probe = textwrap.dedent(f"""
        import sys
        import kdpipe.stages
        from kdpipe.config import load_config
        from kdpipe.pipeline.runner import Runner
        from kdpipe.tracking import Tracker
        loaded = load_config({str(cfg)!r})
        Runner(loaded, {str(tmp_path / "run")!r}).run()
        heavy = ("mlflow", "tensorboard", "torch.utils.tensorboard")
        print("off:", sorted(m for m in heavy if m in sys.modules))
        on = load_config({str(cfg)!r}, ["tracking.tensorboard.log_dir=tb"])
        Tracker.create(on, {str(tmp_path / "run")!r})
        print("on:", sorted(m for m in heavy if m in sys.modules))
    """)
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "off: []" in proc.stdout and "on: ['tensorboard', 'torch.utils.tensorboard']" in proc.stdout


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://mlflow.internal:5000", "http://mlflow.internal:5000"),
        ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
        ("databricks", "databricks"),
        ("store", "file:///base/store"),
        ("file:store", "file:///base/store"),
        ("file:///abs/store", "file:///abs/store"),
        ("/abs/store", "file:///abs/store"),
    ],
)
def test_tracking_uri_resolution(given: str, expected: str) -> None:
    cfg = MlflowConfig.model_validate({"tracking_uri": given}, context={"base_dir": Path("/base")})
    assert cfg.tracking_uri == expected
