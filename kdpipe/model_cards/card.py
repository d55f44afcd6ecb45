"""The Hugging Face model card of a run: the facts a run gathers, rendered to ``README.md`` and ``card.json``.

The YAML front matter is built with huggingface_hub's own ``ModelCardData`` and ``EvalResult``, and the text
is parsed back with ``ModelCard`` before it is returned, so a card that the Hub's parser would reject is never
written. The facts are ``facts.CardFacts``; the Markdown body is built in ``sections``.

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
from numbers import Real
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from kdpipe.errors import StageError
from kdpipe.fileio import WriteError, atomic_open
from kdpipe.model_cards.facts import (
    STUDENT_ROLE,
    CardFacts,
    get_metric_key,
    get_metric_type,
    to_jsonable,
)
from kdpipe.model_cards.sections import body_sections

logger = logging.getLogger(__name__)

TASK_TYPE = "image-classification"
TASK_NAME = "Image Classification"

# Dataset kinds whose data is a public Hub dataset; only these get a ``datasets:`` entry in the front matter
# (digits, imagefolder and synthetic data have no Hub id). A ``hub_id`` key in CardFacts.dataset overrides.
_HUB_DATASETS = {"cifar10": "uoft-cs/cifar10", "cifar100": "uoft-cs/cifar100"}


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
    sections = body_sections(facts)
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
    return to_jsonable(dataclasses.asdict(facts))


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
