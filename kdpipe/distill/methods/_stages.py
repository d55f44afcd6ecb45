"""Stage executors: a classifier run piecewise as stem | stage_1..stage_N | head, for stage-swapping methods (iakd).

``forward_intermediates`` can read a network's stage outputs but cannot restart it in the middle, so a method that
feeds one network's map into another network's stage needs each stage as a function of its own.
:func:`create_executor` builds one for

- kdpipe's CIFAR nets (``CifarNet``): the cuts their ``_stem`` / ``_tap_stages`` / ``_neck`` already declare;
- any timm model whose ``forward`` is ``forward_head(forward_features(x))`` and whose ``forward_features`` chains
  modules, the ``feature_info`` stage modules among them, on NCHW maps (ResNet, MobileNetV3, EfficientNet, ConvNeXt,
  RegNet, DenseNet, ...). The cut:

  - [our default] stages end at the ``feature_info`` modules, without the stride-2 stem level of a five-level
    pyramid (ResNet's ``act1``, RegNet's ``stem``, MobileNetV3's ``bn1`` or EfficientNet's ``blocks.0``;
    ``taps.stage_specs`` flags it): that level is the stem's output, not a stage;
  - stem = what ``forward_features`` runs before the first stage module; stage i = the modules after stage i−1's
    module up to and including stage i's; head = the rest of ``forward_features`` (EfficientNet's ``conv_head``/
    ``bn2``, ConvNeXt's ``norm_pre``, RegNet's ``final_conv``), then ``forward_head``. A ``feature_info`` module inside
    a container (``blocks.4``, ``stages.2``) cuts the container into its children.

  That this composition IS the model's forward is checked, not assumed: one dry forward (meta tensors work) records
  every top-level module or container child ``forward_features`` calls and requires a pure chain — the first call
  takes the input, every call takes exactly the tensor the previous call returned, unmodified in place (version
  counter), ``forward_features`` returns the last one and ``forward_head`` gets it. Any operation between modules
  (ViT's position embedding, a residual around a container) breaks the chain and the model is refused. The one case
  the check cannot see is code that runs only in train mode between modules: ResNet, MobileNetV3, EfficientNet,
  ConvNeXt and RegNet (timm 1.0.31) have none, and their tests compare train-mode outputs too.

Executors are plain objects, not modules: wrapping a frozen teacher in one registers none of its parameters.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kdpipe.distill.taps import stage_specs
from kdpipe.models._base import CifarNet

__all__ = ["Fn", "StageExecutor", "create_executor"]

Fn = Callable[[Tensor], Tensor]
DEFAULT_INPUT_SHAPE = (3, 224, 224)


@dataclass(frozen=True)
class StageExecutor:
    """A network run piecewise: ``head(stages[N-1](...stages[0](stem(x))))`` equals ``model(x)``."""

    family: str
    """``cifar`` or ``timm-<class name>`` (``timm-resnet``, ``timm-convnext``, ...)."""
    stem: Fn
    stages: tuple[Fn, ...]
    head: Fn
    reductions: tuple[int, ...]
    """Nominal stride of each stage's output (``feature_info``), non-decreasing; what stage pairing compares."""
    modules: tuple[tuple[str, ...], ...]
    """Dotted names of the modules run by the stem, each stage, and the head before ``forward_head`` (N + 2)."""

    def __call__(self, x: Tensor) -> Tensor:
        return self.head(self.features(x)[-1])

    def features(self, x: Tensor) -> list[Tensor]:
        """[stem output, stage_1 output, ..., stage_N output]: the inputs and outputs of every stage."""
        feats = [self.stem(x)]
        for stage in self.stages:
            feats.append(stage(feats[-1]))
        return feats

    def span(self, start: int, stop: int) -> Fn:
        """Stages ``start..stop-1`` run one after another."""
        return _chain(self.stages[start:stop])


def _chain(fns: Sequence[Callable[[Tensor], Tensor]]) -> Fn:
    def run(x: Tensor) -> Tensor:
        for fn in fns:
            x = fn(x)
        return x

    return run


def create_executor(model: nn.Module, input_shape: Sequence[int] | None = None) -> StageExecutor:
    """The stem | stages | head executor of ``model``; ``ValueError`` saying why when it cannot be cut.

    ``input_shape`` (C, H, W) is the dry forward's input for timm models: pass the real one when the model was built
    with another ``in_chans`` or needs a fixed size; None takes the model's pretrained config, else 3x224x224.
    """
    executor = _cifar_executor(model) if isinstance(model, CifarNet) else _timm_executor(model, input_shape)
    # Stage pairing walks both networks by increasing stride.
    if any(b < a for a, b in itertools.pairwise(executor.reductions)):
        raise ValueError(f"{type(model).__name__}'s stage strides {executor.reductions} are not non-decreasing")
    return executor


def _cifar_executor(model: CifarNet) -> StageExecutor:
    names = {id(m): n for n, m in model.named_modules()}
    stem, stages, neck = model._stem(), model._tap_stages(), model._neck()
    run_neck = _chain(neck)
    head: Fn = lambda h: model.forward_head(run_neck(h))  # noqa: E731
    return StageExecutor(
        family="cifar",
        stem=_chain(stem),
        stages=tuple(_chain(s) for s in stages),
        head=head,
        reductions=tuple(int(e["reduction"]) for e in model.feature_info),
        modules=tuple(tuple(names[id(m)] for m in group) for group in [stem, *stages, neck]),
    )


# --- timm models --------------------------------------------------------------------------------------------------


def _timm_executor(model: nn.Module, input_shape: Sequence[int] | None) -> StageExecutor:
    kind = type(model).__name__
    if not all(hasattr(model, a) for a in ("feature_info", "forward_features", "forward_head")):
        raise ValueError(
            f"{kind} is neither a kdpipe CIFAR net nor a timm model with feature_info, forward_features and "
            "forward_head"
        )
    if input_shape is None:
        cfg: Any = getattr(model, "pretrained_cfg", None) or {}
        input_shape = cfg.get("input_size", DEFAULT_INPUT_SHAPE)
    fmt = getattr(model, "output_fmt", "NCHW")
    if str(getattr(fmt, "value", fmt)) != "NCHW":
        raise ValueError(f"{kind} returns {fmt} stage maps; stage swapping needs NCHW maps")
    specs = [s for s in stage_specs(model) if not s.stem]
    stage_names = [s.module for s in specs]
    trunk = _trunk_candidates(model, stage_names)
    order, shapes = _trace_chain(model, trunk, tuple(input_shape))
    missing = [n for n in stage_names if n not in order]
    if missing:
        raise ValueError(f"{kind}.forward_features never runs the feature_info module(s) {missing} in its chain")
    cuts = [order.index(n) for n in stage_names]
    if cuts != sorted(set(cuts)):
        raise ValueError(f"{kind} runs its feature_info modules {stage_names} out of order")
    for spec, cut in zip(specs, cuts, strict=True):
        shape = shapes[cut]
        if len(shape) != 4 or shape[1] != spec.channels:
            raise ValueError(
                f"{kind} stage {spec.module!r} returns shape {tuple(shape)}, not an NCHW map of its {spec.channels} "
                "feature_info channels"
            )
    if cuts[0] > 0 and len(shapes[cuts[0] - 1]) != 4:
        raise ValueError(f"{kind}'s stem returns shape {tuple(shapes[cuts[0] - 1])}, not an NCHW map")

    starts = [cuts[0]] + [c + 1 for c in cuts[:-1]]
    groups = [order[: cuts[0]]] + [order[s : c + 1] for s, c in zip(starts, cuts, strict=True)]
    rest = order[cuts[-1] + 1 :]
    run_rest = _chain([trunk[n] for n in rest])
    forward_head: Callable[[Tensor], Tensor] = model.forward_head  # type: ignore[assignment]  # timm API
    head: Fn = lambda h: forward_head(run_rest(h))  # noqa: E731
    return StageExecutor(
        family=f"timm-{kind.lower()}",
        stem=_chain([trunk[n] for n in groups[0]]),
        stages=tuple(_chain([trunk[n] for n in g]) for g in groups[1:]),
        head=head,
        reductions=tuple(s.reduction for s in specs),
        modules=tuple(tuple(g) for g in [*groups, rest]),
    )


def _trunk_candidates(model: nn.Module, stage_names: Sequence[str]) -> dict[str, nn.Module]:
    """Top-level children, except that a container holding a stage module is replaced by its children (again if
    the stage module is deeper), so every stage module is a candidate and a cut can fall inside the container."""
    containers = {name.rsplit(".", i)[0] for name in stage_names for i in range(1, name.count(".") + 1)}
    out: dict[str, nn.Module] = {}

    def add(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if full in containers:
                add(f"{full}.", child)
            else:
                out[full] = child

    add("", model)
    return out


class _ChainTrace:
    """What one dry forward recorded: the calls forward_features made to candidate modules, and the first break of a
    pure chain (None while there is none)."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.shapes: list[tuple[int, ...]] = []
        self.inside = False
        self.last: Tensor | None = None
        self.version = 0
        self.broken: str | None = None
        self.features_out: Tensor | None = None
        self.head_out: Tensor | None = None

    def expect(self, x: Any, where: str) -> None:
        """Record a break unless ``x`` is the chain's last tensor, unmodified since."""
        if self.broken is not None:
            return
        prev = f"{self.order[-1]!r}" if self.order else "forward_features' input"
        if not isinstance(x, Tensor) or x is not self.last:
            self.broken = f"{where} is not what {prev} returned: an operation runs between them"
        elif x._version != self.version:
            self.broken = f"{where} is what {prev} returned, modified in place in between"

    def advance(self, y: Any, name: str) -> None:
        if not isinstance(y, Tensor):
            self.broken = self.broken or f"{name!r} returns a {type(y).__name__}, not a tensor"
            return
        self.last, self.version = y, y._version
        self.order.append(name)
        self.shapes.append(tuple(y.shape))


def _trace_chain(
    model: nn.Module, trunk: dict[str, nn.Module], input_shape: tuple[int, ...]
) -> tuple[list[str], list[tuple[int, ...]]]:
    """Names (in call order) and output shapes of the candidates ``forward_features`` chains; ``ValueError`` unless
    ``model(x)`` is exactly ``forward_head`` of that chain (see the module docstring)."""
    kind = type(model).__name__
    net: Any = model  # forward_features / forward_head: timm's API, not nn.Module's
    trace = _ChainTrace()
    handles = []
    for name, module in trunk.items():

        def pre(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], name: str = name) -> None:
            if trace.inside:
                if kwargs or len(args) != 1:
                    trace.broken = trace.broken or f"{name!r} is called with more than one input"
                elif name in trace.order:
                    trace.broken = trace.broken or f"{name!r} is called twice"
                else:
                    trace.expect(args[0], f"the input of {name!r}")

        def post(_: nn.Module, args: tuple[Any, ...], y: Any, name: str = name) -> None:
            if trace.inside:
                trace.advance(y, name)

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post))

    forward_features, forward_head = net.forward_features, net.forward_head

    def features(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        # ViT's forward passes attn_mask=None, is_causal=False: harmless; a real extra input is one a restart drops.
        if any(a is not None and a is not False for a in (*args, *kwargs.values())):
            trace.broken = trace.broken or "forward passes forward_features more than the image"
        trace.last, trace.version, trace.inside = x, x._version, True
        try:
            y = forward_features(x, *args, **kwargs)
        finally:
            trace.inside = False
        trace.expect(y, "the output of forward_features")
        trace.features_out = y
        return y

    def head(h: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        trace.expect(h, "the input of forward_head")
        out: Tensor = forward_head(h, *args, **kwargs)
        trace.head_out = out
        return out

    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    # Instance attributes shadow the methods for the one call; the model's own instance attributes (a patched
    # forward_features) come back afterwards, else the shadows are deleted.
    own: dict[str, Any] = {a: vars(model)[a] for a in ("forward_features", "forward_head") if a in vars(model)}
    net.forward_features, net.forward_head = features, head
    try:
        model.eval()
        with torch.inference_mode(False), torch.no_grad():
            out = model(torch.zeros(1, *input_shape, device=device))
    except Exception as exc:  # any failure of the dry forward means the model cannot be cut this way
        raise ValueError(f"{kind} failed a dry forward on a {tuple(input_shape)} input: {exc}") from exc
    finally:
        del net.forward_features, net.forward_head
        vars(model).update(own)
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if trace.features_out is None or out is not trace.head_out:
        trace.broken = trace.broken or "forward is not forward_head(forward_features(x))"
    if trace.broken is not None:
        raise ValueError(
            f"{kind}.forward_features is not a plain chain of its modules ({trace.broken}), so it cannot be "
            "restarted at a stage boundary"
        )
    return trace.order, trace.shapes
