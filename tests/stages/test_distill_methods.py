"""Every registered KD method through the real pipeline: a distill stage in a stages.yaml, run by the Runner on
synthetic data (a flow test: seconds), with the method's per-epoch statistics in events.jsonl, its params in the
stage result, and a deployable student that loads into a fresh model. Also the checks the distill stage makes before
any work: a method that needs a validation split, and a teacher/student pair the method cannot handle."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kdpipe.stages  # noqa: F401
from kdpipe.config import load_config
from kdpipe.errors import ConfigError
from kdpipe.models.factory import create_model
from kdpipe.pipeline.runner import Runner
from kdpipe.registry import METHODS

PIPELINE = """
version: 1
name: methods
seed: 0
device: cpu
data: {kind: synthetic, num_classes: 4, num_samples: 160, image_size: 16, augment: none, val_fraction: 0.2}
stages:
  teacher:
    type: teacher
    model: resnet14
    weights: {train: {epochs: 1, batch_size: 32, lr: 0.05}}
  distill:
    type: distill
    student: resnet8
    method: METHOD
    train: {epochs: 2, batch_size: 32, lr: 0.05}
"""

# Method-specific statistics each method must log every epoch (beyond the loss parts).
EPOCH_KEYS: dict[str, set[str]] = {
    "fusion_ratio": {"alpha_mean", "alpha_std"},
    "iakd": {"swap_p", "swap_fraction"},
    "dpk": {"pi_0", "cka_0"},
    "switokd": {"expert_frac", "gap", "delta"},
}


def _methods() -> list[str]:
    return sorted(entry.name for entry in METHODS if entry.obj.teacher_role == "frozen")


@pytest.mark.parametrize("method", _methods())
def test_method_runs_in_the_pipeline(method: str, write_config: Callable[..., Path], tmp_path: Path) -> None:
    cfg = write_config(PIPELINE.replace("METHOD", f"{{name: {method}}}"))
    summary = Runner(load_config(cfg), tmp_path / "run").run()
    assert [s.status for s in summary.stages] == ["ran", "ran"]
    result = json.loads((tmp_path / "run" / "distill" / "result.json").read_text())
    assert result["info"]["method_params"]["name"] == method
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    rows = [e for e in events if e["event"] == "epoch" and e["stage"] == "distill"]
    assert len(rows) == 2, events
    assert all(EPOCH_KEYS.get(method, set()) <= set(row) for row in rows), rows[-1]
    saved = load_file(tmp_path / "run" / "distill" / "model.safetensors")
    fresh = create_model("resnet8", num_classes=4, in_chans=3)
    assert set(saved) == set(fresh.state_dict()), "the saved student must be the plain student, nothing more"
    fresh.load_state_dict({k: v for k, v in saved.items()})
    assert torch.isfinite(fresh.eval()(torch.randn(2, 3, 16, 16))).all()


@pytest.mark.skipif("fusion_ratio" not in METHODS, reason="fusion_ratio is not registered")
def test_method_needing_a_validation_split_is_refused_before_work(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    cfg = write_config(
        PIPELINE.replace("METHOD", "{name: fusion_ratio}").replace("val_fraction: 0.2", "val_fraction: 0")
    )
    with pytest.raises(ConfigError, match=r"stages\.yaml:\d+: stages\.distill\.method: fusion_ratio .*val_fraction"):
        Runner(load_config(cfg), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif("iakd" not in METHODS, reason="iakd is not registered")
def test_unsupported_pair_is_refused_before_work(write_config: Callable[..., Path], tmp_path: Path) -> None:
    cfg = write_config(PIPELINE.replace("METHOD", "{name: iakd}").replace("model: resnet14", "model: convnext_atto"))
    with pytest.raises(ConfigError, match=r"stages\.yaml:\d+: stages\.distill\.method: .*convnext"):
        Runner(load_config(cfg), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method", sorted(e.name for e in METHODS if e.obj.teacher_role == "joint"))
def test_online_method_trains_an_architecture_only_teacher(
    method: str, write_config: Callable[..., Path], tmp_path: Path
) -> None:
    text = PIPELINE.replace("METHOD", f"{{name: {method}}}").replace(
        "    weights: {train: {epochs: 1, batch_size: 32, lr: 0.05}}\n", ""
    )
    text += "  card:\n    type: model_card\n"
    summary = Runner(load_config(write_config(text)), tmp_path / "run").run()
    assert [s.status for s in summary.stages] == ["ran", "ran", "ran"]
    teacher = json.loads((tmp_path / "run" / "teacher" / "result.json").read_text())
    assert teacher["info"]["trained"] is False and "architecture only" in teacher["info"]["source"]
    result = json.loads((tmp_path / "run" / "distill" / "result.json").read_text())
    networks = result["metrics"]["networks"]
    assert set(networks) == {"teacher", "student"} and result["metrics"]["deployed_network"] == "student"
    assert networks["teacher"]["model"] == "resnet14" and networks["student"].get("deployed") is True
    saved = load_file(tmp_path / "run" / "distill" / result["artifacts"]["network_teacher"])
    initial = load_file(tmp_path / "run" / "teacher" / "model.safetensors")
    assert set(saved) == set(initial)
    assert any(not torch.equal(saved[k], initial[k]) for k in saved), "the teacher must have been trained jointly"
    rows = [
        json.loads(line)
        for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()
        if '"epoch"' in line and '"distill"' in line
    ]
    assert all(
        {"eval_top1_teacher", *EPOCH_KEYS.get(method, ())} <= set(row) for row in rows if row["event"] == "epoch"
    )
    # The card reports the jointly trained teacher (not the teacher stage's random initialisation) and both networks.
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "run" / "card" / "README.md")
    facts = json.loads((tmp_path / "run" / "card" / "card.json").read_text())
    assert facts["teacher"]["metrics"]["top1"] == pytest.approx(networks["teacher"]["top1"])
    assert "## Online training" in card.text and "| teacher | resnet14 |" in card.text


def test_offline_method_refuses_an_untrained_teacher(write_config: Callable[..., Path], tmp_path: Path) -> None:
    text = PIPELINE.replace("METHOD", "{name: kd}").replace(
        "    weights: {train: {epochs: 1, batch_size: 32, lr: 0.05}}\n", ""
    )
    with pytest.raises(ConfigError, match=r"kd distils from a trained teacher.*'teacher' gives only an architecture"):
        Runner(load_config(write_config(text)), tmp_path / "run")


def test_ffsd_needs_no_teacher_stage_and_deploys_the_leader(write_config: Callable[..., Path], tmp_path: Path) -> None:
    text = PIPELINE.replace("METHOD", "{name: ffsd}")
    text = text[: text.index("  teacher:")] + text[text.index("  distill:") :]
    summary = Runner(load_config(write_config(text)), tmp_path / "run").run()
    assert [s.status for s in summary.stages] == ["ran"]
    result = json.loads((tmp_path / "run" / "distill" / "result.json").read_text())
    networks = result["metrics"]["networks"]
    assert set(networks) == {"student0", "student1", "leader"} and result["metrics"]["deployed_network"] == "leader"
    assert networks["leader"]["deployed"] and result["metrics"]["top1"] == pytest.approx(networks["leader"]["top1"])
    saved = load_file(tmp_path / "run" / "distill" / "model.safetensors")
    assert set(saved) == set(create_model("resnet8", num_classes=4, in_chans=3).state_dict())
