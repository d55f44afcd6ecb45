"""stages.yaml validation: every bad input gives one ConfigError line with file:line, the field and a fix."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

import kdpipe.stages  # noqa: F401  (registers stage types and methods)
from kdpipe.config import apply_override, get_pipeline_model, load_config
from kdpipe.errors import ConfigError, DataError
from kdpipe.pipeline.runner import preflight
from tests.conftest import TINY

TEACHER_WEIGHTS = "weights: {train: {epochs: 2, batch_size: 32, lr: 0.05}}"
DATA = "data: {kind: synthetic, num_classes: 4, num_samples: 128, image_size: 8, augment: none, val_fraction: 0.0}"
DISTILL_TRAIN = "train: {epochs: 2, batch_size: 32, lr: 0.05}\n  verify"


def error_of(path: Path, *overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        preflight(load_config(path, overrides))
    return str(info.value)


def test_tiny_config_is_valid(write_config: Callable[..., Path]) -> None:
    loaded = load_config(write_config())
    nodes = preflight(loaded)
    assert [n.name for n in nodes] == ["teacher", "distill", "verify", "card"]
    assert [n.needs for n in nodes] == [(), ("teacher",), ("distill",), ("verify",)]
    assert nodes[3].upstream == ("teacher", "distill", "verify")
    # defaults are filled in
    assert loaded.config.stages["distill"].method.kd_weight == 0.9
    assert loaded.config.stages["distill"].train.optimizer == "sgd"


def test_unknown_key_names_line_and_suggests(write_config: Callable[..., Path]) -> None:
    path = write_config(TINY.replace("min_top1: 0.0", "min_top1: 0.0\n    min_topp1: 0.5"))
    msg = error_of(path)
    assert f"{path}:19: stages.verify.min_topp1: unknown key 'min_topp1' (did you mean 'min_top1'?)" in msg


def test_misspelled_stage_type(write_config: Callable[..., Path]) -> None:
    msg = error_of(write_config(TINY.replace("type: distill", "type: distil")))
    assert "stages.distill: unknown stage type 'distil' (did you mean 'distill'?)" in msg
    assert ":11:" in msg


def test_misspelled_method(write_config: Callable[..., Path]) -> None:
    msg = error_of(write_config(TINY.replace("name: kd,", "name: kdd,")))
    assert "unknown method 'kdd' (did you mean 'kd'?)" in msg
    assert ":14:" in msg


def test_unknown_method_parameter(write_config: Callable[..., Path]) -> None:
    msg = error_of(write_config(TINY.replace("temperature: 4.0", "temprature: 4.0")))
    assert "unknown key 'temprature' (did you mean 'temperature'?)" in msg


@pytest.mark.parametrize("epochs", ["0", "-3"])
def test_non_positive_epochs(write_config: Callable[..., Path], epochs: str) -> None:
    msg = error_of(
        write_config(
            TINY.replace(
                "train: {epochs: 2, batch_size: 32, lr: 0.05}\n  verify",
                f"train: {{epochs: {epochs}, batch_size: 32, lr: 0.05}}\n  verify",
            )
        )
    )
    assert "stages.distill.train.epochs: Input should be greater than 0" in msg
    assert ":15:" in msg


def test_unknown_model_name(write_config: Callable[..., Path]) -> None:
    msg = error_of(write_config(TINY.replace("student: resnet8", "student: resnet8x5")))
    assert "stages.distill.student" in msg and "resnet8x5" in msg and "did you mean" in msg


def test_missing_data_path_is_a_data_error(write_config: Callable[..., Path], tmp_path: Path) -> None:
    path = write_config(TINY.replace(DATA, "data: {kind: imagefolder, root: nowhere/cifar.tar.gz}"))
    with pytest.raises(DataError) as info:
        preflight(load_config(path))
    assert f"{path}:5: data.root: {tmp_path / 'nowhere/cifar.tar.gz'} does not exist" in str(info.value)


def test_data_root_required(write_config: Callable[..., Path]) -> None:
    msg = error_of(write_config(TINY.replace("kind: synthetic,", "kind: imagefolder,")))
    assert "data.root is required for kind 'imagefolder'" in msg


def test_yaml_syntax_error(write_config: Callable[..., Path]) -> None:
    msg = error_of(write_config(TINY.replace("type: verify", "type: [verify")))
    assert "YAML syntax error" in msg and ":18:" in msg


@pytest.mark.parametrize("text", ["", "   \n# only a comment\n"])
def test_empty_file(write_config: Callable[..., Path], text: str) -> None:
    assert "the file is empty" in error_of(write_config(text))


def test_top_level_not_a_mapping(write_config: Callable[..., Path]) -> None:
    assert "top level must be a mapping" in error_of(write_config("- a\n- b\n"))


def test_duplicate_key(write_config: Callable[..., Path]) -> None:
    msg = error_of(write_config(TINY.replace("seed: 0", "seed: 0\nseed: 1")))
    assert "duplicate key 'seed'" in msg and ":4:" in msg


def test_yaml_tags_are_not_executed(write_config: Callable[..., Path]) -> None:
    msg = error_of(write_config(TINY.replace("name: tiny", "name: !!python/object/apply:os.system ['echo pwned']")))
    assert "YAML syntax error" in msg and "python/object/apply" in msg


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")


def test_needs_unknown_and_later_stage(write_config: Callable[..., Path]) -> None:
    msg = error_of(write_config(TINY.replace("    min_top1: 0.0", "    min_top1: 0.0\n    needs: [distil]")))
    assert "no stage named 'distil' (did you mean 'distill'?)" in msg
    msg = error_of(write_config(TINY.replace("    min_top1: 0.0", "    min_top1: 0.0\n    needs: [card]")))
    assert "'card' is defined after 'verify'" in msg


def test_distill_without_teacher_is_rejected_for_kd_but_fine_for_ce(write_config: Callable[..., Path]) -> None:
    no_teacher = TINY.replace(f"  teacher:\n    type: teacher\n    model: resnet8\n    {TEACHER_WEIGHTS}\n", "")
    msg = error_of(write_config(no_teacher))
    assert "stage 'distill' (distill) needs a 'teacher' before it" in msg
    ce = no_teacher.replace("method: {name: kd, temperature: 4.0}", "method: {name: ce}")
    preflight(load_config(write_config(ce)))


def test_teacher_weights_source_required(write_config: Callable[..., Path]) -> None:
    msg = error_of(write_config(TINY.replace(TEACHER_WEIGHTS, "weights: {}")))
    assert "say where the weights come from" in msg


def test_teacher_checkpoint_must_exist(write_config: Callable[..., Path]) -> None:
    msg = error_of(
        write_config(
            TINY.replace(
                "weights: {train: {epochs: 2, batch_size: 32, lr: 0.05}}", "weights: {checkpoint: t.safetensors}"
            )
        )
    )
    assert "stages.teacher.weights.checkpoint: file not found" in msg


def test_set_overrides(write_config: Callable[..., Path]) -> None:
    loaded = load_config(
        write_config(), ["stages.distill.train.epochs=7", "seed=3", "stages.distill.method.temperature=2"]
    )
    assert loaded.config.stages["distill"].train.epochs == 7
    assert loaded.config.seed == 3
    assert loaded.config.stages["distill"].method.temperature == 2.0
    msg = error_of(write_config(), "stages.distill.train.epochs=zero")
    assert "stages.distill.train.epochs" in msg


def test_set_override_syntax() -> None:
    with pytest.raises(ConfigError, match=r"expected key\.path=value"):
        apply_override({}, "seed")
    data: dict = {"a": 1}
    with pytest.raises(ConfigError, match="is a value, not a mapping"):
        apply_override(data, "a.b=2")


def test_json_schema_covers_stages_and_methods() -> None:
    schema = json.dumps(get_pipeline_model().model_json_schema())
    for name in ("TeacherConfig", "DistillConfig", "VerifyConfig", "ModelCardConfig", "KDParams", "CEParams"):
        assert name in schema


def test_error_paths_are_the_files_own_and_lookalikes_are_suggested(write_config: Callable[..., Path]) -> None:
    """A field inside a stage or a method is named as the file spells it (pasteable into --set), without the stage
    type or method name pydantic puts into its locations; ``min_topl`` (an l for a 1) suggests min_top1."""
    text = TINY.replace("method: {name: kd,", "method: {name: kd, temperatur: 3,").replace("min_top1:", "min_topl:")
    with pytest.raises(ConfigError) as err:
        load_config(write_config(text))
    msg = err.value.message
    assert "stages.distill.method.temperatur: unknown key 'temperatur' (did you mean 'temperature'?)" in msg
    assert "stages.verify.min_topl: unknown key 'min_topl' (did you mean 'min_top1'?)" in msg
    assert ".distill.distill." not in msg and ".verify.verify." not in msg and ".kd." not in msg
