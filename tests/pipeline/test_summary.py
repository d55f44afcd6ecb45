"""summary.json: written by the engine at the end of every run that changed its run directory, success or failure,
with per-stage status, seconds, metrics, absolute artifact paths and gate outcomes (verify and parity)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import kdpipe.stages  # noqa: F401
from kdpipe.config import load_config
from kdpipe.errors import DataError, GateFailed, Interrupted, StageError
from kdpipe.pipeline.runner import Runner
from kdpipe.stages.verify import VerifyStage
from tests.conftest import TINY


def run(path: Path, run_dir: Path, *overrides: str, **kwargs: Any) -> Runner:
    runner = Runner(load_config(path, overrides), run_dir, **kwargs)
    runner.run()
    return runner


def summary_of(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def stages(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in doc["stages"]}


def test_success_then_rerun(write_config: Callable[..., Path], tmp_path: Path) -> None:
    cfg, rd = write_config(), tmp_path / "run"
    runner = run(cfg, rd)
    doc = summary_of(rd)
    assert doc == json.loads(json.dumps(runner.summary_document))
    assert (doc["status"], doc["exit_code"], doc["error"]) == ("ok", 0, None)
    assert doc["run_dir"] == str(rd.absolute()) and doc["config"] == str(cfg.absolute()) and doc["name"] == "tiny"
    by_name = stages(doc)
    assert list(by_name) == ["teacher", "distill", "verify", "card"]
    assert {s["status"] for s in doc["stages"]} == {"ran"}
    assert all(s["seconds"] > 0 for s in doc["stages"])
    for stage in doc["stages"]:
        for path in stage["artifacts"].values():
            assert Path(path).is_absolute() and Path(path).is_file(), path
    assert by_name["distill"]["artifacts"]["model"] == str((rd / "distill" / "model.safetensors").absolute())
    assert by_name["card"]["artifacts"]["readme"].endswith("card/README.md")
    verify = by_name["verify"]
    assert (
        verify["metrics"]["student_top1"]
        == json.loads((rd / "verify" / "result.json").read_text())["metrics"]["student_top1"]
    )
    assert [(g["name"], g["passed"], g["threshold"]) for g in verify["gates"]] == [("min_top1", True, 0.0)]
    assert doc["gates"] == {"checked": 1, "failed": 0, "failures": []}

    run(cfg, rd)  # nothing changed: every stage skipped, and the summary says so
    again = summary_of(rd)
    assert {s["status"] for s in again["stages"]} == {"skipped"} and again["exit_code"] == 0
    assert all(s["seconds"] == 0 for s in again["stages"])
    assert (
        stages(again)["verify"]["metrics"] == verify["metrics"] and stages(again)["verify"]["gates"] == verify["gates"]
    )
    assert again["started_at"] > doc["started_at"]


def test_gate_failure(write_config: Callable[..., Path], tmp_path: Path) -> None:
    cfg, rd = write_config(), tmp_path / "run"
    with pytest.raises(GateFailed) as info:
        run(cfg, rd, "stages.verify.min_top1=1.0", "stages.verify.max_drop_vs_teacher=1.0")
    # the exception carries every gate the stage checked, and the one gate_failed event is made from them
    assert [(g.name, g.passed) for g in info.value.gates] == [("min_top1", False), ("max_drop_vs_teacher", True)]
    events = [json.loads(line) for line in (rd / "events.jsonl").read_text().splitlines()]
    failed_events = [e for e in events if e["event"] == "gate_failed"]
    assert len(failed_events) == 1 and failed_events[0]["gates"] == [g.to_dict() for g in info.value.gates]
    doc = summary_of(rd)
    assert (doc["status"], doc["exit_code"]) == ("gate_failed", 4)
    assert doc["error"]["stage"] == "verify" and "FAILED by" in doc["error"]["message"]
    by_name = stages(doc)
    assert [by_name[n]["status"] for n in ("teacher", "distill", "verify", "card")] == [
        "ran",
        "ran",
        "failed",
        "not_run",
    ]
    gates = {g["name"]: g["passed"] for g in by_name["verify"]["gates"]}
    assert gates == {"min_top1": False, "max_drop_vs_teacher": True}
    assert by_name["verify"]["artifacts"] == {"report": str((rd / "verify" / "report.json").absolute())}
    assert by_name["verify"]["error"]["type"] == "GateFailed" and by_name["card"]["artifacts"] == {}
    assert doc["gates"]["failed"] == 1 and "min_top1" in doc["gates"]["failures"][0]


def test_crash_and_interruption_are_summarised(
    write_config: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write_config()
    with pytest.raises(Interrupted):
        run(cfg, tmp_path / "a", options={"stop_after_steps": {"teacher": 2}})
    doc = summary_of(tmp_path / "a")
    assert (doc["status"], doc["exit_code"]) == ("interrupted", 130)
    assert stages(doc)["teacher"]["status"] == "failed" and stages(doc)["distill"]["status"] == "not_run"

    def boom(self: VerifyStage) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(VerifyStage, "run", boom)
    with pytest.raises(StageError):
        run(cfg, tmp_path / "b")
    doc = summary_of(tmp_path / "b")
    assert (doc["status"], doc["exit_code"]) == ("failed", 5)
    assert "disk on fire" in doc["error"]["message"] and doc["error"]["stage"] == "verify"
    assert stages(doc)["distill"]["status"] == "ran" and stages(doc)["card"]["status"] == "not_run"


def test_no_summary_when_nothing_changed(write_config: Callable[..., Path], tmp_path: Path) -> None:
    """A data error is found before the run directory changes: it stays as it was (no summary.json either)."""
    (tmp_path / "imgs" / "train").mkdir(parents=True)
    cfg = write_config(TINY.replace("kind: synthetic,", "kind: imagefolder, root: imgs,"))
    rd = tmp_path / "run"
    runner = Runner(load_config(cfg), rd)
    with pytest.raises(DataError):
        runner.run()
    assert runner.summary_document is None and not (rd / "summary.json").exists()


def test_parity_gates_in_the_summary(write_config: Callable[..., Path], tmp_path: Path) -> None:
    cfg = write_config(
        TINY.replace(
            "  card:\n    type: model_card\n",
            "  onnx:\n    type: export\n    format: onnx\n"
            "  strict:\n    type: export\n    needs: [verify]\n    format: onnx\n    simplify: false\n"
            "    parity: {max_abs_diff: 0.0, min_agreement: 0.5}\n",
        )
    )
    rd = tmp_path / "run"
    try:
        run(cfg, rd)
        strict_failed = False
    except GateFailed:
        strict_failed = True
    by_name = stages(summary_of(rd))
    onnx = {g["name"]: g for g in by_name["onnx"]["gates"]}
    assert set(onnx) == {"max_abs_diff", "min_agreement", "max_top1_drop"} and all(g["passed"] for g in onnx.values())
    assert onnx["max_abs_diff"]["threshold"] == 1e-3 and onnx["max_abs_diff"]["value"] >= 0
    assert by_name["onnx"]["artifacts"]["model"].endswith("onnx/model.onnx")
    strict = {g["name"]: g for g in by_name["strict"]["gates"]}
    assert Path(by_name["strict"]["artifacts"]["parity"]).is_file()
    # a bit-exact export is possible in principle; the summary must say whichever happened
    assert strict["max_abs_diff"]["passed"] == (strict["max_abs_diff"]["value"] == 0.0) == (not strict_failed)
    assert strict["min_agreement"]["passed"] and by_name["strict"]["status"] == ("failed" if strict_failed else "ran")
