"""The sweep stage on real digits: candidates (students x methods x precisions) distilled from one teacher as
sub-runs, a Pareto frontier, a latency budget that picks the deployed model (card and Triton repository), sub-runs
run on their own (--only) and collected by a later whole run, and bad sweeps refused before any work."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import kdpipe.stages  # noqa: F401
from kdpipe.config import load_config
from kdpipe.errors import ConfigError, GateFailed, RunLocked
from kdpipe.pipeline.rundir import RunDir
from kdpipe.pipeline.runner import Runner, preflight
from kdpipe.stages.sweep import SweepSelect, choose, pareto_frontier

SWEEP = """
version: 1
name: digits-sweep
seed: 0
device: cpu
data: {kind: digits, image_size: 16, augment: crop, val_fraction: 0.1}
stages:
  teacher:
    type: teacher
    model: resnet8
    weights: {train: {epochs: 4, batch_size: 64, lr: 0.05}}
  sweep:
    type: sweep
    students: [resnet8, resnet14]
    methods: [{name: kd}, {name: dkd, warmup_epochs: 1}]
    precisions: [fp32, int8]
    train: {epochs: 3, batch_size: 64, lr: 0.05}
    export: {parity: {min_agreement: 0.5, max_top1_drop: 0.5}}
    benchmark: {backends: [onnxruntime], batch_sizes: [1, 8], warmup: 2, min_iterations: 10, min_time_s: 0.02}
    select: {metric: p50_ms, max: 1000.0, batch: 1, backend: onnxruntime}
  serve:
    type: serve
  card:
    type: model_card
"""
JOBS = ["resnet8-kd", "resnet8-dkd", "resnet14-kd", "resnet14-dkd"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    (root / "stages.yaml").write_text(SWEEP)
    Runner(load_config(root / "stages.yaml"), root / "run").run()
    return root / "run"


def _result(run: Path, stage: str) -> dict[str, Any]:
    return json.loads((run / stage / "result.json").read_text())


def _copy(swept: Path, dest: Path) -> Path:
    shutil.copytree(swept, dest)
    return dest


def test_every_candidate_is_measured_and_the_most_accurate_within_budget_is_deployed(swept: Path) -> None:
    info = _result(swept, "sweep")["info"]
    rows = {r["candidate"]: r for r in info["rows"]}
    assert sorted(rows) == sorted(f"{j}/{p}" for j in JOBS for p in ("fp32", "int8"))
    assert all(r["status"] == "ok" for r in rows.values())
    for r in rows.values():  # the numbers are the members' own
        distill = _result(swept, f"sweep/{r['job']}/distill")
        export = _result(swept, f"sweep/{r['job']}/{r['precision']}")
        assert r["params"] == distill["metrics"]["params"] and r["top1"] == export["metrics"]["top1"]
        cells = _result(swept, f"sweep/{r['job']}/bench")["info"]["cells"]
        fmt = {"fp32": "onnx", "int8": "onnx-int8"}[r["precision"]]
        cell = next(c for c in cells if c["model"] == f"{r['student']} {fmt}" and c["batch_size"] == 1)
        assert r["p50_ms"] == cell["p50_ms"]
    best = max(rows.values(), key=lambda r: (r["top1"], -r["p50_ms"]))
    assert info["selected"] == best["candidate"]  # a budget everyone meets: the most accurate
    assert info["gates"][0]["passed"] and info["gates"][0]["name"] == "max_p50_ms"
    # the deployed model is the selected candidate's export
    serve = _result(swept, "serve")["info"]
    assert serve["export_stage"] == f"sweep/{info['selected']}"
    assert (swept / "sweep" / "report.md").is_file() and (swept / "sweep" / "pareto.png").stat().st_size > 1000


def test_the_frontier_holds_exactly_the_undominated_candidates(swept: Path) -> None:
    rows = _result(swept, "sweep")["info"]["rows"]
    frontier = set(_result(swept, "sweep")["info"]["frontier"])

    def dominated(r: dict[str, Any]) -> bool:
        return any(
            o["top1"] >= r["top1"]
            and o["p50_ms"] <= r["p50_ms"]
            and (o["top1"], o["p50_ms"]) != (r["top1"], r["p50_ms"])
            for o in rows
        )

    assert frontier == {r["candidate"] for r in rows if not dominated(r)} and frontier
    assert all(r["pareto"] == (r["candidate"] in frontier) for r in rows)


def test_pareto_and_choice_on_a_known_table() -> None:
    """Golden: a three-candidate table with one dominated candidate, chosen under three budgets."""
    rows = [
        {"candidate": "a", "status": "ok", "top1": 0.90, "latency_ms": 1.0},
        {"candidate": "b", "status": "ok", "top1": 0.80, "latency_ms": 2.0},  # dominated by a
        {"candidate": "c", "status": "ok", "top1": 0.95, "latency_ms": 3.0},
        {"candidate": "d", "status": "failed", "reason": "verify"},
    ]
    assert pareto_frontier(rows) == ["a", "c"]
    assert choose(rows, SweepSelect(max=5.0))[0] == "c"
    assert choose(rows, SweepSelect(max=2.5))[0] == "a"
    chosen, gate = choose(rows, SweepSelect(max=0.5))
    assert chosen is None and gate is not None and not gate.passed
    assert "closest is a at 1.000 ms" in gate.message
    assert choose(rows, SweepSelect()) == ("c", None)  # no budget: the most accurate
    nothing, gate = choose(rows[3:], SweepSelect())
    assert nothing is None and gate is not None and not gate.passed and "no candidate was measured" in gate.message


def test_the_card_is_the_selected_candidate_s(swept: Path) -> None:
    from huggingface_hub import ModelCard

    selected = _result(swept, "sweep")["info"]["selected"]
    card = ModelCard.load(swept / "card" / "README.md")
    text = card.text
    assert "## Student selection" in text and f"candidate `{selected}`" in text
    assert "![accuracy against latency](pareto.png)" in text and (swept / "card" / "pareto.png").is_file()
    parity = text.split("## Exported models and parity")[1].split("\n## ")[0]
    exports = [line for line in parity.splitlines() if line.startswith("| sweep/")]
    assert len(exports) == 1 and exports[0].startswith(f"| sweep/{selected} ")  # the others are hidden
    job = selected.split("/")[0]
    student = next(j for j in ("resnet14", "resnet8") if job.startswith(j))
    assert card.data.to_dict()["model-index"][0]["results"][0]["dataset"] is not None
    assert f"`{student}`" in text.split("## ")[1] or student in text  # the card is about the chosen student
    assert "sweep:" in text  # how to reproduce: the stages.yaml as written, not its expansion


def test_a_rerun_is_up_to_date_and_a_new_candidate_runs_alone(
    swept: Path, tmp_path: Path, write_config: Callable[..., Path]
) -> None:
    rd = _copy(swept, tmp_path / "run")
    cfg = write_config(SWEEP)
    again = Runner(load_config(cfg), rd).run()
    assert {o.status for o in again.stages} == {"skipped"}
    more = write_config(SWEEP.replace("students: [resnet8, resnet14]", "students: [resnet8, resnet14, resnet20]"))
    summary = Runner(load_config(more), rd).run()
    ran = {o.name for o in summary.stages if o.status == "ran"}
    new = {f"sweep/resnet20-{m}/{r}" for m in ("kd", "dkd") for r in ("distill", "fp32", "int8", "bench")}
    assert ran == new | {"sweep", "serve", "card"}  # the finished candidates stay up to date
    assert len(_result(rd, "sweep")["info"]["rows"]) == 12


def test_one_candidate_runs_as_its_own_sub_run_and_a_whole_run_collects_it(
    swept: Path, tmp_path: Path, write_config: Callable[..., Path]
) -> None:
    """What a cluster does: teacher first, then one kdpipe run --only <sweep>/<candidate> per job (each with its own
    lock, events and summary in its folder), then a whole run that finds them up to date and chooses."""
    rd = tmp_path / "run"
    rd.mkdir()
    shutil.copytree(swept / "teacher", rd / "teacher")
    lock = json.loads((swept / "run.lock.json").read_text())
    lock["stages"] = {"teacher": lock["stages"]["teacher"]}
    (rd / "run.lock.json").write_text(json.dumps(lock))
    cfg = write_config(SWEEP)
    sub = Runner(load_config(cfg), rd, only="sweep/resnet8-kd").run()
    assert {o.name for o in sub.stages if o.status == "ran"} == {
        f"sweep/resnet8-kd/{r}" for r in ("distill", "fp32", "int8", "bench")
    }
    home = rd / "sweep" / "resnet8-kd"
    assert json.loads((home / "summary.json").read_text())["status"] == "ok"
    assert set(json.loads((home / "run.lock.json").read_text())["stages"]) == {
        f"sweep/resnet8-kd/{r}" for r in ("distill", "fp32", "int8", "bench")
    }
    assert "sweep/resnet8-kd/distill" in (home / "events.jsonl").read_text()
    assert not (rd / "summary.json").exists()  # the run's own files are the whole run's
    # the same candidate's weights as in a whole run: sub-runs are the same stages
    assert (
        _result(rd, "sweep/resnet8-kd/distill")["metrics"]["top1"]
        == _result(swept, "sweep/resnet8-kd/distill")["metrics"]["top1"]
    )
    whole = Runner(load_config(cfg), rd).run()
    ran = {o.name for o in whole.stages if o.status == "ran"}
    assert not any(n.startswith("sweep/resnet8-kd/") for n in ran) and "sweep" in ran


def test_sub_runs_share_the_run_directory_but_exclude_a_whole_run(
    swept: Path, tmp_path: Path, write_config: Callable[..., Path]
) -> None:
    rd = _copy(swept, tmp_path / "run")
    cfg = write_config(SWEEP)
    with RunDir(rd, shared=True), RunDir(rd / "sweep" / "resnet8-kd"):  # another machine runs resnet8-kd
        with pytest.raises(RunLocked, match=r"sweep/resnet8-kd is in use"):
            Runner(load_config(cfg), rd).run()
        with pytest.raises(RunLocked, match=r"sweep/resnet8-kd is in use"):
            Runner(load_config(cfg), rd, only="sweep/resnet8-kd").run()
        Runner(load_config(cfg), rd, only="sweep/resnet14-kd").run()  # another candidate goes ahead
    with RunDir(rd), pytest.raises(RunLocked):  # a whole run holds it: no sub-run starts
        Runner(load_config(cfg), rd, only="sweep/resnet14-kd").run()


def test_a_sub_run_before_its_teacher_says_what_to_run_first(tmp_path: Path, write_config: Callable[..., Path]) -> None:
    with pytest.raises(ConfigError, match=r"--only sweep/resnet8-kd: it needs stage 'teacher'"):
        Runner(load_config(write_config(SWEEP)), tmp_path / "run", only="sweep/resnet8-kd").run()


def test_no_candidate_within_budget_is_a_failed_gate_naming_the_closest(
    swept: Path, tmp_path: Path, write_config: Callable[..., Path]
) -> None:
    rd = _copy(swept, tmp_path / "run")
    cfg = write_config(SWEEP.replace("max: 1000.0", "max: 0.0001"))
    with pytest.raises(
        GateFailed,
        match=r"no candidate meets the budget p50_ms at batch 1 on onnxruntime <= 0\.0001 ms; the closest is ",
    ) as info:
        Runner(load_config(cfg), rd).run()
    rows = json.loads((rd / "sweep" / "report.json").read_text())["rows"]
    fastest = min(rows, key=lambda r: r["p50_ms"])
    assert f"the closest is {fastest['candidate']}" in info.value.message
    assert info.value.exit_code == 4
    assert json.loads((rd / "summary.json").read_text())["exit_code"] == 4


def test_a_candidate_that_misses_its_gate_is_left_out_and_the_run_goes_on(
    swept: Path, tmp_path: Path, write_config: Callable[..., Path]
) -> None:
    tops = {j: _result(swept, f"sweep/{j}/distill")["metrics"]["top1"] for j in JOBS}
    low, high = min(tops.values()), max(tops.values())
    assert low < high
    threshold = (low + high) / 2
    rd = _copy(swept, tmp_path / "run")
    cfg = write_config(
        SWEEP.replace("    export: {parity", f"    verify: {{min_top1: {threshold}}}\n    export: {{parity")
    )
    Runner(load_config(cfg), rd).run()
    rows = {r["candidate"]: r for r in _result(rd, "sweep")["info"]["rows"]}
    for job, top in tops.items():
        for p in ("fp32", "int8"):
            assert (rows[f"{job}/{p}"]["status"] == "ok") == (top >= threshold)
    failed = next(r for r in rows.values() if r["status"] != "ok")
    assert failed["status"] == "failed" and "verify: student top-1" in failed["reason"]
    assert "Left out of the choice" in (rd / "sweep" / "report.md").read_text()
    summary = json.loads((rd / "summary.json").read_text())
    assert summary["exit_code"] == 0 and any(s["status"] == "failed" for s in summary["stages"])


def test_an_int8_export_out_of_parity_leaves_its_fp32_sibling_measured(
    swept: Path, tmp_path: Path, write_config: Callable[..., Path]
) -> None:
    """Exact agreement with the student: the fp32 graphs meet it, some int8 graph does not. The candidate's benchmark
    still measures the fp32 export, so only the int8 candidate is left out (a skipped benchmark would take both)."""
    rd = _copy(swept, tmp_path / "run")
    cfg = write_config(
        SWEEP.replace("parity: {min_agreement: 0.5, max_top1_drop: 0.5}", "parity: {min_agreement: 1.0}")
    )
    Runner(load_config(cfg), rd).run()
    rows = {r["candidate"]: r for r in _result(rd, "sweep")["info"]["rows"]}
    assert all(rows[f"{j}/fp32"]["status"] == "ok" and rows[f"{j}/fp32"]["latency_ms"] > 0 for j in JOBS)
    failed = [j for j in JOBS if rows[f"{j}/int8"]["status"] != "ok"]
    assert failed, {j: rows[f"{j}/int8"]["agreement"] for j in JOBS}
    for job in failed:
        assert rows[f"{job}/int8"]["status"] == "failed" and "top-1 agreement" in rows[f"{job}/int8"]["reason"]
        cells = _result(rd, f"sweep/{job}/bench")["info"]["cells"]
        assert {c["model"].split()[-1] for c in cells} == {"onnx"}  # the fp32 export alone


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ([("students: [resnet8, resnet14]", "students: [resnet8, resnet8]")], r"stages\.sweep\.students: 'resnet8' is listed twice"),
        ([("precisions: [fp32, int8]", "precisions: [fp32, fp32]")], r"stages\.sweep\.precisions: 'fp32' is listed twice"),
        ([("methods: [{name: kd}, {name: dkd, warmup_epochs: 1}]", "methods: [{name: kd}, {name: kd, temperature: 2.0}]")], r"stages\.sweep\.methods: 'kd' appears twice in the list; (.|\n)* give them labels"),
        ([("methods: [{name: kd}, {name: dkd, warmup_epochs: 1}]", "methods: {a: {name: kd}, b: {name: kd}}")], r"stages\.sweep\.methods: 'b' is the same method and settings as 'a'"),
        ([("precisions: [fp32, int8]", "precisions: [fp32, int4]")], r"unknown precision 'int4'"),
        ([("backend: onnxruntime}", "backend: tensorrt}")], r"stages\.sweep\.select\.backend: 'tensorrt' is not benchmarked \(stages\.sweep\.benchmark\.backends: onnxruntime\)"),
        ([("max: 1000.0, batch: 1", "max: 1000.0, batch: 4")], r"stages\.sweep\.select\.batch: batch 4 is not benchmarked"),
        ([("backends: [onnxruntime]", "backends: [onnxruntime, torch]"), ("backend: onnxruntime}", "backend: torch}")], r"select\.backend: 'torch' runs the PyTorch student, none of the candidates' exports"),
    ],
    ids=["students", "precisions", "method-list", "method-map", "precision-name", "backend", "batch", "torch"],
)  # fmt: skip
def test_bad_sweeps_are_refused_before_any_work_at_their_line(
    write_config: Callable[..., Path], changes: list[tuple[str, str]], message: str
) -> None:
    text = SWEEP
    for old, new in changes:
        assert old in text
        text = text.replace(old, new)
    with pytest.raises(ConfigError, match=message) as info:
        preflight(load_config(write_config(text)))
    assert "stages.yaml:" in str(info.value)


def test_a_method_that_cannot_serve_a_student_is_refused_with_the_candidate(write_config: Callable[..., Path]) -> None:
    text = SWEEP.replace("model: resnet8\n    weights", "model: resnet18\n    weights").replace(
        "methods: [{name: kd}, {name: dkd, warmup_epochs: 1}]", "methods: [{name: kd}, {name: iakd}]"
    )
    with pytest.raises(
        ConfigError,
        match=r"stages\.yaml:\d+: stages\.sweep\.methods\.1: iakd cannot distil student 'resnet8': iakd cannot pair",
    ) as info:
        preflight(load_config(write_config(text)))
    assert "drop 'resnet8' or 'iakd' from the sweep" in str(info.value)
