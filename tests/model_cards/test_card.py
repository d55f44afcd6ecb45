"""Model card: huggingface_hub loads it, every result round-trips through model-index, card.json matches."""

from __future__ import annotations

import dataclasses
import json
import socket
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results

from kdpipe.errors import StageError
from kdpipe.model_cards import (
    CardFacts,
    ModelResult,
    card_to_json,
    create_eval_results,
    get_metric_key,
    get_metric_type,
    get_metrics_by_role,
    render_card,
    write_card,
)

RESOLVED_YAML = """\
version: 1
name: cifar100-r32x4-r8x4-kd
seed: 0
data:
  kind: cifar100
  root: data/cifar100
  image_size: 32
stages:
  distill:
    type: distill
    student: resnet8x4
    method: {name: kd, temperature: 4.0, alpha: 0.9}
"""


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection (e.g. a Hub download) fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def make_facts(**overrides: object) -> CardFacts:
    """Realistic facts of a CIFAR-100 resnet32x4 -> resnet8x4 KD run with an ONNX export."""
    facts = CardFacts(
        name="cifar100-r32x4-r8x4-kd",
        student=ModelResult("student", "resnet8x4", {"top1": 0.7512, "top5": 0.9301}, params=1_233_236),
        teacher=ModelResult("teacher", "resnet32x4", {"top1": 0.7902, "top5": 0.9455}, params=7_433_860),
        extra_results=[ModelResult("onnx", "resnet8x4.onnx", {"top1": 0.7511, "top5": 0.9301}, params=1_233_236)],
        method={"name": "kd", "temperature": 4.0, "alpha": 0.9},
        dataset={
            "kind": "cifar100",
            "name": "CIFAR-100",
            "classes": [f"class_{i}" for i in range(100)],
            "splits": {"train": 45000, "val": 5000, "test": 10000},
            "image_size": 32,
            "mean": [0.5071, 0.4865, 0.4409],
            "std": [0.2673, 0.2564, 0.2762],
        },
        train={"epochs": 240, "batch_size": 64, "lr": 0.05, "schedule": {"name": "step", "milestones": [150, 180]}},
        gates=[
            {"name": "min_top1", "threshold": 0.74, "value": 0.7512, "passed": True},
            {"name": "max_drop_vs_teacher", "threshold": 0.06, "value": 0.039, "passed": True},
        ],
        environment={"python": "3.11.7", "torch": "2.4.0", "device": "cuda:0 (NVIDIA H100)", "git_sha": "0123abcd"},
        resolved_config_yaml=RESOLVED_YAML,
        base_model="resnet32x4",
        extra_sections={"Latency": "| backend | batch | p50 ms |\n| --- | --- | --- |\n| torch | 1 | 1.21 |"},
    )
    return dataclasses.replace(facts, **overrides)


def ce_facts() -> CardFacts:
    """A plain cross-entropy student on digits: no teacher, no base model."""
    return make_facts(
        name="digits-ce",
        teacher=None,
        extra_results=[],
        base_model=None,
        method={"name": "ce"},
        dataset={
            "kind": "digits",
            "name": "digits",
            "classes": list(range(10)),
            "splits": {"train": 1437, "test": 360},
        },
        gates=[{"name": "min_top1", "threshold": 0.9, "value": 0.95, "passed": True}],
    )


def expected_by_role(facts: CardFacts) -> dict[str, dict[str, float]]:
    return {r.role: dict(r.metrics) for r in facts.all_results()}


def front_matter(readme: str) -> dict:
    _, block, _ = readme.split("---\n", 2)
    return yaml.safe_load(block)


def test_written_card_loads_with_huggingface_hub(tmp_path: Path) -> None:
    facts = make_facts()
    paths = write_card(tmp_path / "card", facts)
    assert paths == {"readme": tmp_path / "card" / "README.md", "json": tmp_path / "card" / "card.json"}
    card = ModelCard.load(paths["readme"])
    data = card.data.to_dict()
    assert data["base_model"] == "resnet32x4"
    assert data["license"] == "apache-2.0"
    assert data["library_name"] == "timm"
    assert data["pipeline_tag"] == "image-classification"
    assert data["datasets"] == ["uoft-cs/cifar100"]
    assert set(data["tags"]) >= {"knowledge-distillation", "image-classification", "kdpipe", "kd"}
    assert data["model-index"][0]["name"] == facts.name
    assert card.data.model_name == facts.name
    assert "# cifar100-r32x4-r8x4-kd" in card.text
    # No temp files are left beside the card.
    assert sorted(p.name for p in (tmp_path / "card").iterdir()) == ["README.md", "card.json"]


def test_every_result_round_trips_through_model_index(tmp_path: Path) -> None:
    facts = make_facts()
    card = ModelCard.load(write_card(tmp_path, facts)["readme"])
    loaded = card.data.eval_results
    assert len(loaded) == sum(len(r.metrics) for r in facts.all_results()) == 6
    assert get_metrics_by_role(loaded) == expected_by_role(facts)
    # Field for field, nothing is lost (order may change: model-index groups by task and dataset).
    key = lambda r: (r.metric_config, r.metric_type)  # noqa: E731
    assert sorted(loaded, key=key) == sorted(create_eval_results(facts), key=key)
    teacher_top1 = next(r for r in loaded if r.metric_config == "teacher" and r.metric_type == "accuracy")
    assert teacher_top1.metric_name == "top-1 accuracy (teacher resnet32x4)"
    student_top1 = next(r for r in loaded if r.metric_config == "student" and r.metric_type == "accuracy")
    assert student_top1.metric_name == "top-1 accuracy"
    assert {r.task_type for r in loaded} == {"image-classification"}
    assert {(r.dataset_type, r.dataset_name, r.dataset_split) for r in loaded} == {
        ("uoft-cs/cifar100", "CIFAR-100", "test")
    }


def test_round_trip_survives_huggingface_hub_rewriting_the_card() -> None:
    """ModelCardData re-dumps the metadata on save; results must survive a second trip."""
    facts = make_facts()
    again = ModelCard(str(ModelCard(render_card(facts))))
    assert get_metrics_by_role(again.data.eval_results) == expected_by_role(facts)


def test_results_on_different_splits_round_trip() -> None:
    teacher = ModelResult("teacher", "resnet32x4", {"top1": 0.80}, params=7_433_860, split="val")
    facts = make_facts(teacher=teacher)
    card = ModelCard(render_card(facts))
    assert len(front_matter(render_card(facts))["model-index"][0]["results"]) == 2  # one group per split
    assert get_metrics_by_role(card.data.eval_results) == expected_by_role(facts)
    assert {r.metric_config: r.dataset_split for r in card.data.eval_results} == {
        "student": "test",
        "teacher": "val",
        "onnx": "test",
    }


def test_model_index_passes_huggingface_hub_parser() -> None:
    facts = make_facts()
    model_index = front_matter(render_card(facts))["model-index"]
    assert len(model_index) == 1  # one model per card: the student
    name, results = model_index_to_eval_results(model_index)
    assert name == facts.name
    assert len(results) == 6


def test_card_without_teacher_has_no_base_model(tmp_path: Path) -> None:
    facts = ce_facts()
    card = ModelCard.load(write_card(tmp_path, facts)["readme"])
    data = card.data.to_dict()
    assert "base_model" not in data
    assert "datasets" not in data  # digits has no Hub dataset id
    assert "ce" in data["tags"]
    assert get_metrics_by_role(card.data.eval_results) == {"student": {"top1": 0.7512, "top5": 0.9301}}
    assert {r.dataset_type for r in card.data.eval_results} == {"digits"}
    assert "without a teacher" in card.text
    assert "No teacher (plain training)" in card.text
    assert "fewer parameters" not in card.text


def test_failed_gate_is_shown_as_failed() -> None:
    gates = [
        {"name": "min_top1", "threshold": 0.74, "value": 0.7512, "passed": True},
        {"name": "max_drop_vs_teacher", "threshold": 0.03, "value": 0.039, "passed": False},
    ]
    readme = render_card(make_facts(gates=gates))
    assert "| min_top1 | 0.74 | 0.7512 | passed |" in readme
    assert "| max_drop_vs_teacher | 0.03 | 0.039 | **FAILED** |" in readme
    assert "1 of 2 gates failed." in readme
    assert "**Failed verification gates: max_drop_vs_teacher.**" in readme
    assert "All gates passed." in render_card(make_facts())


def test_card_json_matches_the_facts(tmp_path: Path) -> None:
    facts = make_facts()
    path = write_card(tmp_path, facts)["json"]
    text = path.read_text(encoding="utf-8")
    loaded = json.loads(text)
    assert loaded == card_to_json(facts) == json.loads(json.dumps(dataclasses.asdict(facts)))
    assert loaded["student"]["metrics"] == {"top1": 0.7512, "top5": 0.9301}
    assert loaded["teacher"]["params"] == 7_433_860
    assert text == json.dumps(loaded, sort_keys=True, indent=2) + "\n"  # sorted keys, indent 2


def test_readme_golden_sections() -> None:
    readme = render_card(make_facts())
    body = readme.split("---\n", 2)[2]
    assert f"```yaml\n{RESOLVED_YAML}```" in body
    assert "```bash\nkdpipe run stages.yaml\n```" in body
    assert "| role | model | split | top-1 accuracy | top-5 accuracy | params |" in body
    assert "| student | `resnet8x4` | test | 75.12% | 93.01% | 1.23M |" in body
    assert "| teacher | `resnet32x4` | test | 79.02% | 94.55% | 7.43M |" in body
    assert "| onnx | `resnet8x4.onnx` | test | 75.11% | 93.01% | 1.23M |" in body
    assert "| `temperature` | 4.0 |" in body
    assert "| `schedule.milestones` | [150, 180] |" in body
    assert "| test | 10000 |" in body
    assert "| `git_sha` | 0123abcd |" in body
    assert "| torch | 1 | 1.21 |" in body
    assert "6.0× fewer parameters" in body
    assert "-3.90 percentage points" in body
    titles = [line for line in body.splitlines() if line.startswith("## ")]
    assert titles == [
        "## Results",
        "## Method and hyperparameters",
        "## Data and splits",
        "## Verification gates",
        "## Latency",
        "## Environment",
        "## How to reproduce",
    ]


def test_yaml_with_backticks_keeps_its_fence() -> None:
    config = "name: x\n# a comment with ``` inside\n"
    readme = render_card(make_facts(resolved_config_yaml=config))
    assert f"````yaml\n{config}````" in readme


def test_numpy_metric_values_are_written_as_plain_floats() -> None:
    np = pytest.importorskip("numpy")
    student = ModelResult("student", "resnet8x4", {"top1": np.float32(0.75), "top5": np.float64(0.93)})
    facts = make_facts(student=student)
    readme = render_card(facts)
    assert "!!python" not in readme
    assert get_metrics_by_role(ModelCard(readme).data.eval_results)["student"] == {"top1": 0.75, "top5": 0.93}
    assert json.dumps(card_to_json(facts))


@pytest.mark.parametrize("key", ["top1", "top5", "top10", "loss"])
def test_metric_key_round_trips(key: str) -> None:
    metric_type, _ = get_metric_type(key)
    assert get_metric_key(metric_type) == key


def test_duplicate_roles_are_rejected() -> None:
    onnx = ModelResult("onnx", "resnet8x4.onnx", {"top1": 0.75})
    with pytest.raises(StageError, match="unique"):
        render_card(make_facts(extra_results=[onnx, onnx]))


def test_student_without_metrics_is_rejected() -> None:
    with pytest.raises(StageError, match="no metrics"):
        render_card(make_facts(student=ModelResult("student", "resnet8x4", {})))


def test_metric_key_that_would_not_round_trip_is_rejected() -> None:
    student = ModelResult("student", "resnet8x4", {"top1": 0.75, "accuracy": 0.75})
    with pytest.raises(StageError, match="read back"):
        render_card(make_facts(student=student))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "0.9", True])
def test_non_finite_or_non_numeric_metric_is_rejected(bad: object) -> None:
    student = ModelResult("student", "resnet8x4", {"top1": bad})  # type: ignore[dict-item]
    with pytest.raises(StageError, match="finite number"):
        render_card(make_facts(student=student))


def test_write_card_overwrites_an_existing_card(tmp_path: Path) -> None:
    write_card(tmp_path, make_facts())
    paths = write_card(tmp_path, ce_facts())
    assert ModelCard.load(paths["readme"]).data.model_name == "digits-ce"
    assert json.loads(paths["json"].read_text(encoding="utf-8"))["name"] == "digits-ce"


def test_unwritable_directory_raises_stage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "card"
    blocker.write_text("not a directory", encoding="utf-8")
    with pytest.raises(StageError, match="cannot write the model card"):
        write_card(blocker, make_facts())


def test_reconstructed_methods_say_so_in_the_card() -> None:
    """DPK and IAKD are reconstructions (no official code, the paper only partly readable): the card of a run says
    so where the method is named; a method that follows its paper gets no such line."""
    import kdpipe.distill.methods  # noqa: F401  (registers the methods)
    from kdpipe.registry import METHODS

    provenance = {entry.name: entry.obj.provenance for entry in METHODS}
    assert {name for name, text in provenance.items() if text} == {"dpk", "iakd"}
    assert all("reconstruction" in provenance[name] for name in ("dpk", "iakd"))
    card = render_card(make_facts(method={"name": "iakd"}, method_provenance=provenance["iakd"]))
    method_section = card.split("## Method and hyperparameters", 1)[1].split("\n## ", 1)[0]
    assert "**Provenance: `iakd` is a reconstruction" in method_section
    assert "Provenance" not in render_card(make_facts())
