"""Benchmark one stand-alone model file (``kdpipe bench MODEL``), outside any pipeline run.

What each kind of file needs:
- ``.onnx``: runs on onnxruntime; the input shape comes from the graph's static dimensions, else from its
  ``kdpipe.preprocessing.*`` metadata (written by ``kdpipe.exports.export_onnx``), else ``input_shape`` must be given;
- ``.plan`` / ``.engine``: a TensorRT engine; ``input_shape`` must be given;
- ``.pt`` / ``.pth``: a TorchScript archive (``torch.jit.load``: TorchScript code, never an arbitrary pickle), whose
  shape comes from an extra file ``kdpipe.preprocessing`` (a JSON Preprocessing record) or ``input_shape``; or a
  plain state_dict checkpoint, which needs ``arch`` (a timm model name) to be rebuilt;
- ``.safetensors``: written by kdpipe, its metadata (arch, num_classes, in_chans, image_size) rebuilds the model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
import torch
from torch import nn

from kdpipe.bench.measure import BenchCell, run_benchmark
from kdpipe.bench.target import BenchTarget
from kdpipe.environment import resolve_device
from kdpipe.errors import ConfigError, DataError, handle_errors
from kdpipe.progress import Progress
from kdpipe.registry import BACKENDS

logger = logging.getLogger(__name__)

PREPROCESSING_KEY = "kdpipe.preprocessing"


def backends_for(suffix: str) -> list[str]:
    """The registered backends that run a ``suffix`` file (``Backend.consumes``), the default first."""
    return [e.name for e in BACKENDS.in_registration_order() if suffix.lower() in e.obj.consumes]


def accepted_kinds() -> str:
    """``.onnx (onnxruntime), .plan/.engine (tensorrt), ...``: what ``kdpipe bench`` can run, from the registry."""
    by_suffix: dict[str, list[str]] = {}
    for entry in BACKENDS.in_registration_order():
        for suffix in entry.obj.consumes:
            by_suffix.setdefault(suffix, []).append(entry.name)
    groups: dict[tuple[str, ...], list[str]] = {}
    for suffix, names in by_suffix.items():
        groups.setdefault(tuple(names), []).append(suffix)
    kinds = ", ".join(f"{'/'.join(sfx)} ({', '.join(names)})" for names, sfx in groups.items())
    return kinds + "; a .pt/.pth file is TorchScript or a state_dict (give --arch)"


_NESTED_KEYS = ("state_dict", "model", "model_state_dict")  # where training scripts put the state_dict


def benchmark_file(
    path: Path,
    *,
    batch_sizes: list[int] | tuple[int, ...] = (1, 8, 64),
    backends: list[str] | None = None,
    input_shape: tuple[int, int, int] | None = None,
    arch: str | None = None,
    threads: int | None = None,
    warmup: int = 10,
    min_iterations: int = 30,
    min_time_s: float = 1.0,
    max_iterations: int = 10_000,
    device: str = "auto",
    progress: Progress | None = None,
) -> list[BenchCell]:
    """Benchmark the model file at ``path`` with ``backends`` (default: the first that runs its kind of file).

    ``input_shape`` is ``(C, H, W)``; where the file records its shape it may be omitted (and must agree with a
    static ONNX graph if given). ``arch`` names the timm model of a plain state_dict checkpoint. The other arguments
    are ``run_benchmark``'s.

    Raises:
        ConfigError: the file is missing or of an unknown kind, a backend cannot run this kind of file or is not
            installed, or the input shape or architecture cannot be determined.
        DataError: a weight file does not fit the architecture or is unreadable.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model file {path} does not exist", hint=f"accepted kinds: {accepted_kinds()}")
    runs = backends_for(path.suffix)
    if not runs:
        raise ConfigError(
            f"{path}: cannot benchmark a {path.suffix or 'suffix-less'} file",
            hint=f"accepted kinds: {accepted_kinds()}",
        )
    chosen = list(backends) if backends else [runs[0]]
    for name in chosen:
        backend = BACKENDS.get(name)  # unknown names: ConfigError with did-you-mean
        if name not in runs:
            raise ConfigError(
                f"backend {name!r} cannot run {path.name}; a {path.suffix} file runs on: {', '.join(runs)}"
            )
        backend.check_available()

    module: nn.Module | None = None
    if any(BACKENDS.get(name).needs == "module" for name in chosen):
        module, input_shape = _load_torch_model(path, arch, input_shape)
    elif path.suffix.lower() == ".onnx":
        input_shape = _onnx_input_shape(path, input_shape)
    elif input_shape is None:
        raise ConfigError(f"{path.name}: give the input shape of a {path.suffix} model", hint="--input-shape CxHxW")
    assert input_shape is not None
    targets = [BenchTarget(label=path.name, backend=name, path=path, module=module) for name in chosen]
    return run_benchmark(
        targets,
        list(batch_sizes),
        input_shape,
        warmup=warmup,
        min_iterations=min_iterations,
        min_time_s=min_time_s,
        max_iterations=max_iterations,
        threads=threads,
        device=device,
        progress=progress,
    )


def parse_shape(text: str) -> tuple[int, int, int]:
    """``"3x224x224"`` (or ``3,224,224``) -> ``(3, 224, 224)``."""
    parts = text.lower().replace(",", "x").split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"input shape {text!r} is not CxHxW with positive sizes", hint="e.g. --input-shape 3x32x32")
    return shape[0], shape[1], shape[2]


def shape_from_preprocessing(record: Mapping[str, Any]) -> tuple[int, int, int] | None:
    """The ``(C, H, W)`` a ``kdpipe.exports.Preprocessing`` record describes (its ``in_chans`` and ``image_size``,
    an int or ``[H, W]``; values may still be JSON text, as in ONNX metadata). None when it says neither."""
    try:
        in_chans, size = (
            json.loads(v) if isinstance(v, str) else v for v in (record["in_chans"], record["image_size"])
        )
        h, w = (size, size) if isinstance(size, int) else size
        return int(in_chans), int(h), int(w)
    except (KeyError, TypeError, ValueError):
        return None


def _read_json_record(text: str) -> dict[str, Any]:
    try:
        record = json.loads(text) if text else {}
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _onnx_input_shape(path: Path, given: tuple[int, int, int] | None) -> tuple[int, int, int]:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and others from protobuf
        raise DataError(f"{path} is not a readable ONNX model ({type(e).__name__}: {e})") from e
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if not inputs:
        raise DataError(f"{path}: the ONNX graph has no input")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) == 4 and all(d for d in dims[1:]):
        static = (int(dims[1]), int(dims[2]), int(dims[3]))  # type: ignore[arg-type]
        if given is not None and tuple(given) != static:
            raise ConfigError(f"{path.name} takes inputs of shape {static}; --input-shape {given} contradicts it")
        return static
    if given is not None:
        return tuple(given)  # type: ignore[return-value]
    # kdpipe.exports writes one metadata key per Preprocessing field: kdpipe.preprocessing.in_chans, ...
    prefix = PREPROCESSING_KEY + "."
    shape = shape_from_preprocessing(
        {p.key[len(prefix) :]: p.value for p in model.metadata_props if p.key.startswith(prefix)}
    )
    if shape is None:
        raise ConfigError(
            f"{path.name} has no static input shape and no {prefix}in_chans/image_size metadata",
            hint="give --input-shape CxHxW",
        )
    return shape


def _load_torch_model(
    path: Path, arch: str | None, given: tuple[int, int, int] | None
) -> tuple[nn.Module, tuple[int, int, int]]:
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
        except Exception as e:  # SafetensorError and header errors
            raise DataError(f"{path} is not a valid safetensors file ({e})") from e
        return _build_from_weights(path, arch or meta.get("arch"), shapes, meta, given)
    names: list[str] = []
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    # torch.jit.save archives hold the model's TorchScript source under <name>/code/; torch.save checkpoints do not.
    if any("/code/" in n or n.endswith("/constants.pkl") for n in names):
        extra = {PREPROCESSING_KEY: ""}
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        shape = given or shape_from_preprocessing(_read_json_record(extra[PREPROCESSING_KEY]))
        if shape is None:
            raise ConfigError(
                f"{path.name}: TorchScript archives carry no input shape", hint="give --input-shape CxHxW"
            )
        return module, shape
    # Not TorchScript: a torch.save'd checkpoint (zip or legacy pickle), read as tensors only.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, a refused global, a truncated file
        raise DataError(f"{path} is not a readable tensors-only checkpoint ({type(e).__name__}: {e})") from e
    if isinstance(state, dict):
        state = next((state[k] for k in _NESTED_KEYS if isinstance(state.get(k), dict)), state)
    shapes = {str(k): tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    return _build_from_weights(path, arch, shapes, {}, given)


def _build_from_weights(
    path: Path,
    arch: str | None,
    shapes: dict[str, tuple[int, ...]],
    meta: dict[str, str],
    given: tuple[int, int, int] | None,
) -> tuple[nn.Module, tuple[int, int, int]]:
    from kdpipe.models.factory import create_model
    from kdpipe.models.weights import load_weights

    if not arch:
        raise ConfigError(
            f"{path.name} holds weights without an architecture", hint="give the timm model name with --arch NAME"
        )
    cfg = _pretrained_cfg(arch)
    num_classes = int(meta["num_classes"]) if "num_classes" in meta else _dim(shapes, cfg.get("classifier"), 0)
    in_chans = int(meta["in_chans"]) if "in_chans" in meta else _dim(shapes, cfg.get("first_conv"), 1)
    if num_classes is None or in_chans is None:
        raise ConfigError(f"{path.name}: cannot tell the number of classes or input channels of {arch!r} from it")
    model = create_model(arch, num_classes=num_classes, in_chans=in_chans)
    load_weights(model, path)
    if given is not None:
        shape = tuple(given)
    elif "image_size" in meta:
        shape = (in_chans, int(meta["image_size"]), int(meta["image_size"]))
    elif cfg.get("input_size"):
        shape = (in_chans, *cfg["input_size"][1:])
        logger.info("%s: no image size recorded; using %s's default input %s", path.name, arch, shape)
    else:
        raise ConfigError(f"{path.name}: no input size recorded for {arch!r}", hint="give --input-shape CxHxW")
    return model, shape  # type: ignore[return-value]


def _pretrained_cfg(arch: str) -> dict[str, Any]:
    import timm.models

    from kdpipe.models.factory import check_model_name

    check_model_name(arch, "--arch")
    cfg = timm.models.get_pretrained_cfg(arch)
    return cfg.to_dict() if cfg is not None else {}


def _dim(shapes: dict[str, tuple[int, ...]], module: str | tuple[str, ...] | None, axis: int) -> int | None:
    # The classifier's weight is (num_classes, features); the stem conv's is (out, in_chans, kh, kw).
    names = (module,) if isinstance(module, str) else tuple(module or ())
    for name in names:
        for key, shape in shapes.items():
            if key.endswith(f"{name}.weight") and len(shape) > axis:
                return int(shape[axis])
    return None


def _batch_sizes(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    try:
        sizes = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of positive integers, e.g. 1,8,64")
    return sizes


@click.command("bench")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--batch-sizes", default="1,8,64", show_default=True, callback=_batch_sizes, help="Comma-separated.")
@click.option(
    "--backend",
    "backends",
    multiple=True,
    metavar="NAME",
    help="torch | torch-compile | onnxruntime | tensorrt (repeatable; default: the one that runs the file).",
)
@click.option("--input-shape", metavar="CxHxW", help="Input shape when the file does not record it.")
@click.option("--arch", metavar="NAME", help="timm model name of a plain state_dict checkpoint.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads (default: torch's current setting).")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True, help="Untimed calls per cell.")
@click.option("--min-iterations", type=click.IntRange(min=1), default=30, show_default=True)
@click.option(
    "--min-time",
    "min_time_s",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Seconds to time each cell for at least.",
)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N.")
@click.option("--out", type=click.Path(path_type=Path), help="Report folder (default: <model stem>.bench/ beside it).")
@click.option("--json", "as_json", is_flag=True, help="Print the cells as JSON instead of a table.")
@handle_errors
def bench_command(
    model: Path,
    batch_sizes: list[int],
    backends: tuple[str, ...],
    input_shape: str | None,
    arch: str | None,
    threads: int | None,
    warmup: int,
    min_iterations: int,
    min_time_s: float,
    device: str,
    out: Path | None,
    as_json: bool,
) -> None:
    """Measure latency and throughput of the model file MODEL per backend and batch size.

    Writes bench.json, bench.md and bench.png to --out.
    """
    from rich.console import Console

    from kdpipe.bench.report import write_report
    from kdpipe.environment import describe_environment

    cells = benchmark_file(
        model,
        batch_sizes=batch_sizes,
        backends=list(backends) or None,
        input_shape=parse_shape(input_shape) if input_shape else None,
        arch=arch,
        threads=threads,
        warmup=warmup,
        min_iterations=min_iterations,
        min_time_s=min_time_s,
        device=device,
    )
    out_dir = out or model.with_name(f"{model.stem}.bench")
    paths = write_report(out_dir, cells, describe_environment(str(resolve_device(device))))
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(c) for c in cells], indent=2))
    else:
        # Off a terminal rich assumes 80 columns and squeezes the table; a pipe or a file gets room for every column.
        console = Console()
        Console(width=None if console.is_terminal else 200).print(_rich_table(cells))
    click.echo(f"report: {paths['markdown']}", err=True)


def _rich_table(cells: list[BenchCell]) -> Any:
    from rich import box
    from rich.table import Table

    from kdpipe.bench.report import format_bytes

    table = Table(show_header=True, header_style="bold", box=box.SIMPLE)
    for column in ("model", "backend", "batch", "p50 ms", "p90 ms", "p99 ms", "mean ± std ms", "img/s", "peak mem"):
        table.add_column(column, justify="left" if column in ("model", "backend") else "right")
    table.add_column("error", style="red")
    for c in cells:
        if c.error is not None:
            table.add_row(c.model, c.backend, str(c.batch_size), *["–"] * 6, c.error)
            continue
        table.add_row(
            c.model,
            c.backend,
            str(c.batch_size),
            f"{c.p50_ms:.3f}",
            f"{c.p90_ms:.3f}",
            f"{c.p99_ms:.3f}",
            f"{c.mean_ms:.3f} ± {c.std_ms:.3f}",
            f"{c.throughput:,.1f}",
            format_bytes(c.peak_memory_bytes),
            "",
        )
    return table
