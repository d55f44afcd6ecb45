"""benchmarks/method_quality.py's pieces that decide what its table says: the per-method configs (which runs get the
shared teacher, which train one jointly, which hold out a validation split), ablation variants, and the targets
(every method within 0.5 point of KD; online methods' deployed network at least its CE baseline). The protocol
itself runs in tests/test_kd_gain.py (slow) and in the benchmark."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import REPO, load_module


@pytest.fixture(scope="module")
def mq() -> ModuleType:
    sys.path.insert(0, str(REPO / "benchmarks"))  # method_quality imports its siblings kd_table and _common
    try:
        return load_module(REPO / "benchmarks" / "method_quality.py", "method_quality")
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_configs_give_each_kind_of_method_its_teacher_and_split(mq: ModuleType, tmp_path: Path) -> None:
    def cfg(name: str, method: str | None = None, overrides: dict[str, object] | None = None) -> dict:
        return mq.stages_yaml(name, tmp_path, 20, 64, 60, 10, method, overrides)

    kd = cfg("kd")
    assert kd["stages"]["teacher"]["weights"]["train"]["epochs"] == 60  # replaced by the shared checkpoint
    assert kd["stages"]["distill"]["method"] == {"name": "kd", "temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}
    assert kd["stages"]["distill"]["train"]["eval_every"] == 10 and kd["data"]["val_fraction"] == 0.0
    assert "weights" not in cfg("dml")["stages"]["teacher"]  # trained jointly, from scratch
    assert "teacher" not in cfg("ce")["stages"] and "teacher" not in cfg("ffsd")["stages"]
    assert cfg("fusion_ratio")["data"]["val_fraction"] == 0.1
    assert cfg("dkd")["stages"]["distill"]["method"]["warmup_epochs"] == 2  # 20 of 240 epochs, scaled to 20
    variant = cfg("dpk_kd09", "dpk", {"ce_weight": 0.1, "kd_weight": 0.9})
    assert variant["name"] == "method-quality-dpk_kd09" and "weights" in variant["stages"]["teacher"]
    assert variant["stages"]["distill"]["method"] == {
        "name": "dpk",
        "warmup_epochs": 2,
        "ce_weight": 0.1,
        "kd_weight": 0.9,
    }


def test_variant_parsing(mq: ModuleType) -> None:
    assert mq.parse_variant("dpk_kd09=dpk:ce_weight=0.1,kd_weight=0.9") == (
        "dpk_kd09",
        "dpk",
        {"ce_weight": 0.1, "kd_weight": 0.9},
    )
    assert mq.parse_variant("iakd_const=iakd:schedule=constant") == ("iakd_const", "iakd", {"schedule": "constant"})
    assert mq.parse_variant("plain=kd") == ("plain", "kd", {})
    for bad in ("dpk:kd_weight=1", "x=nosuch", "kd=kd:ce_weight=1", "x=dpk:kd_weight"):
        with pytest.raises(argparse.ArgumentTypeError, match="--variant"):
            mq.parse_variant(bad)


def _row(recipe: str, seed: int, last: float, **extra: object) -> dict[str, object]:
    return {"recipe": recipe, "seed": seed, "seconds": 60.0, "top1_last_test": last, "top1_best": last, **extra}


def test_summary_targets_compare_with_kd_and_with_the_ce_baseline(mq: ModuleType) -> None:
    rows = [
        *(_row("ce.yaml", s, v) for s, v in enumerate((0.50, 0.52, 0.51))),
        *(_row("kd.yaml", s, v) for s, v in enumerate((0.55, 0.56, 0.57))),
        *(_row("dkd.yaml", s, v) for s, v in enumerate((0.5551, 0.5551, 0.5551))),  # 0.49 below KD: met
        *(_row("dpk.yaml", s, v) for s, v in enumerate((0.54, 0.55, 0.56))),  # 1.0 below KD: missed
        *(_row("dml.yaml", s, v, teacher_top1_last_test=0.6) for s, v in enumerate((0.52, 0.51, 0.52))),  # > CE
        *(_row("ffsd.yaml", s, v) for s, v in enumerate((0.50, 0.50, 0.51))),  # below CE: missed
        *(_row("dpk_kd09.yaml", s, v) for s, v in enumerate((0.56, 0.56, 0.56))),
        {"recipe": "switokd.yaml", "seed": 0, "seconds": 1.0, "error": "kdpipe exited with 5"},
    ]
    summary = mq.summarize(rows, 63.3, {"dpk_kd09": ("dpk", {"kd_weight": 0.9})})
    by = {e["method"]: e for e in summary}
    assert list(by) == ["ce", "kd", "dkd", "dpk", "dml", "switokd", "ffsd", "dpk_kd09"]
    assert by["kd"]["gain_over_ce"] == pytest.approx(5.0)
    assert by["kd"]["last"] == pytest.approx((56.0, 1.0))
    assert [by[m].get("meets_target") for m in ("ce", "kd", "dkd", "dpk", "dml", "ffsd", "dpk_kd09")] == [
        None,
        True,
        True,
        False,
        True,
        False,
        True,
    ]
    assert by["dpk_kd09"]["variant_of"] == "dpk" and by["dpk_kd09"]["gap_to_kd"] == pytest.approx(0.0)
    assert by["dml"]["joint_teacher_last"] == pytest.approx((60.0, 0.0)) and by["dml"]["joint_teacher_baseline"] == 63.3
    assert by["switokd"]["seeds"] == [] and by["switokd"]["failed"] == {0: "kdpipe exited with 5"}
    meta = {
        "per_class": 250, "train_images": 2500, "test_images": 10000, "teacher_epochs": 60, "teacher_top1": 63.3,
        "epochs": 20, "batch_size": 64, "eval_every": 10, "seeds": [0, 1, 2], "command": "python m.py", "jobs": 2,
        "teacher_seconds": 600.0, "total_seconds": 3600.0,
    }  # fmt: skip
    table = mq.markdown(summary, meta, {"date": "d", "commit": "c", "cpu_count": 2})
    assert "| `dpk` | 55.00 ± 1.00 |" in table and "**missed**" in table
    assert "| `dpk_kd09` (dpk: kd_weight=0.9) | 56.00 ± 0.00 |" in table
    assert "2 runs at a time" in table and "whole benchmark 60.0 min" in table
