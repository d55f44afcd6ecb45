"""``serve`` stage: a Triton Inference Server model repository for the nearest upstream export:
``model_repository/<name>/config.pbtxt`` (batch-less dims, max_batch_size from the export, dynamic batching),
``<name>/1/model.onnx`` (or ``model.plan``) and ``labels.txt`` for Triton's classification extension."""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import Field, PositiveInt

from kdpipe.config import StageConfig
from kdpipe.errors import StageError
from kdpipe.exports.formats import get_format
from kdpipe.model_cards.triton import TritonModelSpec, spec_from_onnx, write_triton_repository
from kdpipe.model_cards.triton_check import validate_repository
from kdpipe.registry import STAGES
from kdpipe.stages.base import Stage, StageResult
from kdpipe.stages.outputs import ExportOutput, ServeOutput

REPOSITORY = "model_repository"


class ServeConfig(StageConfig):
    """Write a Triton model repository for an exported model."""

    type: Literal["serve"]
    model_name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")
    """Triton model name (default: the run name)."""
    max_batch_size: PositiveInt | None = None
    """Default: the export's max_batch_size."""
    preferred_batch_sizes: list[PositiveInt] = Field(default_factory=list)
    max_queue_delay_us: int = Field(100, ge=0)
    """How long Triton's dynamic batcher waits to fill a batch, in microseconds."""
    instance_kind: Literal["auto", "cpu", "gpu"] = "auto"
    instance_count: PositiveInt = 1


@STAGES.register("serve", summary="Triton model repository (config.pbtxt, model, labels) for an export")
class ServeStage(Stage):
    Config = ServeConfig
    Output = ServeOutput
    provides = frozenset({"serve"})
    config: ServeConfig

    @classmethod
    def requires(cls, config: Any) -> tuple[str, ...]:
        return ("export",)

    def run(self) -> StageResult:
        ctx, cfg = self.ctx, self.config
        record = ctx.require("export")
        info = record.output(ExportOutput)
        model_file = record.artifact("model")
        name = cfg.model_name or re.sub(r"[^A-Za-z0-9_.-]", "_", ctx.pipeline.name)
        if info.dynamic_batch:
            export_max = info.max_batch_size
            max_batch = cfg.max_batch_size or export_max
            if max_batch > export_max:
                raise StageError(
                    f"serve: max_batch_size {max_batch} exceeds export {record.name!r}'s max_batch_size {export_max}",
                    hint=f"raise stages.{record.name}.max_batch_size or lower stages.{ctx.name}.max_batch_size",
                )
        elif cfg.max_batch_size:
            raise StageError(
                f"serve: export {record.name!r} has a static batch dimension, so Triton cannot batch it",
                hint=f"remove stages.{ctx.name}.max_batch_size, or export with dynamic_batch: true",
            )
        else:
            max_batch = 0  # Triton's convention for a model whose dims include the batch
        splits = ctx.data()
        common: dict[str, Any] = {
            "labels": tuple(splits.classes),
            # What a client applies before sending pixels (the same values the ONNX metadata holds).
            "parameters": {
                "preprocessing.mean": json.dumps([round(v, 6) for v in splits.mean]),
                "preprocessing.std": json.dumps([round(v, 6) for v in splits.std]),
                "preprocessing.image_size": str(splits.image_size),
                "preprocessing.crop_pct": f"{splits.crop_pct:g}",
                "preprocessing.interpolation": splits.interpolation,
                "preprocessing.normalization": splits.normalization,
            },
            "preferred_batch_sizes": tuple(cfg.preferred_batch_sizes),
            "max_queue_delay_us": cfg.max_queue_delay_us,
            "instance_kind": cfg.instance_kind,
            "instance_count": cfg.instance_count,
        }
        platform = get_format(info.format).triton_platform
        if platform is None:
            raise StageError(
                f"serve: export {record.name!r} is in format {info.format!r}, which Triton cannot serve",
                hint="serve an onnx, onnx-fp16, onnx-int8 or tensorrt export (kdpipe list formats)",
            )
        if platform == "onnxruntime_onnx":  # the graph itself says its names and dims
            spec = spec_from_onnx(model_file, name=name, max_batch_size=max_batch, **common)
        else:
            spec = TritonModelSpec(
                name=name,
                platform=platform,
                model_file=model_file,
                input_name=info.input_name,
                input_dims=tuple(info.input_shape),
                output_name=info.output_name,
                output_dims=(info.num_classes,),
                max_batch_size=max_batch,
                **common,
            )
        repo = ctx.dir / REPOSITORY
        paths = write_triton_repository(repo, spec)
        problems = validate_repository(repo)
        if problems:
            raise StageError("serve: the written Triton repository is inconsistent: " + "; ".join(problems))
        artifacts = {key: str(p.relative_to(ctx.dir)) for key, p in paths.items()}
        return StageResult(
            metrics={"max_batch_size": max_batch},
            artifacts=artifacts,
            summary=f"Triton repository {repo} (model {name}, {spec.platform}, max_batch_size {max_batch})",
            info={"repository": REPOSITORY, "model_name": name, "platform": spec.platform, "export_stage": record.name},
        )
