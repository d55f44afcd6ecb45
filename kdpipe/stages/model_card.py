"""``model_card`` stage: a Hugging Face model card (README.md + card.json) from what the upstream stages
recorded: teacher and student results, the method, the data, the gates, the environment and the resolved config."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

import yaml

from kdpipe.bench import BenchCell, markdown_table
from kdpipe.config import StageConfig
from kdpipe.errors import StageError
from kdpipe.markdown import table
from kdpipe.model_cards import CardFacts, ModelResult, write_card
from kdpipe.registry import METHODS, STAGES
from kdpipe.stages.base import Stage, StageContext, StageRecord, StageResult
from kdpipe.stages.benchmark import copy_plot
from kdpipe.stages.outputs import (
    BenchmarkOutput,
    CardOutput,
    ExportOutput,
    GatesOutput,
    ModelOutput,
    ServeOutput,
    SweepOutput,
)

PLOT = "latency.png"
SWEEP_PLOT = "pareto.png"


class ModelCardConfig(StageConfig):
    """Write card/README.md (Hugging Face model card) and card/card.json."""

    type: Literal["model_card"]
    license: str = "apache-2.0"
    """SPDX-style license id for the card's metadata."""
    base_model: str | None = None
    """Hub id of the teacher for the card's base_model (default: the teacher's timm name)."""


def _result(role: str, record: StageRecord) -> ModelResult:
    metrics = record.metrics
    return ModelResult(
        role=role,
        model_name=record.output(ModelOutput).model_name,
        metrics={k: float(metrics[k]) for k in ("top1", "top5") if k in metrics},
        params=int(metrics["params"]) if "params" in metrics else None,
    )


def _export_result(record: StageRecord) -> ModelResult:
    info, metrics = record.output(ExportOutput), record.metrics
    return ModelResult(
        role=record.name,
        model_name=f"{info.model_name} ({info.format})",
        metrics={"top1": float(metrics["top1"]), "top1_agreement": float(metrics["top1_agreement"])},
    )


def _network_results(student: StageRecord) -> dict[str, ModelResult]:
    """Every network an online method trained (``metrics.networks`` of the distill stage), by name."""
    return {
        name: ModelResult(
            role="teacher" if name == "teacher" else f"online {name}",
            model_name=str(net["model"]),
            metrics={k: float(net[k]) for k in ("top1", "top5") if k in net},
            params=int(net["params"]) if "params" in net else None,
        )
        for name, net in student.metrics.get("networks", {}).items()
        if not net.get("deployed")
    }


def _online_section(student: StageRecord) -> str:
    networks = student.metrics.get("networks", {})
    rows = [
        [name, net["model"], f"{net['top1']:.4f}", f"{net['params']:,}", "yes" if net.get("deployed") else "no"]
        for name, net in networks.items()
    ]
    return (
        f"The method trained {len(networks)} networks together; only `{student.metrics.get('deployed_network')}` "
        "is exported. The others' weights are in the distill stage's `networks/` folder.\n\n"
        + table(["network", "model", "test top-1", "params", "deployed"], rows, right=(2, 3))
    )


def _weights_section(records: list[tuple[str, Any]]) -> str:
    """Where the teacher and the student started from, for runs that used pretrained weights ("" otherwise)."""
    rows = []
    for role, record in records:
        weights = record.output(ModelOutput).weights if record is not None else None
        if not weights or not weights.get("pretrained"):
            continue
        head = weights.get("head")
        adapted = (
            f"re-initialised ({', '.join(head['layers'])}: {head['file_classes']} -> {head['classes']} classes)"
            if head
            else "kept"
        )
        rows.append([role, record.output(ModelOutput).model_name, weights["source"], adapted])
    if not rows:
        return ""
    return "Pretrained starting points; a class head of another size is re-initialised (timm's rule).\n\n" + table(
        ["role", "model", "weights", "class head"], rows
    )


def _qad_section(records: list[StageRecord]) -> str:
    """fp32 vs post-training quantization vs quantization-aware distillation, on the test split, per qad stage."""
    rows = []
    for r in records:
        q = r.output(ExportOutput).qad or {}
        fp32, ptq, qad = q["fp32_top1"], q["ptq_top1"], float(r.metrics["top1"])
        lost = fp32 - ptq
        recovered = f"{100 * (qad - ptq) / lost:.0f} %" if lost > 0 else "n/a (PTQ lost nothing)"
        method = q["method"]["name"]
        rows.append(
            [
                f"{r.name} ({q['int8_layout']} layout)",
                f"{fp32:.4f}",
                f"{ptq:.4f} ({ptq - fp32:+.4f})",
                f"{qad:.4f} ({qad - fp32:+.4f})",
                recovered,
                f"{method}, {q['epochs']} epochs",
            ]
        )
    return (
        "The int8 student fine-tuned under fake quantization with the teacher (QAD) against post-training "
        "quantization (PTQ) of the same fp32 student into the same int8 layout, calibrated on the same images; "
        "test top-1, change from fp32 in brackets.\n\n"
        + table(["stage", "fp32", "PTQ int8", "QAD int8", "PTQ loss recovered", "fine-tuning"], rows, right=(1, 2, 3))
    )


def _sweep_section(sweep: StageRecord, card_dir: Path) -> str:
    """How this student was chosen: the sweep's table of candidates (the frontier marked) and its Pareto plot."""
    out = sweep.output(SweepOutput)
    text = (
        f"This model is candidate `{out.selected}`, chosen by sweep `{sweep.name}` among {len(out.rows)} candidates "
        f"(students x methods x precisions, each distilled from the same teacher, exported and benchmarked): "
        + ("; ".join(g["message"] for g in out.gates) or "the most accurate, with no latency budget")
        + ".\n\n"
        + sweep.artifact("table").read_text(encoding="utf-8")
    )
    try:
        plot = sweep.artifact("plot")
    except StageError:
        return text
    shutil.copyfile(plot, card_dir / SWEEP_PLOT)
    return text + f"\n![accuracy against latency]({SWEEP_PLOT})"


def _sections(ctx: StageContext) -> dict[str, str]:
    """Parity, latency and serving sections from the export, benchmark and serve stages upstream."""
    sections: dict[str, str] = {}
    sweep = ctx.find("sweep")
    if sweep is not None and sweep.output(SweepOutput).selected is not None:
        sections["Student selection"] = _sweep_section(sweep, ctx.dir)
    exports = ctx.find_all("export")
    if exports:
        header = ["export", "file", "size", "top-1", "torch top-1", "agreement", "max abs logit diff", "gates"]
        rows = []
        for r in exports:
            m, out = r.metrics, r.output(ExportOutput)
            gates = ", ".join(f"{k} {v}" for k, v in out.parity["tolerances"].items() if v is not None)
            rows.append(
                [
                    f"{r.name} ({out.format})",
                    f"`{r.artifact('model').name}`",
                    f"{m['size_bytes'] / 1e6:.2f} MB",
                    f"{m['top1']:.4f}",
                    f"{m['torch_top1']:.4f}",
                    f"{m['top1_agreement']:.4f}",
                    f"{m['max_abs_diff']:.2e}",
                    f"{gates}: passed",
                ]
            )
        samples = exports[-1].output(ExportOutput).parity["num_samples"]
        notes = []
        for r in exports:
            mixed = r.output(ExportOutput).mixed_precision
            if mixed and mixed.get("float_layers"):
                lat = mixed.get("p50_ms_batch1", {})
                notes.append(
                    f"`{r.name}` keeps {len(mixed['float_layers'])} layer(s) in float "
                    f"({', '.join(f'`{n}`' for n in mixed['float_layers'])}): held-out agreement with fp32 "
                    f"{mixed['agreement_int8']:.4f} -> {mixed['agreement_mixed']:.4f}, batch-1 p50 "
                    f"{lat.get('int8', float('nan')):.3f} -> {lat.get('mixed', float('nan')):.3f} ms."
                )
        sections["Exported models and parity"] = (
            f"Each export is checked against the PyTorch student on {samples} test images.\n\n"
            + table(header, rows, right=range(2, 7))
            + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "")
        )
    qad = [r for r in exports if r.output(ExportOutput).qad]
    if qad:
        sections["Quantization-aware distillation"] = _qad_section(qad)
    bench = ctx.find("benchmark")
    if bench is not None:
        bench_cells = [BenchCell.from_dict(c) for c in bench.output(BenchmarkOutput).cells]
        env = ctx.environment
        text = (
            f"Measured on {env.get('device')} ({env.get('torch_threads')} CPU threads), torch {env.get('torch')}.\n\n"
        )
        text += markdown_table(bench_cells)
        if copy_plot(bench, ctx.dir / PLOT):
            text += f"\n\n![latency vs batch size]({PLOT})"
        sections["Latency"] = text
    serve = ctx.find("serve")
    if serve is not None:
        served = serve.output(ServeOutput)
        sections["Serving"] = (
            f"A Triton model repository is in `{serve.dir.name}/{served.repository}` (model `{served.model_name}`, "
            f"platform `{served.platform}`, max_batch_size {serve.metrics['max_batch_size']}, dynamic batching):\n\n"
            f"```bash\ntritonserver --model-repository {serve.dir.name}/{served.repository}\n```"
        )
    return sections


@STAGES.register("model_card", summary="Hugging Face model card: results, method, data, gates, environment")
class ModelCardStage(Stage):
    Config = ModelCardConfig
    Output = CardOutput
    provides = frozenset({"card"})
    config: ModelCardConfig

    @classmethod
    def requires(cls, config: Any) -> tuple[str, ...]:
        return ("student",)

    def run(self) -> StageResult:
        ctx, cfg = self.ctx, self.config
        splits = ctx.data()
        student = ctx.require("student")
        teacher = ctx.find("teacher")
        verify = ctx.find("verify")
        distill_cfg = ctx.pipeline.stages[student.name]
        resolved = yaml.safe_dump(ctx.loaded.written.config.model_dump(mode="json"), sort_keys=False)
        facts = CardFacts(
            name=ctx.pipeline.name,
            student=_result("student", student),
            teacher=_result("teacher", teacher) if teacher else None,
            extra_results=[],
            method=distill_cfg.method.model_dump(mode="json"),
            method_provenance=METHODS.get(distill_cfg.method.name).provenance,
            dataset={**splits.describe(), "kind": ctx.pipeline.data.kind},
            train=distill_cfg.train.model_dump(mode="json"),
            gates=list(verify.output(GatesOutput).gates) if verify else [],
            environment=ctx.environment,
            resolved_config_yaml=resolved,
            base_model=cfg.base_model or (teacher.output(ModelOutput).model_name if teacher else None),
            license=cfg.license,
        )
        facts.extra_results = [_export_result(r) for r in ctx.find_all("export")]
        facts.extra_sections = _sections(ctx)
        weights = _weights_section([("teacher", teacher), ("student", student)])
        if weights:
            facts.extra_sections = {"Starting weights": weights, **facts.extra_sections}
        online = _network_results(student)
        if online:
            # The teacher stage gave an architecture (or a starting point); what the card reports is the network
            # the online method trained.
            if "teacher" in online:
                facts.teacher = online.pop("teacher")
            facts.extra_results = [*online.values(), *facts.extra_results]
            facts.extra_sections = {"Online training": _online_section(student), **facts.extra_sections}
        paths = write_card(ctx.dir, facts)
        artifacts = {key: str(path.relative_to(ctx.dir)) for key, path in paths.items()}
        for key, name in (("plot", PLOT), ("sweep_plot", SWEEP_PLOT)):
            if (ctx.dir / name).exists():
                artifacts[key] = name
        return StageResult(artifacts=artifacts, summary=f"model card {ctx.dir / 'README.md'}")
