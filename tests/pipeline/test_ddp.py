"""Data-parallel training as users launch it: ``torchrun --nproc-per-node 2 -m kdpipe run`` with the gloo backend on
CPU. A distill stage trained by two processes matches the same stage trained by one with the same global batch,
only rank 0 writes, and a torchrun job stopped by SIGTERM resumes from its checkpoint when relaunched."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdpipe.data import BatchLoader, TensorSplit

CONFIG = """
name: ddp
seed: 0
device: cpu
data: {kind: digits, image_size: 16, augment: crop, val_fraction: 0.1}
stages:
  teacher:
    type: teacher
    model: resnet8
    weights: {train: {epochs: 5, batch_size: 64, lr: 0.1}}
  distill:
    type: distill
    student: resnet8
    method: {name: kd}
    train: {epochs: EPOCHS, batch_size: 64, lr: 0.05}
"""


def _env() -> dict[str, str]:
    # One thread per process: two ranks share this machine's cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def _single(cfg: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "kdpipe", "run", str(cfg), "--out", str(out), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)


def _torchrun(cfg: Path, out: Path, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "kdpipe", "run", str(cfg), "--out", str(out), *args,
    ]  # fmt: skip


def _epochs(run_dir: Path, stage: str) -> list[dict[str, float]]:
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    return [e for e in events if e.get("event") == "epoch" and e.get("stage") == stage]


def test_trainer_on_two_ranks_gives_the_single_process_weights(tmp_path: Path) -> None:
    from tests.pipeline import ddp_worker

    out = tmp_path / "ddp.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run(
        [*cmd, str(Path(ddp_worker.__file__)), str(out)], capture_output=True, text=True, env=_env(), timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    saved = torch.load(out, weights_only=True)
    single = ddp_worker.train(tmp_path / "single.pt", tmp_path / "cache")
    for name, value in single.items():
        torch.testing.assert_close(saved["state"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    reference = torch.load(tmp_path / "single.pt", weights_only=True)["history"]
    for a, b in zip(reference, saved["history"], strict=True):  # epoch metrics are summed over ranks
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["train_top1"] == pytest.approx(a["train_top1"], abs=1e-9)
        assert b["eval_top1"] == pytest.approx(a["eval_top1"], abs=1e-9)


def test_two_processes_match_one_with_the_same_global_batch(tmp_path: Path) -> None:
    cfg = tmp_path / "stages.yaml"
    cfg.write_text(CONFIG.replace("EPOCHS", "3"))
    single = tmp_path / "single"
    proc = _single(cfg, single)
    assert proc.returncode == 0, proc.stderr
    # The same teacher for both: the data-parallel run reuses the single run's teacher stage and reruns distill.
    multi = tmp_path / "multi"
    shutil.copytree(single, multi)
    proc = subprocess.run(
        _torchrun(cfg, multi, "--from", "distill"), capture_output=True, text=True, env=_env(), timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    one, two = _epochs(single, "distill"), _epochs(multi, "distill")[-3:]
    assert [e["epoch"] for e in two] == [1, 2, 3]
    # Same samples, same crops, gradients averaged over the two halves of every batch: only BatchNorm's batch
    # statistics (per rank: 32 samples, not 64; CPU has no SyncBatchNorm) differ, and the gap grows with training
    # (the BatchNorm-free test above shows the rest is exact).
    assert two[0]["train_loss"] == pytest.approx(one[0]["train_loss"], rel=0.03)
    test_one = json.loads((single / "distill" / "result.json").read_text())["metrics"]["top1"]
    test_two = json.loads((multi / "distill" / "result.json").read_text())["metrics"]["top1"]
    assert test_one > 0.6 and abs(test_two - test_one) <= 0.12

    environment = json.loads((multi / "environment.json").read_text())
    assert environment["world_size"] == 2
    # Rank 0 alone wrote: one stage_end for the rerun, one log line per rank-0 event, no second model file.
    events = [json.loads(line) for line in (multi / "events.jsonl").read_text().splitlines()]
    assert sum(e.get("event") == "stage_end" and e.get("stage") == "distill" for e in events) == 2  # single + multi
    assert sorted(p.name for p in (multi / "distill").iterdir()) == ["model.safetensors", "result.json"]
    assert (proc.stdout + proc.stderr).count("✓ distill") == 1  # rank 0 reports, the other rank is quiet


def test_torchrun_job_stopped_by_sigterm_resumes(tmp_path: Path) -> None:
    cfg = tmp_path / "stages.yaml"
    cfg.write_text(CONFIG.replace("EPOCHS", "8"))
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen(
        _torchrun(cfg, run_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()
    )
    deadline = time.time() + 240
    while time.time() < deadline and launcher.poll() is None:
        if (run_dir / "events.jsonl").exists() and _epochs(run_dir, "distill"):
            break  # a distill epoch is done: the signal lands mid-training
        time.sleep(0.2)
    launcher.send_signal(signal.SIGTERM)
    out, err = launcher.communicate(timeout=120)
    assert launcher.returncode != 0, out + err
    assert (run_dir / "distill" / "checkpoints" / "last.pt").is_file(), out + err
    assert not (run_dir / "distill" / "result.json").exists()

    proc = subprocess.run(_torchrun(cfg, run_dir), capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((run_dir / "distill" / "result.json").read_text())
    assert result["info"]["resumed_from"] is not None and result["info"]["resumed_from"] >= 1
    assert [e["epoch"] for e in _epochs(run_dir, "distill")][-1] == 8


def _split(n: int) -> TensorSplit:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=generator)
    return TensorSplit(images, torch.arange(n) % 10)


def test_rank_shards_tile_the_global_batch_exactly() -> None:
    split = _split(203)
    common = {"batch_size": 16, "mean": (0.5,), "std": (0.25,), "train": True, "augment": "cifar", "seed": 3}
    whole = BatchLoader(split, **common)
    shards = [BatchLoader(split, **common, rank=r, world_size=2) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(whole) == 13  # the last batch of 11 splits into 6 + 5
    for epoch in (0, 1):
        for loader in (whole, *shards):
            loader.set_epoch(epoch)
        for (x, y), (x0, y0), (x1, y1) in zip(whole, *shards, strict=True):
            assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)


def test_a_global_batch_too_small_to_shard_is_refused() -> None:
    from kdpipe.errors import DataError

    with pytest.raises(DataError, match="batch_size 3 cannot be split over 2 processes"):
        BatchLoader(_split(32), batch_size=3, mean=(0.5,), std=(0.25,), train=True, rank=1, world_size=2)


def test_a_one_process_torchrun_job_joins_its_process_group(tmp_path: Path) -> None:
    """torchrun with one process still starts a process group (NCCL on a GPU, gloo here), so a one-GPU machine checks
    the backend a cluster job will use; the run records it."""
    cfg = tmp_path / "stages.yaml"
    cfg.write_text(CONFIG.replace("EPOCHS", "1").replace("epochs: 5,", "epochs: 1,"))
    command = _torchrun(cfg, tmp_path / "run")
    command[command.index("--nproc-per-node") + 1] = "1"
    proc = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    env = json.loads((tmp_path / "run" / "environment.json").read_text())
    assert env["world_size"] == 1 and env["distributed_backend"] == "gloo"
