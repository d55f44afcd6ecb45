"""Config overrides from the environment (KDPIPE_SET_<PATH>, ``__`` between keys, lower-cased) and ``--set``: the
order they apply in, key matching, and errors that name the variable or argument they came from."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

import kdpipe.stages  # noqa: F401
from kdpipe.config import load_config
from kdpipe.errors import ConfigError
from kdpipe.overrides import Override, apply_override, from_env, parse_set
from tests.conftest import TINY


def test_from_env_reads_only_the_prefix_sorted_and_lower_cased() -> None:
    env = {
        "PATH": "/bin",
        "KDPIPE_OUT": "/runs",
        "KDPIPE_SET_STAGES__DISTILL__TRAIN__BATCH_SIZE": "16",
        "KDPIPE_SET_SEED": "3",
    }
    got = from_env(env)
    assert [o.source for o in got] == ["KDPIPE_SET_SEED", "KDPIPE_SET_STAGES__DISTILL__TRAIN__BATCH_SIZE"]
    assert got[1].parts == ("stages", "distill", "train", "batch_size") and got[1].value == "16" and got[1].fold_case


@pytest.mark.parametrize(
    "name", ["KDPIPE_SET_", "KDPIPE_SET_STAGES____EPOCHS", "KDPIPE_SET_SEED__", "KDPIPE_SET___SEED"]
)
def test_malformed_variable_names(name: str) -> None:
    with pytest.raises(ConfigError, match=f"^{name}: not a key path"):
        from_env({name: "1"})


def test_env_applies_before_set_and_set_wins(write_config: Callable[..., Path]) -> None:
    cfg = write_config()
    env = from_env({"KDPIPE_SET_SEED": "5", "KDPIPE_SET_STAGES__DISTILL__TRAIN__EPOCHS": "3"})
    loaded = load_config(cfg, [*env, "seed=7"])
    assert loaded.config.seed == 7
    assert loaded.config.stages["distill"].train.epochs == 3
    assert load_config(cfg, env).config.seed == 5


def test_env_keys_match_the_files_spelling(write_config: Callable[..., Path]) -> None:
    cfg = write_config(TINY.replace("  distill:\n", "  Distill-Fast:\n"))
    loaded = load_config(cfg, from_env({"KDPIPE_SET_STAGES__DISTILL_FAST__TRAIN__EPOCHS": "4"}))
    assert loaded.config.stages["Distill-Fast"].train.epochs == 4
    assert "distill_fast" not in loaded.config.stages
    # --set spells keys exactly: the same path there is a new (unknown) stage
    with pytest.raises(ConfigError):
        load_config(cfg, ["stages.distill_fast.train.epochs=4"])


def test_errors_name_the_variable(write_config: Callable[..., Path]) -> None:
    cfg = write_config()
    with pytest.raises(ConfigError) as info:
        load_config(cfg, from_env({"KDPIPE_SET_STAGES__DISTILL__TRAIN__EPOCHS": "zero"}))
    assert "stages.distill.train.epochs" in info.value.message
    assert info.value.message.endswith("(set by KDPIPE_SET_STAGES__DISTILL__TRAIN__EPOCHS)")
    with pytest.raises(ConfigError, match=r"unknown key 'epoch' \(did you mean 'epochs'\?\).*KDPIPE_SET_STAGES__X"):
        load_config(cfg, [Override(("stages", "distill", "train", "epoch"), "1", "KDPIPE_SET_STAGES__X", True)])
    with pytest.raises(ConfigError, match=r"^KDPIPE_SET_SEED__X: seed is a value, not a mapping"):
        load_config(cfg, from_env({"KDPIPE_SET_SEED__X": "1"}))
    with pytest.raises(ConfigError) as info:
        load_config(cfg, from_env({"KDPIPE_SET_SEED": "[1"}))
    assert info.value.message == (
        "KDPIPE_SET_SEED: the value '[1' is not valid YAML: expected ',' or ']', but got '<stream end>' at character 3"
    )  # one line: PyYAML's multi-line excerpt of '<unicode string>' told nothing the value does not
    # an error the override did not cause names no override
    bad = write_config(TINY.replace("seed: 0", "seed: x"), name="bad.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(bad, from_env({"KDPIPE_SET_STAGES__DISTILL__TRAIN__EPOCHS": "3"}))
    assert "seed" in info.value.message and "set by" not in info.value.message


def test_set_arguments_keep_their_messages() -> None:
    with pytest.raises(ConfigError, match=r"^--set 'seed': expected key\.path=value"):
        parse_set("seed")
    with pytest.raises(ConfigError, match=r"^--set '=1': the key is empty"):
        parse_set("=1")
    data = {"a": {"b": 1}}
    assert apply_override(data, "a.c=[1, 2]") == ("a", "c") and data == {"a": {"b": 1, "c": [1, 2]}}


def test_command_line_reports_a_bad_variable_in_one_line(write_config: Callable[..., Path]) -> None:
    from kdpipe.cli import validate

    env = {"KDPIPE_SET_STAGES____EPOCHS": "1"}
    result = CliRunner().invoke(validate, [str(write_config())], env=env)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: KDPIPE_SET_STAGES____EPOCHS: not a key path") and not result.stdout
    ok = CliRunner().invoke(validate, [str(write_config())], env={"KDPIPE_SET_STAGES__DISTILL__TRAIN__EPOCHS": "3"})
    assert ok.exit_code == 0 and ": ok" in ok.stdout


def test_set_reaches_into_lists_by_index() -> None:
    data = {"stages": {"sweep": {"methods": [{"name": "kd"}, {"name": "dkd", "beta": 8.0}], "students": ["a", "b"]}}}
    assert apply_override(data, "stages.sweep.methods.1.beta=2.0") == ("stages", "sweep", "methods", "1", "beta")
    apply_override(data, "stages.sweep.students.0=resnet8")
    assert data["stages"]["sweep"]["methods"][1]["beta"] == 2.0 and data["stages"]["sweep"]["students"] == [
        "resnet8",
        "b",
    ]
    with pytest.raises(ConfigError, match=r"stages\.sweep\.methods is a list of 2; '5' is not an index \(0 to 1\)"):
        apply_override(data, "stages.sweep.methods.5.beta=1")
    with pytest.raises(ConfigError, match=r"'kd' is not an index"):
        apply_override(data, "stages.sweep.methods.kd.beta=1")
