"""Pretrained starting points: a teacher or student whose weights come from a file, a timm hub folder or the
local hub cache, with a class head of another size re-initialised (timm's rule) and recorded in the card."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import kdpipe.stages  # noqa: F401
from kdpipe.config import load_config
from kdpipe.errors import ConfigError, DataError
from kdpipe.models.factory import create_model
from kdpipe.models.weights import save_weights
from kdpipe.pipeline.runner import Runner
from tests.conftest import TINY

TRAIN = "weights: {train: {epochs: 2, batch_size: 32, lr: 0.05}}"
REPO_ROOT = Path(__file__).resolve().parents[2]


def teacher_only(text: str) -> str:
    return text[: text.index("  distill:")]


def _result(run: Path, stage: str) -> dict:
    return json.loads((run / stage / "result.json").read_text())


def test_teacher_checkpoint_of_another_head_is_fine_tuned_with_a_fresh_one(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    torch.manual_seed(1)
    source = create_model("resnet8", num_classes=100, in_chans=3)  # a CIFAR-100 checkpoint, a 4-class run
    save_weights(source, tmp_path / "c100.safetensors")
    weights = "weights: {checkpoint: c100.safetensors, train: {epochs: 1, batch_size: 32, lr: 1.0e-9}}"
    cfg = write_config(TINY.replace(TRAIN, weights))
    Runner(load_config(cfg), tmp_path / "run").run()
    info = _result(tmp_path / "run", "teacher")["info"]
    assert info["weights"]["head"] == {"adapted": True, "file_classes": 100, "classes": 4, "layers": ["fc"]}
    assert info["weights"]["source"] == f"file {tmp_path / 'c100.safetensors'}"
    saved = load_file(tmp_path / "run" / "teacher" / "model.safetensors")
    # lr ~0: the body is the file's (BatchNorm statistics move in train mode, weights do not); the head is new.
    assert torch.allclose(saved["conv1.weight"], source.state_dict()["conv1.weight"], atol=1e-6)
    assert saved["fc.weight"].shape == (4, 64)
    card = (tmp_path / "run" / "card" / "README.md").read_text()
    assert "## Starting weights" in card and "re-initialised (fc: 100 -> 4 classes)" in card


def test_teacher_with_a_fresh_head_and_no_training_is_refused(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    save_weights(create_model("resnet8", num_classes=100, in_chans=3), tmp_path / "teacher.safetensors")
    cfg = write_config(teacher_only(TINY.replace(TRAIN, "weights: {checkpoint: teacher.safetensors}")))
    with pytest.raises(ConfigError, match="re-initialised: the weights have 100 classes, the run 4") as err:
        Runner(load_config(cfg), tmp_path / "run").run()
    assert "stages.teacher.weights.train" in err.value.hint and err.value.exit_code == 2


def test_checkpoint_folder_without_a_timm_model_is_a_config_error(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    (tmp_path / "weights").mkdir()
    cfg = write_config(teacher_only(TINY.replace(TRAIN, "weights: {checkpoint: weights}")))
    with pytest.raises(ConfigError, match=r"stages\.teacher\.weights\.checkpoint: .* no config\.json"):
        Runner(load_config(cfg), tmp_path / "run").run()


def _fill_hub_cache(cache: Path, repo: str, model: torch.nn.Module) -> None:
    """The folder layout huggingface_hub's download leaves: refs/main names a snapshot holding the file."""
    revision = "0" * 40
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(revision)
    (folder / "snapshots" / revision).mkdir(parents=True)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(folder / "snapshots" / revision / "model.safetensors"))


def _kdpipe(config: Path, out: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kdpipe", "run", str(config), "--out", str(out)],
        cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_pretrained_teacher_from_the_offline_hub_cache(write_config: Callable[..., Path], tmp_path: Path) -> None:
    torch.manual_seed(3)
    published = timm.create_model("resnet10t", num_classes=1000)
    cache = tmp_path / "hub"
    _fill_hub_cache(cache, "timm/resnet10t.c3_in1k", published)
    weights = "weights: {pretrained: true, train: {epochs: 1, batch_size: 32, lr: 1.0e-9}}"
    cfg = write_config(teacher_only(TINY.replace(TRAIN, weights).replace("model: resnet8", "model: resnet10t.c3_in1k")))
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    done = _kdpipe(cfg, tmp_path / "run", env)
    assert done.returncode == 0, done.stderr[-2000:]
    info = _result(tmp_path / "run", "teacher")["info"]
    assert info["weights"]["source"] == "timm pretrained resnet10t.c3_in1k"
    assert info["weights"]["head"]["file_classes"] == 1000 and info["weights"]["head"]["classes"] == 4
    saved = load_file(tmp_path / "run" / "teacher" / "model.safetensors")
    assert torch.allclose(saved["conv1.0.weight"], published.state_dict()["conv1.0.weight"], atol=1e-6)

    missing = _kdpipe(cfg, tmp_path / "run2", {**env, "HF_HUB_CACHE": str(tmp_path / "empty")})
    assert missing.returncode == 2, missing.stderr[-2000:]
    assert "HF_HUB_OFFLINE is set" in missing.stderr and "timm/resnet10t.c3_in1k" in missing.stderr
    assert "Traceback" not in missing.stderr


DIGITS = """
version: 1
name: digits-transfer
seed: 0
device: cpu
data: {kind: digits, image_size: 16, augment: crop, val_fraction: 0.0}
stages:
"""


def test_pretrained_student_starts_ahead_of_a_random_one(write_config: Callable[..., Path], tmp_path: Path) -> None:
    """Real digits: a resnet8 trained on them, its head swapped for a 1000-class one (a file from another task),
    fine-tuned one epoch as the distill stage's student; a randomly initialised student gets the same epoch."""
    pretrain = (
        DIGITS + "  base: {type: teacher, model: resnet8, weights: {train: {epochs: 4, batch_size: 64, lr: 0.05}}}\n"
    )
    Runner(load_config(write_config(pretrain, "pretrain.yaml")), tmp_path / "pretrain").run()
    state = load_file(tmp_path / "pretrain" / "base" / "model.safetensors")
    torch.manual_seed(0)
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 64) * 0.01, torch.zeros(1000)
    save_file(state, str(tmp_path / "other-task.safetensors"))

    distill = "  student:\n    type: distill\n    student: resnet8\n    method: {name: ce}\n"
    distill += "    train: {epochs: 1, batch_size: 64, lr: 0.02}\n"
    top1 = {}
    for name, extra in (("random", ""), ("pretrained", "    student_weights: {checkpoint: other-task.safetensors}\n")):
        cfg = write_config(DIGITS + distill + extra, f"{name}.yaml")
        Runner(load_config(cfg), tmp_path / name).run()
        result = _result(tmp_path / name, "student")
        top1[name] = result["metrics"]["top1"]
        if name == "pretrained":
            assert result["info"]["weights"]["head"]["file_classes"] == 1000
    assert top1["pretrained"] > top1["random"] + 0.2, top1


# --- data.normalize: the pretrained networks' own mean/std ---


def _hub_folder(path: Path, name: str, mean: tuple[float, ...], num_classes: int = 1000) -> Path:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=num_classes)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": mean, "std": (0.25, 0.25, 0.25)}
    timm.models.save_for_hf(model, path, safe_serialization=True)
    return path


def _weights_mean(path: Path) -> list[float]:
    from kdpipe.models.weights import read_weights_metadata

    return [float(v) for v in read_weights_metadata(path)["mean"].split(",")]


def test_auto_normalisation_follows_the_pretrained_teacher_into_the_onnx_metadata(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    import onnx

    _hub_folder(tmp_path / "teacher-hub", "resnet10t", (0.5, 0.4, 0.3))
    weights = "weights: {checkpoint: teacher-hub, train: {epochs: 1, batch_size: 32, lr: 0.01}}"
    text = TINY.replace(TRAIN, weights).replace("model: resnet8", "model: resnet10t", 1)
    text = text.replace("  card:\n    type: model_card\n", "  onnx:\n    type: export\n    format: onnx\n")
    Runner(load_config(write_config(text)), tmp_path / "run").run()
    assert _weights_mean(tmp_path / "run" / "teacher" / "model.safetensors") == [0.5, 0.4, 0.3]
    assert _weights_mean(tmp_path / "run" / "distill" / "model.safetensors") == [0.5, 0.4, 0.3]
    meta = {p.key: p.value for p in onnx.load(tmp_path / "run" / "onnx" / "model.onnx").metadata_props}
    assert json.loads(meta["kdpipe.preprocessing.mean"]) == [0.5, 0.4, 0.3]
    assert json.loads(meta["kdpipe.preprocessing.std"]) == [0.25, 0.25, 0.25]
    # dataset: the train split's own statistics, as before
    text = text.replace("augment: none,", "augment: none, normalize: dataset,")
    Runner(load_config(write_config(text, "dataset.yaml")), tmp_path / "run-dataset").run()
    assert _weights_mean(tmp_path / "run-dataset" / "teacher" / "model.safetensors") != [0.5, 0.4, 0.3]


def test_conflicting_pretrained_normalisations_are_a_config_error(
    write_config: Callable[..., Path], tmp_path: Path
) -> None:
    _hub_folder(tmp_path / "teacher-hub", "resnet10t", (0.5, 0.4, 0.3))
    _hub_folder(tmp_path / "student-hub", "resnet10t", (0.485, 0.456, 0.406))
    weights = "weights: {checkpoint: teacher-hub, train: {epochs: 1, batch_size: 32}}"
    text = TINY.replace(TRAIN, weights).replace("model: resnet8", "model: resnet10t", 1)
    text = text.replace("student: resnet8", "student: resnet10t\n    student_weights: {checkpoint: student-hub}")
    with pytest.raises(ConfigError, match="expect different normalisations") as err:
        Runner(load_config(write_config(text)), tmp_path / "run")
    assert "stages.teacher (teacher resnet10t) expects mean [0.5, 0.4, 0.3]" in err.value.message
    assert "stages.distill (student resnet10t) expects mean [0.485, 0.456, 0.406]" in err.value.message
    assert err.value.message.startswith(str(tmp_path / "stages.yaml")) and err.value.exit_code == 2
    chosen = text.replace("augment: none,", "augment: none, normalize: {mean: [0.5, 0.5, 0.5], std: [0.2, 0.2, 0.2]},")
    Runner(load_config(write_config(chosen, "chosen.yaml")), tmp_path / "run", only="teacher").run()
    assert _weights_mean(tmp_path / "run" / "teacher" / "model.safetensors") == [0.5, 0.5, 0.5]


def test_normalisation_errors_name_the_field(write_config: Callable[..., Path], tmp_path: Path) -> None:
    text = TINY.replace("augment: none,", "augment: none, normalize: model,")
    with pytest.raises(ConfigError, match=r"data\.normalize: model, but no teacher or student starts from pretrained"):
        Runner(load_config(write_config(text)), tmp_path / "run")
    with pytest.raises(ConfigError, match="mean has 3 values and std 1"):
        load_config(
            write_config(TINY.replace("augment: none,", "augment: none, normalize: {mean: [0, 0, 0], std: [1]},"))
        )
    # Three-channel statistics for one-channel digits: refused when the data is loaded, naming the fix.
    _hub_folder(tmp_path / "hub", "resnet10t", (0.5, 0.4, 0.3))
    digits = DIGITS + "  teacher: {type: teacher, model: resnet10t, weights: {checkpoint: hub, train: {epochs: 1}}}\n"
    with pytest.raises(DataError, match=r"gives 3 channel\(s\) of mean/std, but the images have 1"):
        Runner(load_config(write_config(digits, "digits.yaml")), tmp_path / "digits").run()


def test_unset_image_size_follows_the_pretrained_weights(write_config: Callable[..., Path], tmp_path: Path) -> None:
    model = create_model("resnet8", num_classes=10, in_chans=1)
    save_weights(model, tmp_path / "digits12.safetensors", {"image_size": "12", "mean": "0.25", "std": "0.5"})
    text = DIGITS.replace("image_size: 16, ", "")
    text += (
        "  teacher: {type: teacher, model: resnet8, weights: {checkpoint: digits12.safetensors, train: {epochs: 1}}}\n"
    )
    Runner(load_config(write_config(text)), tmp_path / "run").run()
    from kdpipe.models.weights import read_weights_metadata

    meta = read_weights_metadata(tmp_path / "run" / "teacher" / "model.safetensors")
    assert meta["image_size"] == "12" and meta["mean"] == "0.250000" and meta["std"] == "0.500000"

    _hub_folder(tmp_path / "hub", "resnet10t", (0.5, 0.4, 0.3))  # timm's resnet10t: 176 px
    both = text + "  student:\n    type: distill\n    student: resnet10t\n    student_weights: {checkpoint: hub}\n"
    both += "    method: {name: kd}\n    train: {epochs: 1}\n"
    with pytest.raises(
        ConfigError, match=r"expect different input sizes: .*teacher resnet8\) 12 px; .*resnet10t\) 176 px"
    ):
        Runner(
            load_config(write_config(both.replace("kind: digits,", "kind: digits, normalize: dataset,"), "b.yaml")),
            tmp_path / "b",
        )
