"""The Hugging Face model card of a run: the facts a run gathers, rendered to ``README.md`` and ``card.json``.

The YAML front matter is built with huggingface_hub's own ``ModelCardData`` and ``EvalResult``, and the text
is parsed back with ``ModelCard`` before it is returned, so a card that the Hub's parser would reject is never
written. The Markdown body is plain string building: no template file to ship or keep in sync.

How teacher, student and exported results share one ``model-index``:

- A model-index names one model per card: ``model_index_to_eval_results`` keeps only the last entry's name and
  ``ModelCardData`` writes every result back under its single ``model_name``. The card's model is the student,
  named after the run (``CardFacts.name``).
- Every (model result, metric) pair is one ``EvalResult`` in that single entry, and its ``metric_config`` holds
  the result's role (``"student"``, ``"teacher"``, ``"onnx"``, ...). ``metric_config`` is stored per metric, so
  it survives ``eval_results_to_model_index`` grouping results by (task, dataset, config, split, revision) and
  comes back unchanged from ``model_index_to_eval_results``. ``source`` cannot do this job: it is stored once
  per group, so only the first result's source would survive, and it requires a URL we do not have.
- ``metric_name`` is for people reading the Hub's results widget: "top-1 accuracy" for the student,
  "top-1 accuracy (teacher resnet32x4)" for the others, so a teacher number never reads as the student's.
- ``get_metrics_by_role`` turns loaded ``EvalResult`` objects back into ``{role: {metric key: value}}``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from kdpipe.errors import StageError
from kdpipe.fileio import WriteError, atomic_open
from kdpipe.overrides import flatten

logger = logging.getLogger(__name__)

TASK_TYPE = "image-classification"
TASK_NAME = "Image Classification"
STUDENT_ROLE = "student"

# Dataset kinds whose data is a public Hub dataset; only these get a ``datasets:`` entry in the front matter
# (digits, imagefolder and synthetic data have no Hub id). A ``hub_id`` key in CardFacts.dataset overrides.
_HUB_DATASETS = {"cifar10": "uoft-cs/cifar10", "cifar100": "uoft-cs/cifar100"}
_TOP_K = re.compile(r"top(\d+)")
_TOP_K_TYPE = re.compile(r"top_(\d+)_accuracy")
_MAX_CLASSES_SHOWN = 20


@dataclass
class ModelResult:
    """One evaluated model: the teacher, the student, or an exported format of the student."""

    role: str
    """"teacher" | "student" | "onnx" | ...; unique within a card, it tags the model's results in model-index."""
    model_name: str
    """Architecture or artifact name, e.g. "resnet8x4"."""
    metrics: dict[str, float]
    """Metric key -> value, e.g. {"top1": 0.95, "top5": 0.99}; accuracies are fractions in [0, 1]."""
    params: int | None = None
    """Number of parameters; None when unknown (e.g. a TensorRT engine)."""
    split: str = "test"
    """Dataset split the metrics were measured on."""


@dataclass
class CardFacts:
    """Everything a model card says, gathered by the pipeline. ``card.json`` is this object as JSON."""

    name: str
    """Run name; the model's name in model-index."""
    student: ModelResult
    teacher: ModelResult | None
    extra_results: list[ModelResult]
    """Exported formats and other networks (can be empty)."""
    method: dict[str, Any]
    """KD method and its hyperparameters, e.g. {"name": "kd", "temperature": 4.0}."""
    dataset: dict[str, Any]
    """kind, name, classes, splits ({"train": n, ...}), image_size, mean, std; optional hub_id."""
    train: dict[str, Any]
    """Training settings (epochs, lr, ...)."""
    gates: list[dict[str, Any]]
    """Verification gates: [{"name": ..., "threshold": ..., "value": ..., "passed": bool}, ...]."""
    environment: dict[str, Any]
    """Package versions, device, git SHA, kdpipe version."""
    resolved_config_yaml: str
    """The resolved stages.yaml text, shown so the run can be reproduced."""
    base_model: str | None = None
    """Teacher id (Hub id or local name); defaults to the teacher's model_name when a teacher exists."""
    license: str = "apache-2.0"
    extra_sections: dict[str, str] = field(default_factory=dict)
    """Section title -> Markdown, added by later stages (latency table, parity)."""
    library_name: str = "timm"

    def all_results(self) -> list[ModelResult]:
        """Return student, teacher (when present) and extra results, in that order."""
        return [self.student, *([self.teacher] if self.teacher else []), *self.extra_results]


def get_metric_type(key: str) -> tuple[str, str]:
    """Map a metric key to its model-index ``(type, pretty name)``: top1 -> accuracy, top5 -> top_5_accuracy."""
    match = _TOP_K.fullmatch(key)
    if match is None:
        return key, key
    k = int(match.group(1))
    return ("accuracy" if k == 1 else f"top_{k}_accuracy"), f"top-{k} accuracy"


def get_metric_key(metric_type: str) -> str:
    """Inverse of ``get_metric_type``: the metric key a model-index metric type came from."""
    if metric_type == "accuracy":
        return "top1"
    match = _TOP_K_TYPE.fullmatch(metric_type)
    return f"top{match.group(1)}" if match else metric_type


def create_eval_results(facts: CardFacts) -> list[EvalResult]:
    """Build one ``EvalResult`` per (model result, metric), the role in ``metric_config`` (see module docstring)."""
    _check_facts(facts)
    dataset_type, dataset_name = _dataset_ids(facts.dataset)
    results = []
    for result in facts.all_results():
        for key, value in result.metrics.items():
            metric_type, pretty = get_metric_type(key)
            if result.role != STUDENT_ROLE:
                pretty = f"{pretty} ({result.role} {result.model_name})"
            results.append(
                EvalResult(
                    task_type=TASK_TYPE,
                    task_name=TASK_NAME,
                    dataset_type=dataset_type,
                    dataset_name=dataset_name,
                    dataset_split=result.split,
                    metric_type=metric_type,
                    metric_name=pretty,
                    metric_value=float(value),
                    metric_config=result.role,
                )
            )
    return results


def get_metrics_by_role(eval_results: list[EvalResult]) -> dict[str, dict[str, float]]:
    """Read ``{role: {metric key: value}}`` back from a card's ``eval_results`` (``card.data.eval_results``).

    A result without ``metric_config`` (a card not written by kdpipe) is counted as the student's.
    """
    by_role: dict[str, dict[str, float]] = {}
    for result in eval_results:
        by_role.setdefault(result.metric_config or STUDENT_ROLE, {})[get_metric_key(result.metric_type)] = (
            result.metric_value
        )
    return by_role


def create_card_data(facts: CardFacts) -> ModelCardData:
    """Build the front matter: library, license, tags, base_model, datasets and the model-index results."""
    eval_results = create_eval_results(facts)
    base_model = facts.base_model or (facts.teacher.model_name if facts.teacher else None)
    dataset_kind = str(facts.dataset.get("kind", ""))
    hub_dataset = facts.dataset.get("hub_id") or _HUB_DATASETS.get(dataset_kind)
    method_name = str(facts.method.get("name", "unknown"))
    return ModelCardData(
        base_model=base_model,
        datasets=[hub_dataset] if hub_dataset else None,
        library_name=facts.library_name,
        license=facts.license,
        metrics=["accuracy"],
        pipeline_tag=TASK_TYPE,
        tags=["knowledge-distillation", TASK_TYPE, "kdpipe", method_name],
        model_name=facts.name,
        eval_results=eval_results,
    )


def render_card(facts: CardFacts) -> str:
    """Return the full README.md text: YAML front matter and the Markdown body.

    Raises StageError when the facts are inconsistent or huggingface_hub cannot parse the result back.
    """
    card_data = create_card_data(facts)
    sections = [
        f"# {facts.name}\n\n{_summary(facts)}",
        _results_section(facts),
        _method_section(facts),
        _data_section(facts),
        _gates_section(facts),
        *(f"## {title}\n\n{text.strip()}" for title, text in facts.extra_sections.items()),
        _environment_section(facts),
        _reproduce_section(facts),
    ]
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"
    # Parse the text back the way the Hub's client does: a card whose results do not survive is a bug here.
    try:
        loaded = get_metrics_by_role(ModelCard(content).data.get("eval_results", []))
    except ValueError as error:
        raise StageError(
            f"model card for run {facts.name!r} does not parse with huggingface_hub: {error}",
            hint="this is a kdpipe bug; please report it with the run's card/card.json",
        ) from error
    expected = {r.role: {k: float(v) for k, v in r.metrics.items()} for r in facts.all_results() if r.metrics}
    if loaded != expected:
        raise StageError(
            f"model card for run {facts.name!r}: model-index results read back as {loaded}, expected {expected}",
            hint="this is a kdpipe bug; please report it with the run's card/card.json",
        )
    return content


def card_to_json(facts: CardFacts) -> dict[str, Any]:
    """Return the facts as a JSON-ready dict (non-finite floats become null: JSON has no NaN)."""
    return _to_jsonable(dataclasses.asdict(facts))


def write_card(out_dir: Path, facts: CardFacts) -> dict[str, Path]:
    """Write ``README.md`` and ``card.json`` into ``out_dir`` atomically; return ``{"readme": ..., "json": ...}``.

    Both texts are built before anything is written, so a failure leaves no half-written card.
    """
    out_dir = Path(out_dir)
    readme = render_card(facts)
    card_json = json.dumps(card_to_json(facts), sort_keys=True, indent=2, allow_nan=False) + "\n"
    paths = {"readme": out_dir / "README.md", "json": out_dir / "card.json"}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for key, text in (("readme", readme), ("json", card_json)):
            # Encoded here rather than in text mode, so the files end lines with "\n" on every platform.
            with atomic_open(paths[key], "wb") as f:
                f.write(text.encode("utf-8"))
    except (OSError, WriteError) as error:
        # fileio's WriteError wraps the OSError; the message names the OS's own reason, as it always has.
        reason = error.__cause__ if isinstance(error, WriteError) and error.__cause__ else error
        raise StageError(
            f"cannot write the model card to {out_dir}: {reason}",
            hint="check that the run directory is writable and the disk is not full",
        ) from error
    logger.info("wrote model card %s", paths["readme"])
    return paths


def _check_facts(facts: CardFacts) -> None:
    if not facts.name:
        raise StageError("model card: CardFacts.name is empty", hint="set the run name in stages.yaml (name: ...)")
    roles = [r.role for r in facts.all_results()]
    duplicates = sorted({r for r in roles if roles.count(r) > 1})
    if duplicates or not all(roles):
        raise StageError(
            f"model card for run {facts.name!r}: result roles must be non-empty and unique, got {roles}",
            hint="give each exported format its own role, e.g. 'onnx' and 'onnx-int8'",
        )
    if not facts.student.metrics:
        raise StageError(
            f"model card for run {facts.name!r}: the student has no metrics; model-index needs at least one",
            hint="run the distill (or verify) stage that evaluates the student before the model_card stage",
        )
    if facts.student.role != STUDENT_ROLE:
        raise StageError(f"model card: the student's role must be {STUDENT_ROLE!r}, got {facts.student.role!r}")
    for result in facts.all_results():
        for key, value in result.metrics.items():
            if get_metric_key(get_metric_type(key)[0]) != key:
                raise StageError(
                    f"model card: {result.role} metric key {key!r} would read back from model-index as "
                    f"{get_metric_key(get_metric_type(key)[0])!r}",
                    hint="name top-k accuracy 'top1', 'top5', ...; 'top1' is written as model-index type 'accuracy'",
                )
            if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
                raise StageError(
                    f"model card: {result.role} metric {key!r} = {value!r} is not a finite number",
                    hint="model-index values must be finite numbers; check the stage that evaluated this model",
                )


def _dataset_ids(dataset: dict[str, Any]) -> tuple[str, str]:
    kind = str(dataset.get("kind") or dataset.get("name") or "unknown")
    dataset_type = str(dataset.get("hub_id") or _HUB_DATASETS.get(kind, kind))
    return dataset_type, str(dataset.get("name") or kind)


def _to_jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, Real):
        value = float(obj)
        return value if math.isfinite(value) else None
    if hasattr(obj, "item"):  # numpy / torch scalars
        return _to_jsonable(obj.item())
    return str(obj)  # Path, enums, ...


# --- Markdown body ---------------------------------------------------------------------------------------------


def _fmt_metric(key: str, value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, Real) and not isinstance(value, bool):
        if not math.isfinite(value):
            return str(value)
        if _TOP_K.fullmatch(key) or "acc" in key:
            return f"{100 * float(value):.2f}%"
        return f"{float(value):.4g}"
    return str(value)


def _fmt_params(params: int | None) -> str:
    if params is None:
        return "—"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if params >= scale:
            return f"{params / scale:.2f}{suffix}"
    return str(params)


def _fmt_value(value: Any) -> str:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(_to_jsonable(value))
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _key_value_table(d: dict[str, Any], header: tuple[str, str] = ("setting", "value")) -> str:
    flat = flatten(d)
    if not flat:
        return "_none recorded_"
    return _table(list(header), [[f"`{k}`", _fmt_value(v)] for k, v in flat.items()])


def _summary(facts: CardFacts) -> str:
    student, teacher = facts.student, facts.teacher
    method = facts.method.get("name", "unknown")
    data = facts.dataset.get("name") or facts.dataset.get("kind", "an unnamed dataset")
    size = f" ({_fmt_params(student.params)} parameters)" if student.params else ""
    if teacher is None:
        lines = [
            f"A `{student.model_name}` image classifier{size} trained on {data} with `{method}`, without a teacher."
        ]
    else:
        t_size = f" ({_fmt_params(teacher.params)} parameters)" if teacher.params else ""
        lines = [
            f"A `{student.model_name}` student{size} distilled from the `{teacher.model_name}` teacher{t_size} "
            f"on {data} with the `{method}` knowledge-distillation method."
        ]
        if teacher.params and student.params:
            lines.append(f"The student has {teacher.params / student.params:.1f}× fewer parameters than the teacher.")
    if "top1" in student.metrics:
        top1 = f"Student top-1 accuracy on {student.split}: {_fmt_metric('top1', student.metrics['top1'])}"
        if teacher is not None and "top1" in teacher.metrics:
            gap = 100 * (student.metrics["top1"] - teacher.metrics["top1"])
            top1 += f" (teacher {_fmt_metric('top1', teacher.metrics['top1'])}, {gap:+.2f} percentage points)"
        lines.append(top1 + ".")
    failed = [g.get("name", "?") for g in facts.gates if g.get("passed") is False]
    if failed:
        lines.append(f"**Failed verification gates: {', '.join(map(str, failed))}.**")
    return " ".join(lines)


def _results_section(facts: CardFacts) -> str:
    results = facts.all_results()
    keys = sorted({k for r in results for k in r.metrics}, key=lambda k: (not _TOP_K.fullmatch(k), len(k), k))
    header = ["role", "model", "split", *(get_metric_type(k)[1] for k in keys), "params"]
    rows = [
        [r.role, f"`{r.model_name}`", r.split, *(_fmt_metric(k, r.metrics.get(k)) for k in keys), _fmt_params(r.params)]
        for r in results
    ]
    note = "Accuracies are measured by kdpipe on the split shown; they are self-reported, not verified by the Hub."
    return f"## Results\n\n{_table(header, rows)}\n\n{note}"


def _method_section(facts: CardFacts) -> str:
    method = dict(facts.method)
    name = method.pop("name", "unknown")
    teacher = f"Teacher: `{facts.teacher.model_name}`" if facts.teacher else "No teacher (plain training)"
    return (
        f"## Method and hyperparameters\n\nMethod: `{name}`. {teacher}; student: `{facts.student.model_name}`.\n\n"
        f"{_key_value_table(method, ('hyperparameter', 'value'))}\n\n### Training\n\n{_key_value_table(facts.train)}"
    )


def _data_section(facts: CardFacts) -> str:
    dataset = facts.dataset
    lines = [f"- kind: `{dataset.get('kind', 'unknown')}`", f"- name: {dataset.get('name', dataset.get('kind', '—'))}"]
    if dataset.get("image_size"):
        lines.append(f"- image size: {dataset['image_size']}×{dataset['image_size']} pixels")
    classes = list(dataset.get("classes") or [])
    if classes:
        shown = ", ".join(f"`{c}`" for c in classes[:_MAX_CLASSES_SHOWN])
        more = f", … ({len(classes)} in all)" if len(classes) > _MAX_CLASSES_SHOWN else ""
        lines.append(f"- classes ({len(classes)}): {shown}{more}")
    for key in ("mean", "std"):
        if dataset.get(key) is not None:
            lines.append(f"- normalization {key}: {_fmt_value(dataset[key])}")
    splits = dataset.get("splits") or {}
    table = _table(["split", "images"], [[str(k), str(v)] for k, v in splits.items()]) if splits else ""
    return "## Data and splits\n\n" + "\n".join(lines) + (f"\n\n{table}" if table else "")


def _gates_section(facts: CardFacts) -> str:
    if not facts.gates:
        return "## Verification gates\n\nNo verification gates were configured."
    rows = []
    for gate in facts.gates:
        passed = gate.get("passed")
        verdict = "passed" if passed is True else "**FAILED**" if passed is False else "not evaluated"
        value = gate.get("value")
        rows.append([str(gate.get("name", "?")), _fmt_value(gate.get("threshold", "—")), _fmt_value(value), verdict])
    n_failed = sum(1 for g in facts.gates if g.get("passed") is False)
    verdict_line = f"{n_failed} of {len(facts.gates)} gates failed." if n_failed else "All gates passed."
    return f"## Verification gates\n\n{_table(['gate', 'threshold', 'value', 'result'], rows)}\n\n{verdict_line}"


def _environment_section(facts: CardFacts) -> str:
    return f"## Environment\n\n{_key_value_table(facts.environment, ('item', 'value'))}"


def _reproduce_section(facts: CardFacts) -> str:
    text = facts.resolved_config_yaml.rstrip("\n")
    # A fence longer than any backtick run inside the YAML keeps the block intact.
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return (
        "## How to reproduce\n\nSave the resolved configuration below as `stages.yaml` and run:\n\n"
        f"```bash\nkdpipe run stages.yaml\n```\n\n{fence}yaml\n{text}\n{fence}"
    )
