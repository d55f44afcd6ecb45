"""The engine: fingerprint skipping, rerun of what changed and what follows, --from/--only/--force, the
single-writer lock, gate failures and crashes that keep earlier results, and resume after interruption."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kdpipe.stages  # noqa: F401
from kdpipe.config import load_config
from kdpipe.errors import ConfigError, GateFailed, Interrupted, RunLocked, StageError
from kdpipe.pipeline.outcome import RunSummary
from kdpipe.pipeline.rundir import RunDir
from kdpipe.pipeline.runner import Runner
from kdpipe.stages.verify import VerifyStage
from tests.conftest import TINY


def run(path: Path, run_dir: Path, *overrides: str, **kwargs: object) -> RunSummary:
    return Runner(load_config(path, overrides), run_dir, **kwargs).run()  # type: ignore[arg-type]


def statuses(summary: RunSummary) -> dict[str, str]:
    return {o.name: o.status for o in summary.stages}


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


@pytest.fixture
def tiny(write_config: Callable[..., Path], tmp_path: Path) -> tuple[Path, Path]:
    return write_config(), tmp_path / "run"


def test_first_run_writes_the_run_directory(tiny: tuple[Path, Path]) -> None:
    cfg, rd = tiny
    summary = run(cfg, rd)
    assert statuses(summary) == dict.fromkeys(["teacher", "distill", "verify", "card"], "ran")
    for name in ("resolved.yaml", "environment.json", "events.jsonl", "run.lock.json"):
        assert (rd / name).is_file(), name
    lock = json.loads((rd / "run.lock.json").read_text())["stages"]
    assert set(lock) == {"teacher", "distill", "verify", "card"}
    assert "model.safetensors" in lock["distill"]["outputs"]
    assert (rd / "card" / "README.md").is_file()
    assert not (rd / "distill" / "checkpoints").exists()
    kinds = [e["event"] for e in events(rd)]
    assert kinds.count("stage_end") == 4 and kinds.count("epoch") == 4
    # every default is filled in resolved.yaml
    assert "kd_weight: 0.9" in (rd / "resolved.yaml").read_text()


def test_unchanged_rerun_skips_everything(tiny: tuple[Path, Path]) -> None:
    cfg, rd = tiny
    run(cfg, rd)
    before = (rd / "distill" / "model.safetensors").stat().st_mtime_ns
    summary = run(cfg, rd)
    assert set(statuses(summary).values()) == {"skipped"}
    assert (rd / "distill" / "model.safetensors").stat().st_mtime_ns == before
    assert summary.stages[1].metrics["top1"] >= 0.0


def test_editing_a_stage_reruns_it_and_downstream_only(tiny: tuple[Path, Path], write_config: Callable) -> None:
    cfg, rd = tiny
    run(cfg, rd)
    edited = write_config(TINY.replace("temperature: 4.0", "temperature: 2.0"))
    assert statuses(run(edited, rd)) == {"teacher": "skipped", "distill": "ran", "verify": "ran", "card": "ran"}
    edited = write_config(
        TINY.replace("temperature: 4.0", "temperature: 2.0").replace("min_top1: 0.0", "min_top1: 0.1")
    )
    assert statuses(run(edited, rd)) == {"teacher": "skipped", "distill": "skipped", "verify": "ran", "card": "ran"}


def test_from_only_force(tiny: tuple[Path, Path]) -> None:
    cfg, rd = tiny
    run(cfg, rd)
    assert statuses(run(cfg, rd, from_stage="verify")) == {
        "teacher": "skipped",
        "distill": "skipped",
        "verify": "ran",
        "card": "ran",
    }
    assert statuses(run(cfg, rd, only="verify")) == {"verify": "skipped"}  # selected, but up to date
    assert statuses(run(cfg, rd, only="verify", force=True)) == {"verify": "ran"}
    assert set(statuses(run(cfg, rd, force=True)).values()) == {"ran"}
    with pytest.raises(ConfigError, match=r"--only verfy: no such stage \(did you mean 'verify'\?\)"):
        run(cfg, rd, only="verfy")


def test_only_needs_upstream_results(tiny: tuple[Path, Path]) -> None:
    cfg, rd = tiny
    with pytest.raises(ConfigError, match="--only verify: it needs stage 'teacher'"):
        run(cfg, rd, only="verify")


def test_tampered_output_is_rebuilt(tiny: tuple[Path, Path]) -> None:
    cfg, rd = tiny
    run(cfg, rd)
    model = rd / "distill" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-10])
    assert statuses(run(cfg, rd)) == {"teacher": "skipped", "distill": "ran", "verify": "ran", "card": "ran"}


def test_corrupt_lock_file_reruns_everything(tiny: tuple[Path, Path]) -> None:
    cfg, rd = tiny
    run(cfg, rd)
    (rd / "run.lock.json").write_text("{not json")
    assert set(statuses(run(cfg, rd)).values()) == {"ran"}


def test_second_writer_is_refused(tiny: tuple[Path, Path]) -> None:
    cfg, rd = tiny
    with RunDir(rd), pytest.raises(RunLocked, match="in use by another kdpipe run"):
        run(cfg, rd)
    run(cfg, rd)  # the lock is released with its holder


def test_gate_failure_keeps_earlier_results(tiny: tuple[Path, Path]) -> None:
    cfg, rd = tiny
    with pytest.raises(GateFailed, match=r"student top-1 .* < min_top1 1\.0000: FAILED by"):
        run(cfg, rd, "stages.verify.min_top1=1.0")
    report = json.loads((rd / "verify" / "report.json").read_text())
    assert report["gates"][0]["passed"] is False
    lock = json.loads((rd / "run.lock.json").read_text())["stages"]
    assert set(lock) == {"teacher", "distill"}
    assert statuses(run(cfg, rd)) == {"teacher": "skipped", "distill": "skipped", "verify": "ran", "card": "ran"}


def test_crash_is_reported_with_traceback_file(tiny: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, rd = tiny

    def boom(self: VerifyStage) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(VerifyStage, "run", boom)
    with pytest.raises(StageError, match=r"stage 'verify' \(verify\) crashed: RuntimeError: boom") as info:
        run(cfg, rd)
    assert "error.log" in str(info.value)
    assert "RuntimeError: boom" in (rd / "verify" / "error.log").read_text()
    assert set(json.loads((rd / "run.lock.json").read_text())["stages"]) == {"teacher", "distill"}


@pytest.mark.parametrize("stage", ["teacher", "distill"])
def test_interrupted_run_resumes_to_identical_weights(tiny: tuple[Path, Path], tmp_path: Path, stage: str) -> None:
    cfg, rd = tiny
    reference = tmp_path / "reference"
    run(cfg, reference)
    # 128 samples / batch 32 = 4 steps per epoch: stop mid-epoch 1 of 2
    with pytest.raises(Interrupted, match="checkpoint saved"):
        run(cfg, rd, options={"stop_after_steps": {stage: 3}})
    assert (rd / stage / "checkpoints" / "last.pt").is_file()
    summary = run(cfg, rd)
    assert statuses(summary)[stage] == "ran"
    resumed = json.loads((rd / stage / "result.json").read_text())["info"]["resumed_from"]
    assert resumed == 0  # resumed inside the first epoch
    for name in ("teacher", "distill"):
        a = load_file(reference / name / "model.safetensors")
        b = load_file(rd / name / "model.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} weights differ after resume"


FOLDER_CONFIG = """
name: folder
seed: 0
device: cpu
data: {{kind: imagefolder, root: {root}, image_size: 8, augment: none, val_fraction: 0.0, cache_dir: {cache}}}
stages:
  teacher:
    type: teacher
    model: resnet8
    weights: {{train: {{epochs: 1, batch_size: 16, lr: 0.05}}}}
  distill:
    type: distill
    student: resnet8
    method: {{name: kd}}
    train: {{epochs: 1, batch_size: 16, lr: 0.05}}
"""


def _write_pngs(root: Path, count: int) -> None:
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for i in range(count):
        folder = root / ("train" if i < count * 3 // 4 else "test") / str(i % 2)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (8, 8), dtype=torch.uint8, generator=gen).numpy()
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")


@pytest.mark.parametrize("layout", ["folder", "tar"])
def test_data_changed_in_place_reruns_stages(layout: str, write_config: Callable[..., Path], tmp_path: Path) -> None:
    """The fingerprint covers the data files, not just data.*: an image rewritten under the same name (or an
    archive rebuilt under the same path) reruns every stage; an untouched dataset still skips them all."""
    import os
    import tarfile

    folder = tmp_path / "images"
    _write_pngs(folder, 40)
    root = folder
    if layout == "tar":
        root = tmp_path / "images.tar"
        with tarfile.open(root, "w") as tar:
            tar.add(folder, arcname="images")
    path = write_config(FOLDER_CONFIG.format(root=root, cache=tmp_path / "cache"))
    run_dir = tmp_path / "run"
    assert set(statuses(run(path, run_dir)).values()) == {"ran"}
    assert set(statuses(run(path, run_dir)).values()) == {"skipped"}

    changed = folder / "train" / "0" / "000.png"
    changed.write_bytes((folder / "train" / "0" / "002.png").read_bytes())  # same name, other image
    if layout == "tar":
        stat = root.stat()
        with tarfile.open(root, "w") as tar:
            tar.add(folder, arcname="images")
        os.utime(root, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert statuses(run(path, run_dir)) == {"teacher": "ran", "distill": "ran"}
    assert set(statuses(run(path, run_dir)).values()) == {"skipped"}
