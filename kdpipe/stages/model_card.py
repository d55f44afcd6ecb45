"""``model_card`` stage: a Hugging Face model card (README.md + card.json) from what the upstream stages
recorded: teacher and student results, the method, the data, the gates, the environment and the resolved config."""

from __future__ import annotations

from typing import Any, Literal

import yaml

from kdpipe.config import StageConfig
from kdpipe.model_cards import CardFacts, ModelResult, write_card
from kdpipe.registry import STAGES
from kdpipe.stages.base import Stage, StageRecord, StageResult


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
        model_name=record.result["info"]["model_name"],
        metrics={k: float(metrics[k]) for k in ("top1", "top5") if k in metrics},
        params=int(metrics["params"]) if "params" in metrics else None,
    )


@STAGES.register("model_card", summary="Hugging Face model card: results, method, data, gates, environment")
class ModelCardStage(Stage):
    Config = ModelCardConfig
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
        resolved = yaml.safe_dump(ctx.pipeline.model_dump(mode="json"), sort_keys=False)
        facts = CardFacts(
            name=ctx.pipeline.name,
            student=_result("student", student),
            teacher=_result("teacher", teacher) if teacher else None,
            extra_results=[],
            method=distill_cfg.method.model_dump(mode="json"),
            dataset={**splits.describe(), "kind": ctx.pipeline.data.kind},
            train=distill_cfg.train.model_dump(mode="json"),
            gates=list(verify.result["info"]["gates"]) if verify else [],
            environment=ctx.environment,
            resolved_config_yaml=resolved,
            base_model=cfg.base_model or (teacher.result["info"]["model_name"] if teacher else None),
            license=cfg.license,
        )
        paths = write_card(ctx.dir, facts)
        artifacts = {key: str(path.relative_to(ctx.dir)) for key, path in paths.items()}
        return StageResult(artifacts=artifacts, summary=f"model card {ctx.dir / 'README.md'}")
