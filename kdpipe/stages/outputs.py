"""Typed stage outputs: what a stage leaves for the stages after it, in its result.json ``info``.

Each stage type declares its ``Output`` model; the engine validates a stage's ``info`` against it when the stage
finishes (so a stage cannot record a malformed output), and a downstream stage reads an upstream one as a typed
object, ``record.output(ExportOutput).format``, never by string keys. A model may carry more than its declared
fields (a stage's extra facts: training history, the engine stamp of a TensorRT export); what others rely on is
declared here.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Output(BaseModel):
    """Base of every stage output: extra facts allowed, fields validated, frozen once read."""

    model_config = ConfigDict(extra="allow", frozen=True)


class ModelOutput(Output):
    """A stage that produced a network (teacher, distill): which architecture and its size."""

    model_name: str
    """The timm (or kdpipe) model name that rebuilds it."""
    params: int = Field(ge=0)
    weights: dict[str, Any] | None = None
    """Where its starting weights came from (source, pretrained, a re-initialised head), when pretrained."""


class GatesOutput(Output):
    """A stage that checked gates: every ``Gate.to_dict()`` it checked."""

    gates: list[dict[str, Any]]


class ExportOutput(GatesOutput):
    """An exported artifact, its interface and its parity against the PyTorch student."""

    model_name: str
    format: str
    """The registered export format (kdpipe list formats)."""
    source_stage: str
    input_name: str
    output_name: str
    input_shape: list[int]
    """``[C, H, W]`` of one input image."""
    num_classes: int
    dynamic_batch: bool
    max_batch_size: int
    opset: int
    simplified: bool
    parity: dict[str, Any]
    """The parity report (parity.json): measured values, tolerances, gates."""
    mixed_precision: dict[str, Any] | None = None
    """onnx-int8 with ``mixed_precision``: the layers kept in float, held-out agreements, batch-1 latencies."""
    qdq_graph: str | None = None
    """Artifact key of a signed symmetric QDQ graph (a qad stage's ModelOpt graph): what an int8 TensorRT export that
    needs this stage builds its engine from, instead of quantizing the fp32 student itself."""
    qad: dict[str, Any] | None = None
    """A qad stage's facts: fp32, post-training-quantization and QAD top-1, the method, the fine-tuning history."""


class SweepOutput(GatesOutput):
    """A sweep's choice among its candidates (``kdpipe.stages.sweep``)."""

    selected: str | None
    """The candidate deployed (``<student>-<method>/<precision>``), None when none was measured."""
    hides: list[str]
    """The member stages of the candidates not chosen: the engine keeps them from the stages after the sweep, which
    so find the chosen candidate's student, export and benchmark as in a run without a sweep."""
    rows: list[dict[str, Any]]
    """Every candidate's line of the report (params, top-1, agreement, latency, size, Pareto, status)."""
    frontier: list[str]


class BenchmarkOutput(Output):
    cells: list[dict[str, Any]]
    """One ``BenchCell`` dict per (model, backend, batch size)."""


class ServeOutput(Output):
    repository: str
    """The Triton model repository folder, relative to the stage folder."""
    model_name: str
    platform: str
    export_stage: str


class CardOutput(Output):
    """The model card stage records nothing later stages read."""
