"""The embedded default, examples/digits.yaml, on real data (scikit-learn's digits): the accuracy and size
claims of the README hold, and an unchanged rerun skips every stage. Its run time is measured by
benchmarks/digits_example.py, not here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

import kdpipe.stages  # noqa: F401
from kdpipe.config import load_config
from kdpipe.pipeline.outcome import RunSummary
from kdpipe.pipeline.runner import Runner, preflight
from tests.conftest import REPO

DIGITS = REPO / "examples" / "digits.yaml"


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunSummary]:
    run_dir = tmp_path_factory.mktemp("digits") / "run"
    return run_dir, Runner(load_config(DIGITS), run_dir).run()


def test_digits_example_meets_its_claims(digits_run: tuple[Path, RunSummary]) -> None:
    run_dir, summary = digits_run
    metrics = {o.name: o.metrics for o in summary.stages}
    assert [o.name for o in summary.stages] == [
        "teacher",
        "distill",
        "verify",
        "onnx",
        "int8",
        "bench",
        "serve",
        "card",
    ]
    assert [o.status for o in summary.stages] == ["ran"] * 8
    assert metrics["teacher"]["top1"] >= 0.97
    assert metrics["distill"]["top1"] >= 0.95
    assert metrics["distill"]["compression"] >= 5.0
    assert metrics["verify"]["gates_passed"] == 2
    # the exports match the student on the real test images; int8 costs at most one point of top-1
    assert metrics["onnx"]["max_abs_diff"] <= 1e-3 and metrics["onnx"]["top1_agreement"] >= 0.999
    assert metrics["int8"]["torch_top1"] - metrics["int8"]["top1"] <= 0.01
    assert metrics["bench"]["errors"] == 0 and metrics["bench"]["cells"] == 9
    assert (run_dir / "serve" / "model_repository" / "digits-kd" / "config.pbtxt").is_file()
    history = json.loads((run_dir / "distill" / "result.json").read_text())["info"]["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    with safe_open(run_dir / "distill" / "model.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["arch"] == "resnet8" and meta["role"] == "student" and meta["num_classes"] == "10"


def test_digits_example_rerun_skips_every_stage(digits_run: tuple[Path, RunSummary]) -> None:
    run_dir, _ = digits_run
    again = Runner(load_config(DIGITS), run_dir).run()
    assert [o.status for o in again.stages] == ["skipped"] * 8


def test_digits_card_loads_with_huggingface_hub(digits_run: tuple[Path, RunSummary]) -> None:
    from huggingface_hub import ModelCard

    run_dir, _ = digits_run
    card = ModelCard.load(run_dir / "card" / "README.md")
    roles = {r.metric_config for r in card.data.eval_results}
    assert roles == {"student", "teacher", "onnx", "int8"}
    assert card.data.base_model == "wrn_16_2"


@pytest.mark.parametrize("path", sorted((REPO / "examples").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_example_validates(path: Path) -> None:
    loaded = load_config(path)
    root = loaded.config.data.root
    if root is not None and not (path.parent / root).exists() and not loaded.config.data.download:
        pytest.skip(f"{path.name} reads {root}, which is absent here (the shared data sits beside the checkout)")
    preflight(loaded)


SWEEP_DIGITS = REPO / "examples" / "sweep_digits.yaml"
SHORT = [
    "stages.teacher.weights.train.epochs=3",
    "stages.sweep.train.epochs=2",
    "stages.sweep.verify.min_top1=0.0",
    "stages.sweep.export.parity.max_top1_drop=1.0",
    "stages.sweep.export.parity.min_agreement=0.0",
    "stages.sweep.benchmark.min_time_s=0.05",
    "stages.sweep.benchmark.warmup=2",
    "stages.sweep.select.max=1000",
]
"""The sweep example at 2-3 epochs, gates opened: its whole flow (12 candidates, the choice, serve, card) in about a
minute. The example as written runs in the slow test below and, timed, in benchmarks/digits_example.py."""


def _check_sweep_run(run_dir: Path, summary: RunSummary) -> dict:
    info = json.loads((run_dir / "sweep" / "result.json").read_text())["info"]
    assert len(info["rows"]) == 12  # 3 students x 2 methods x 2 precisions
    assert {r["student"] for r in info["rows"]} == {"resnet8", "resnet14", "mobilenetv2_x0_5_cifar"}
    assert info["selected"] in {r["candidate"] for r in info["rows"] if r["status"] == "ok"}
    serve = json.loads((run_dir / "serve" / "result.json").read_text())["info"]
    assert serve["export_stage"] == f"sweep/{info['selected']}"
    assert "## Student selection" in (run_dir / "card" / "README.md").read_text()
    assert summary.stages[-1].name == "card"
    return info


def test_the_sweep_example_runs_end_to_end(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    summary = Runner(load_config(SWEEP_DIGITS, SHORT), run_dir).run()
    info = _check_sweep_run(run_dir, summary)
    assert all(r["status"] == "ok" for r in info["rows"])


@pytest.mark.slow
def test_the_sweep_example_as_written(tmp_path: Path) -> None:
    """The example's own schedule and gates: every student above min_top1, int8 within a point of its student, and a
    budget that some candidates meet."""
    run_dir = tmp_path / "run"
    summary = Runner(load_config(SWEEP_DIGITS), run_dir).run()
    info = _check_sweep_run(run_dir, summary)
    rows = info["rows"]
    assert all(r["status"] == "ok" for r in rows), [r.get("reason") for r in rows]
    assert any(r["latency_ms"] > info["select"]["max"] for r in rows)  # the budget rules some out
