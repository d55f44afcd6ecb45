"""The model card's Markdown body, section by section, from ``CardFacts``: plain string building, no template
file to ship or keep in sync."""

from __future__ import annotations

import json
import math
import re
from numbers import Real
from typing import Any

from kdpipe.markdown import table
from kdpipe.model_cards.facts import TOP_K, CardFacts, get_metric_type, to_jsonable
from kdpipe.overrides import flatten

_MAX_CLASSES_SHOWN = 20


def body_sections(facts: CardFacts) -> list[str]:
    """The card's sections after the front matter, in order; ``facts.extra_sections`` come after the gates."""
    return [
        f"# {facts.name}\n\n{_summary(facts)}",
        _results_section(facts),
        _method_section(facts),
        _data_section(facts),
        _gates_section(facts),
        *(f"## {title}\n\n{text.strip()}" for title, text in facts.extra_sections.items()),
        _environment_section(facts),
        _reproduce_section(facts),
    ]


def _fmt_metric(key: str, value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, Real) and not isinstance(value, bool):
        if not math.isfinite(value):
            return str(value)
        if TOP_K.fullmatch(key) or "acc" in key:
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
        return json.dumps(to_jsonable(value))
    return str(value)


def _key_value_table(d: dict[str, Any], header: tuple[str, str] = ("setting", "value")) -> str:
    flat = flatten(d)
    if not flat:
        return "_none recorded_"
    return table(list(header), [[f"`{k}`", _fmt_value(v)] for k, v in flat.items()])


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
    keys = sorted({k for r in results for k in r.metrics}, key=lambda k: (not TOP_K.fullmatch(k), len(k), k))
    header = ["role", "model", "split", *(get_metric_type(k)[1] for k in keys), "params"]
    rows = [
        [r.role, f"`{r.model_name}`", r.split, *(_fmt_metric(k, r.metrics.get(k)) for k in keys), _fmt_params(r.params)]
        for r in results
    ]
    note = "Accuracies are measured by kdpipe on the split shown; they are self-reported, not verified by the Hub."
    return f"## Results\n\n{table(header, rows)}\n\n{note}"


def _method_section(facts: CardFacts) -> str:
    method = dict(facts.method)
    name = method.pop("name", "unknown")
    teacher = f"Teacher: `{facts.teacher.model_name}`" if facts.teacher else "No teacher (plain training)"
    provenance = f"**Provenance: `{name}` is {facts.method_provenance}.**\n\n" if facts.method_provenance else ""
    return (
        f"## Method and hyperparameters\n\nMethod: `{name}`. {teacher}; student: `{facts.student.model_name}`.\n\n"
        f"{provenance}"
        f"{_key_value_table(method, ('hyperparameter', 'value'))}\n\n### Training\n\n{_key_value_table(facts.train)}"
    )


def _data_section(facts: CardFacts) -> str:
    dataset = facts.dataset
    lines = [f"- kind: `{dataset.get('kind', 'unknown')}`", f"- name: {dataset.get('name', dataset.get('kind', '—'))}"]
    if dataset.get("image_size"):
        lines.append(f"- image size: {dataset['image_size']}×{dataset['image_size']} pixels")
        crop, interpolation = dataset.get("crop_pct"), dataset.get("interpolation")
        if crop is not None and crop < 1.0:
            side = math.floor(dataset["image_size"] / crop)
            lines.append(
                f"- evaluation resize: short side to {side} px ({interpolation or 'bilinear'}), then the centre "
                f"{dataset['image_size']}×{dataset['image_size']} (crop_pct {crop:g})"
            )
        elif interpolation is not None and interpolation != "bilinear":
            lines.append(f"- resize filter: {interpolation}")
    classes = list(dataset.get("classes") or [])
    if classes:
        shown = ", ".join(f"`{c}`" for c in classes[:_MAX_CLASSES_SHOWN])
        more = f", … ({len(classes)} in all)" if len(classes) > _MAX_CLASSES_SHOWN else ""
        lines.append(f"- classes ({len(classes)}): {shown}{more}")
    for key in ("mean", "std"):
        if dataset.get(key) is not None:
            lines.append(f"- normalization {key}: {_fmt_value(dataset[key])}")
    splits = dataset.get("splits") or {}
    counts = table(["split", "images"], [[str(k), str(v)] for k, v in splits.items()]) if splits else ""
    return "## Data and splits\n\n" + "\n".join(lines) + (f"\n\n{counts}" if counts else "")


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
    return f"## Verification gates\n\n{table(['gate', 'threshold', 'value', 'result'], rows)}\n\n{verdict_line}"


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
