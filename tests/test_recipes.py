"""examples/recipes/: every recipe is _generate.py's output, passes ``kdpipe validate`` (schema, stage graph,
per-stage checks and the data path), says which published number it targets in a header kd_table.py reads, and
follows its protocol; two of them run end to end through benchmarks/kd_table.py (the second reusing the first's
teacher) for one epoch on a tiny imagefolder of real digit images.

The recipes name the official CIFAR (``kind: cifar100``/``cifar10``, ``download: true`` into the checkout's data/), so
they validate in a user's clone with no data present; the documented offline override (``--set data.kind=imagefolder
--set data.root=...``) is checked against the JPEG copies in ../shared/data, and skips, saying so, where those are
absent.
The end-to-end run uses the digits images even where CIFAR-100 is present: decoding the whole archive into a
fresh test cache (about 15 s) plus resnet32x4 on 32x32 inputs would not fit the ~30 s this test may take.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

import kdpipe.stages  # noqa: F401  (registers stage types and methods)
from kdpipe.cli import cli
from kdpipe.config import load_config
from kdpipe.data.splits import resolve_root
from kdpipe.pipeline.runner import preflight
from tests.conftest import REPO, load_module, shared_dataset

RECIPES_DIR = REPO / "examples" / "recipes"
RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))
ARCHIVES = {"cifar100": "cifar100-jpg.tar.gz", "cifar10": "cifar10-jpg.tar.gz"}
# The spec tables give no CIFAR number for these methods (offline.md §1.4, §2.4): their recipes target none.
NO_TARGET = {"dpk", "iakd"}


@pytest.fixture(scope="module")
def kd_table() -> ModuleType:
    sys.path.insert(0, str(REPO / "benchmarks"))  # kd_table imports its sibling _common
    try:
        return load_module(REPO / "benchmarks" / "kd_table.py", "kd_table")
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny imagefolder of real images: scikit-learn's handwritten digits as 16x16 RGB PNGs, 4 train and 2 test
    images per class (the recipes read 32x32 CIFAR; the end-to-end test overrides data.image_size to 16)."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits-imagefolder")
    digits = load_digits()
    for label in range(10):
        picked = np.flatnonzero(digits.target == label)[:6]
        for k, index in enumerate(picked):
            folder = root / ("train" if k < 4 else "test") / f"digit{label}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[index] * (255 / 16)).astype(np.uint8)
            Image.fromarray(pixels).resize((16, 16), Image.Resampling.BILINEAR).convert("RGB").save(
                folder / f"{index}.png"
            )
    return root


def _offline_overrides(recipe: Path, archive: Path) -> list[str]:
    """The header's documented command for a local ImageFolder copy, with its placeholder path replaced."""
    text = recipe.read_text(encoding="utf-8")
    match = re.search(r"^#\s+--set (data\.kind=imagefolder) --set data\.root=(\S+)$", text, re.MULTILINE)
    assert match, f"{recipe.name}: the header shows no offline (local copy) override"
    assert Path(match[2]).name == archive.name, f"{recipe.name}: the override names {match[2]}, not {archive.name}"
    return [match[1], f"data.root={archive}"]


def _raw(recipe: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    return data


# --- the files ------------------------------------------------------------------------------------------------------


def test_recipes_are_the_generators_output() -> None:
    generate = load_module(RECIPES_DIR / "_generate.py", "recipes_generate")
    expected = generate.outputs()
    for path, text in expected.items():
        assert path.is_file(), f"{path.name} is missing: run python examples/recipes/_generate.py"
        assert path.read_text(encoding="utf-8") == text, (
            f"{path.name} differs: run python examples/recipes/_generate.py"
        )
    assert {p for p in RECIPES} == {p for p in expected if p.suffix == ".yaml"}, "a recipe not written by _generate.py"
    assert len(RECIPES) >= 40


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates(recipe: Path) -> None:
    """As a user's clone has it: no data anywhere, the recipe downloads it on its first run."""
    loaded = load_config(recipe)
    root = resolve_root(loaded.config.data, recipe.parent)
    assert root is not None and not root.exists(), f"{root} exists: this test checks a clone with no data"
    nodes = preflight(loaded)
    assert [n.type for n in nodes][-1] == "distill"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_names_its_pair_data_and_target(recipe: Path, kd_table: ModuleType) -> None:
    config = load_config(recipe).config
    stages = list(config.stages.values())
    distill = stages[-1]
    teacher = next((s.model for s in stages if s.type == "teacher"), None)
    assert recipe.name == "_".join([distill.method.name, *([teacher] if teacher else []), distill.student]) + ".yaml"
    root = resolve_root(config.data, recipe.parent)
    assert config.data.kind in ("cifar10", "cifar100") and config.data.download
    assert root is not None and root.resolve() == (REPO / "data" / config.data.kind).resolve()
    targets = kd_table.read_targets(recipe)
    assert "target" in targets, f"{recipe.name}: no '# target:' header line"
    target = targets["target"]
    assert target.what, f"{recipe.name}: the target names no source"
    if distill.method.name in NO_TARGET:
        assert target.value is None
    else:
        lo, hi = (85.0, 100.0) if config.data.kind == "cifar10" else (55.0, 85.0)
        assert target.value is not None and lo < target.value < hi, f"{recipe.name}: implausible target {target}"


@pytest.mark.parametrize("kind", sorted(ARCHIVES))
def test_recipe_offline_override_reads_a_local_copy(kind: str) -> None:
    """Each header's command for a local copy, on the real archives: kdpipe validate's data checks pass, and the
    same override with a path that does not exist is refused (skipped, visibly, where the archives are absent)."""
    archive = shared_dataset(ARCHIVES[kind])
    using = [r for r in RECIPES if load_config(r).config.data.kind == kind]
    assert using
    for recipe in using:
        loaded = load_config(recipe, _offline_overrides(recipe, archive))
        assert loaded.config.data.kind == "imagefolder"
        preflight(loaded)
    absent = load_config(using[0], _offline_overrides(using[0], archive.parent / "absent" / archive.name))
    with pytest.raises(Exception, match="does not exist"):
        preflight(absent)


def test_kdpipe_validate_command() -> None:
    recipe = RECIPES_DIR / "dkd_resnet32x4_resnet8x4.yaml"
    result = CliRunner().invoke(cli, ["validate", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "ok — 2 stages: teacher (teacher), distill (distill <- teacher)" in result.output


def test_documented_teacher_checkpoint_override(tmp_path: Path) -> None:
    """The header's command that swaps the 240-epoch teacher training for a checkpoint works as printed."""
    recipe = RECIPES_DIR / "kd_resnet32x4_resnet8x4.yaml"
    text = recipe.read_text(encoding="utf-8")
    match = re.search(r"^#\s+--set '(stages\.teacher\.weights=\{checkpoint: (\S+)\})'$", text, re.MULTILINE)
    assert match, "the header shows no teacher checkpoint override"
    checkpoint = tmp_path / "resnet32x4.pth"
    checkpoint.write_bytes(b"")  # preflight checks that the file exists; loading it is the teacher stage's job
    assignment = match[1].replace(match[2], str(checkpoint))
    loaded = load_config(recipe, [assignment])
    preflight(loaded)
    weights = loaded.config.stages["teacher"].weights
    assert weights.checkpoint == checkpoint and weights.train is None
    missing = load_config(recipe, [assignment.replace(str(checkpoint), str(tmp_path / "absent.pth"))])
    with pytest.raises(Exception, match="file not found"):
        preflight(missing)


# --- the protocols ----------------------------------------------------------------------------------------------------

CRD_TRAIN = {"epochs": 240, "batch_size": 64, "weight_decay": 0.0005, "momentum": 0.9, "nesterov": False}
SMALL_STUDENTS = ("shufflenet_v1", "shufflenet_v2", "mobilenetv2_x0_5_cifar")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_follows_its_protocol(recipe: Path) -> None:
    raw = _raw(recipe)
    stages = raw["stages"]
    distill = stages["distill"]
    train, method = distill["train"], distill["method"]
    if "teacher" in stages and "weights" in stages["teacher"]:  # offline: the CRD teacher protocol
        teacher_train = stages["teacher"]["weights"]["train"]
        assert {k: teacher_train[k] for k in CRD_TRAIN} == CRD_TRAIN and teacher_train["lr"] == 0.05
        assert teacher_train["schedule"] == {"name": "step", "milestones": [150, 180, 210], "gamma": 0.1}
    if method["name"] in ("kd", "dkd", "dpk", "iakd") or (method["name"] == "ce" and train["epochs"] == 240):
        assert {k: train[k] for k in CRD_TRAIN} == CRD_TRAIN
        assert train["lr"] == (0.01 if distill["student"] in SMALL_STUDENTS else 0.05)
        assert train["schedule"]["milestones"] == [150, 180, 210]
        assert raw["data"]["val_fraction"] == 0.0
    if method["name"] == "kd":
        assert (method["temperature"], method["ce_weight"], method["kd_weight"]) == (4.0, 0.1, 0.9)
    if method["name"] == "dkd":
        assert (method["temperature"], method["alpha"], method["warmup_epochs"]) == (4.0, 1.0, 20)
        assert method["beta"] in (2.0, 6.0, 8.0)
    if method["name"] == "fusion_ratio":
        assert (train["batch_size"], train["lr"], method["temperature"], method["hidden"]) == (128, 0.1, 4.0, 128)
        assert raw["data"]["val_fraction"] > 0
    if method["name"] in ("dml", "switokd"):
        assert "weights" not in stages["teacher"], "online: the teacher trains jointly from scratch"
        assert (train["epochs"], train["batch_size"], method["temperature"]) == (299, 128, 1.0)
    if method["name"] == "ffsd":
        assert "teacher" not in stages
        assert (train["lr"], train["nesterov"], train["weight_decay"]) == (0.1, True, 0.0001)
        assert train["schedule"]["milestones"] == [150, 225]


# --- kd_table.py --------------------------------------------------------------------------------------------------------


def test_read_targets_and_overrides(tmp_path: Path, kd_table: ModuleType) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "# title\n# target: 67.24 +- 0.04 (SwitOKD, Table 4)\n# teacher-target: none (not published)\nversion: 1\n"
        "# target: 1.0 (after the header: ignored)\n"
    )
    targets = kd_table.read_targets(recipe)
    assert targets["target"] == kd_table.Target(67.24, 0.04, "SwitOKD, Table 4")
    assert targets["teacher-target"].value is None
    raw = _raw(RECIPES_DIR / "dkd_resnet32x4_resnet8x4.yaml")
    options = kd_table.Options(seeds=[3], epochs=24, subset=0.1, precision="fp32")
    sets = kd_table.overrides_for(raw, 3, options)
    assert "stages.distill.train.epochs=24" in sets and "stages.teacher.weights.train.epochs=24" in sets
    assert "stages.distill.train.schedule.milestones=[15, 18, 21]" in sets  # 150/180/210 of 240, scaled
    assert {"seed=3", "data.subset=0.1", "stages.distill.precision=fp32"} <= set(sets)
    # kd and dkd on the same pair train the same teacher: kd_table trains it once
    kd_raw = _raw(RECIPES_DIR / "kd_resnet32x4_resnet8x4.yaml")
    assert kd_table.teacher_key(raw, sets) == kd_table.teacher_key(kd_raw, kd_table.overrides_for(kd_raw, 3, options))
    assert kd_table.teacher_key(_raw(RECIPES_DIR / "ce_resnet8x4.yaml"), sets) is None
    assert not any(s.startswith("data.") and s != "data.subset=0.1" for s in sets)  # no --data-dir: the recipe's data
    local = kd_table.overrides_for(raw, 3, kd_table.Options(seeds=[3], data_dir=tmp_path))
    assert local[1:] == [
        "data.kind=imagefolder",
        f"data.root={tmp_path / 'cifar100-jpg.tar.gz'}",
        "data.download=false",
    ]


def test_two_recipes_end_to_end_through_kd_table(tmp_path: Path, digits_folder: Path, kd_table: ModuleType) -> None:
    """kd and dkd on resnet32x4 -> resnet8x4, 1 epoch each on the tiny digits imagefolder, through the real CLI
    (a subprocess per run, as kd_table.py runs them); the dkd run takes the teacher the kd run trained."""
    recipes = [RECIPES_DIR / "kd_resnet32x4_resnet8x4.yaml", RECIPES_DIR / "dkd_resnet32x4_resnet8x4.yaml"]
    extra = (
        "data.kind=imagefolder",
        f"data.root={digits_folder}",
        "data.image_size=16",
        "device=cpu",
        "stages.teacher.weights.train.batch_size=20",
        "stages.distill.train.batch_size=20",
    )
    options = kd_table.Options(seeds=[0], epochs=1, extra=extra, quiet=True)
    rows = kd_table.run_table(recipes, options, tmp_path / "work")
    assert [r.get("error") for r in rows] == [None, None], rows
    kd_row, dkd_row = rows
    assert dkd_row["teacher_weights"] == str(
        tmp_path / "work" / "kd_resnet32x4_resnet8x4-s0" / "teacher" / "model.safetensors"
    )
    assert kd_row["teacher_top1_last_test"] == dkd_row["teacher_top1_last_test"]  # the same teacher weights
    for row in rows:
        assert (row["epochs"], row["eval_split"], row["teacher"], row["student"]) == (
            1,
            "test",
            "resnet32x4",
            "resnet8x4",
        )
        assert 0.0 <= row["top1_last_test"] <= 1.0 and 0.0 <= row["top1_best"] <= 1.0
        resolved = yaml.safe_load((tmp_path / "work" / f"{Path(row['recipe']).stem}-s0" / "resolved.yaml").read_text())
        assert resolved["stages"]["distill"]["train"]["epochs"] == 1
    summaries = [kd_table.summarize(r, [row for row in rows if row["recipe"] == r.name]) for r in recipes]
    assert [s["target"]["value"] for s in summaries] == [73.33, 76.32]
    table = kd_table.markdown(summaries, {"date": "d", "commit": "c"}, True, shlex.join(["kd_table.py", "--smoke"]))
    assert "meaningless" in table and "| 73.33 |" in table and "| 76.32 |" in table


def test_cpu_slots_split_the_affinity_into_disjoint_equal_shares(
    kd_table: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kd_table.os, "sched_getaffinity", lambda pid: {4, 5, 6, 7, 9})
    assert kd_table.cpu_slots(2) == [[4, 5], [6, 7]]
    assert kd_table.cpu_slots(1) == [[4, 5, 6, 7, 9]]
    with pytest.raises(ValueError, match="--jobs 6 is more than the 5 CPUs"):
        kd_table.cpu_slots(6)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two pinned runs need two CPUs")
def test_parallel_runs_are_pinned_apart_and_come_back_in_task_order(
    tmp_path: Path, digits_folder: Path, kd_table: ModuleType
) -> None:
    """Two ce runs (seeds 0 and 1) with jobs=2: each pinned to its own CPU slot, the rows in task order whatever
    finishes first, each run with its own seed and folder."""
    recipe = RECIPES_DIR / "ce_resnet8x4.yaml"
    extra = ("data.kind=imagefolder", f"data.root={digits_folder}", "data.image_size=16", "device=cpu")
    extra += ("stages.distill.train.batch_size=20",)
    options = kd_table.Options(seeds=[0, 1], epochs=1, extra=extra, quiet=True, jobs=2)
    tasks = [(recipe, 0), (recipe, 1)]
    rows = kd_table.run_parallel(tasks, options, tmp_path / "work", order=lambda task: float(task[1]))
    assert [r.get("error") for r in rows] == [None, None], rows
    assert [r["seed"] for r in rows] == [0, 1]
    assert sorted(tuple(r["cpus"]) for r in rows) == [tuple(s) for s in kd_table.cpu_slots(2)]
    for seed in (0, 1):
        resolved = yaml.safe_load((tmp_path / "work" / f"ce_resnet8x4-s{seed}" / "resolved.yaml").read_text())
        assert resolved["seed"] == seed
