"""A Triton Inference Server model repository for an exported classifier: ``<repo>/<name>/config.pbtxt``,
``<repo>/<name>/<version>/model.onnx`` (or ``model.plan``) and ``labels.txt``.

The config is built as tritonclient's own ``ModelConfig`` protobuf and serialized with ``text_format``, so every
field name and enum is the server's, and a written config always parses back.

Triton's batching contract, which this module keeps in one place:

- ``max_batch_size >= 1``: the model takes a leading batch dim of any size up to ``max_batch_size``; the config's
  ``dims`` leave it out, and the exported graph must have a symbolic (``dim_param``) batch dim.
- ``max_batch_size == 0``: the model has no batch dim Triton knows about; ``dims`` are the full tensor shape.
- ``dynamic_batching`` only means something when Triton may merge requests, i.e. ``max_batch_size > 1``.

``tritonclient`` and ``onnx`` come with ``kdpipe[export]``; they are imported on first use so that importing
``kdpipe.model_cards`` never needs them.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdpipe.errors import ConfigError, StageError
from kdpipe.fileio import atomic_write_text, atomic_write_with
from kdpipe.requirements import EXPORT_HINT

if TYPE_CHECKING:
    from tritonclient.grpc import model_config_pb2

logger = logging.getLogger(__name__)

CONFIG_FILENAME = "config.pbtxt"
LABELS_FILENAME = "labels.txt"
# Triton looks for ``model.<ext>`` in a version folder unless ``default_model_filename`` says otherwise.
PLATFORM_FILES = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan"}
INSTANCE_KINDS = {"auto": "KIND_AUTO", "cpu": "KIND_CPU", "gpu": "KIND_GPU"}
# Triton's DataType enum names (model_config.proto), minus TYPE_INVALID.
DATA_TYPES = (
    "TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32", "TYPE_UINT64", "TYPE_INT8", "TYPE_INT16",
    "TYPE_INT32", "TYPE_INT64", "TYPE_FP16", "TYPE_FP32", "TYPE_FP64", "TYPE_STRING", "TYPE_BF16",
)  # fmt: skip
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class TritonModelSpec:
    """Everything that goes into one model of a Triton repository; validated when it is built."""

    name: str
    """Triton model name and folder name: letters, digits, ``_``, ``.``, ``-``."""
    platform: str
    """"onnxruntime_onnx" | "tensorrt_plan"."""
    model_file: Path
    """The exported ``.onnx`` or ``.plan``, copied to ``<repo>/<name>/<version>/model.onnx|model.plan``."""
    input_name: str
    input_dims: tuple[int, ...]
    """Without the batch dim when ``max_batch_size >= 1``, e.g. (1, 16, 16); -1 marks a variable dim."""
    output_name: str
    output_dims: tuple[int, ...]
    """Without the batch dim when ``max_batch_size >= 1``, e.g. (10,)."""
    max_batch_size: int
    """>= 1 for a dynamic-batch export; 0 when the model has no batch dim (then dims include it)."""
    labels: tuple[str, ...] = ()
    """Class names in class-index order: ``labels.txt`` and the output's ``label_filename``."""
    preferred_batch_sizes: tuple[int, ...] = ()
    """Batch sizes the dynamic batcher aims for; empty lets Triton form the largest batch it can."""
    max_queue_delay_us: int = 100
    """Microseconds a request may wait for others to join its batch."""
    instance_kind: str = "auto"
    """"auto" | "cpu" | "gpu"."""
    instance_count: int = 1
    """Model instances per device (per GPU for "gpu")."""
    version: int = 1
    input_dtype: str = "TYPE_FP32"
    output_dtype: str = "TYPE_FP32"
    parameters: dict[str, str] = field(default_factory=dict, hash=False)
    """Free-form model config parameters, e.g. the preprocessing mean/std a client must apply."""

    def __post_init__(self) -> None:
        # Callers pass lists and strings as readily as tuples and Paths; store the declared types.
        object.__setattr__(self, "model_file", Path(self.model_file))
        for name in ("input_dims", "output_dims", "labels", "preferred_batch_sizes"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "parameters", dict(self.parameters))
        _check_spec(self)


def _check_spec(spec: TritonModelSpec) -> None:
    where = f"Triton model {spec.name!r}"
    if not _NAME.fullmatch(spec.name) or spec.name.startswith("."):
        raise ConfigError(
            f"Triton model name {spec.name!r} is not valid: use letters, digits, '_', '.' and '-', "
            "and do not start it with '.'",
            hint="the name is also the model's folder in the repository and the name clients request",
        )
    _check_choice(where, "platform", spec.platform, tuple(PLATFORM_FILES))
    _check_choice(where, "instance_kind", spec.instance_kind, tuple(INSTANCE_KINDS))
    _check_choice(where, "input_dtype", spec.input_dtype, DATA_TYPES)
    _check_choice(where, "output_dtype", spec.output_dtype, DATA_TYPES)
    expected_suffix = Path(PLATFORM_FILES[spec.platform]).suffix
    if spec.model_file.suffix != expected_suffix:
        raise ConfigError(
            f"{where}: platform {spec.platform!r} serves a {expected_suffix} file, got {spec.model_file}",
            hint=f"platforms and files: {PLATFORM_FILES}",
        )
    if spec.platform == "tensorrt_plan" and spec.instance_kind == "cpu":
        raise ConfigError(f"{where}: a TensorRT plan runs on a GPU only", hint='set instance_kind: "gpu" or "auto"')
    if spec.max_batch_size < 0:
        raise ConfigError(f"{where}: max_batch_size must be >= 0, got {spec.max_batch_size}")
    if spec.instance_count < 1 or spec.version < 1 or spec.max_queue_delay_us < 0:
        raise ConfigError(
            f"{where}: need instance_count >= 1, version >= 1 and max_queue_delay_us >= 0, got "
            f"{spec.instance_count}, {spec.version} and {spec.max_queue_delay_us}"
        )
    for tensor, dims in (("input", spec.input_dims), ("output", spec.output_dims)):
        if not dims or any(d < 1 and d != -1 for d in dims):
            raise ConfigError(f"{where}: {tensor} dims {list(dims)} must be non-empty, each >= 1 or -1 (variable)")
    if spec.preferred_batch_sizes:
        if spec.max_batch_size <= 1:
            raise ConfigError(
                f"{where}: preferred_batch_sizes {list(spec.preferred_batch_sizes)} need max_batch_size > 1 "
                f"(got {spec.max_batch_size}): Triton only batches requests together below that limit"
            )
        bad = [s for s in spec.preferred_batch_sizes if not 1 <= s <= spec.max_batch_size]
        if bad:
            raise ConfigError(
                f"{where}: preferred_batch_sizes {bad} are outside 1..max_batch_size ({spec.max_batch_size})",
                hint="drop them or raise max_batch_size (and the export's batch limit with it)",
            )
    if spec.labels:
        bad_labels = [label for label in spec.labels if not label or "\n" in label or "\r" in label]
        if bad_labels:
            raise ConfigError(f"{where}: labels must be non-empty single lines, got {bad_labels[:5]}")
        classes = spec.output_dims[-1]
        if classes != -1 and classes != len(spec.labels):
            raise ConfigError(
                f"{where}: {len(spec.labels)} labels for an output of {classes} classes",
                hint="labels are written one per line in class-index order; give one per class",
            )


def _check_choice(where: str, what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        near = difflib.get_close_matches(value, choices, n=1)
        hint = f"did you mean {near[0]!r}?" if near else None
        raise ConfigError(f"{where}: {what} {value!r} is not one of {', '.join(choices)}", hint=hint)


def model_config_module() -> Any:
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise ConfigError("a Triton model config needs tritonclient, which is not installed", hint=EXPORT_HINT) from exc
    return model_config_pb2


def create_model_config(spec: TritonModelSpec) -> model_config_pb2.ModelConfig:
    """The ``ModelConfig`` protobuf of ``spec``: batch-less dims, dynamic batching, instances and labels."""
    pb = model_config_module()
    config = pb.ModelConfig(name=spec.name, platform=spec.platform, max_batch_size=spec.max_batch_size)
    # Serve only the newest version folder, so writing version N+1 beside N swaps models without a config edit.
    config.version_policy.latest.num_versions = 1
    config.input.add(name=spec.input_name, data_type=pb.DataType.Value(spec.input_dtype), dims=spec.input_dims)
    output = config.output.add(
        name=spec.output_name, data_type=pb.DataType.Value(spec.output_dtype), dims=spec.output_dims
    )
    if spec.labels:
        # Triton's classification extension: a client asking for top-k classes gets "score:index:label".
        output.label_filename = LABELS_FILENAME
    if spec.max_batch_size > 1:
        config.dynamic_batching.max_queue_delay_microseconds = spec.max_queue_delay_us
        config.dynamic_batching.preferred_batch_size.extend(spec.preferred_batch_sizes)
    config.instance_group.add(
        kind=pb.ModelInstanceGroup.Kind.Value(INSTANCE_KINDS[spec.instance_kind]), count=spec.instance_count
    )
    for key, value in sorted(spec.parameters.items()):
        config.parameters[key].string_value = str(value)
    return config


def write_triton_repository(repo_dir: Path, spec: TritonModelSpec) -> dict[str, Path]:
    """Write ``spec`` as one model of the Triton repository ``repo_dir``; other models there are left alone.

    Returns the written paths: ``"config"``, ``"model"`` and, when there are labels, ``"labels"``. Each file is
    replaced atomically, so rewriting a live repository never exposes a torn file; the config goes last because
    a polling Triton reloads a model when its config changes.
    """
    if not spec.model_file.is_file():
        raise StageError(
            f"Triton model {spec.name!r}: model file {spec.model_file} does not exist",
            hint="run the export stage that produces it first",
        )
    model_dir = Path(repo_dir) / spec.name
    newer = [v for v in version_dirs(model_dir) if int(v.name) > spec.version and any(v.glob("model.*"))]
    if newer:
        # version_policy latest 1 would keep serving the newer folder, not the model written now.
        raise ConfigError(
            f"Triton model {spec.name!r}: {newer[-1]} holds a newer version than {spec.version}, "
            "which Triton would serve instead",
            hint=f"remove {newer[-1]} or write version {int(newer[-1].name) + 1}",
        )
    config_text = _model_config_text(spec)
    version_dir = model_dir / str(spec.version)
    model_path = version_dir / PLATFORM_FILES[spec.platform]

    def copy_model(tmp: Path) -> None:
        # copyfile reads through symlinks: the repository holds its own bytes and survives the run dir moving.
        shutil.copyfile(spec.model_file, tmp)

    atomic_write_with(model_path, copy_model)
    for other in set(PLATFORM_FILES.values()) - {model_path.name}:
        # A model file of the other platform, left from an earlier write, would only mislead a reader.
        (version_dir / other).unlink(missing_ok=True)
    paths = {"config": model_dir / CONFIG_FILENAME, "model": model_path}
    labels_path = model_dir / LABELS_FILENAME
    if spec.labels:
        atomic_write_text(labels_path, "".join(f"{label}\n" for label in spec.labels))
        paths["labels"] = labels_path
    else:
        labels_path.unlink(missing_ok=True)
    atomic_write_text(paths["config"], config_text)
    logger.info("wrote Triton model %r (version %d) to %s", spec.name, spec.version, model_dir)
    return paths


def _model_config_text(spec: TritonModelSpec) -> str:
    from google.protobuf import text_format

    # ``dims: [1, 16, 16]`` rather than one ``dims:`` line per entry: the form Triton's own docs use.
    return str(text_format.MessageToString(create_model_config(spec), use_short_repeated_primitives=True))


def read_model_config(path: Path) -> model_config_pb2.ModelConfig:
    """Parse a ``config.pbtxt``; a ConfigError names the file, line and column of a syntax error."""
    from google.protobuf import text_format

    pb = model_config_module()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read Triton model config {path}: {exc}") from exc
    try:
        return text_format.Parse(text, pb.ModelConfig())
    except text_format.ParseError as exc:
        line, column = exc.GetLine(), exc.GetColumn()
        where = f"{path}:{line}:{column}" if line is not None else str(path)
        raise ConfigError(
            f"{where}: not a valid Triton model config: {exc}",
            hint="rewrite it with write_triton_repository, or fix it by the field names in Triton's model_config.proto",
        ) from exc


@dataclass(frozen=True)
class OnnxTensor:
    name: str
    dims: tuple[int, ...]
    """-1 where the graph has a symbolic or unknown dim."""
    static_batch: bool
    """The leading dim is a fixed number."""
    dtype: str | None
    """Triton's name of the element type; None for a type Triton has no name for."""


def load_onnx_io(onnx_path: Path) -> tuple[list[OnnxTensor], list[OnnxTensor]]:
    """The graph's real inputs (initializers left out) and outputs."""
    try:
        import onnx
    except ImportError as exc:
        raise ConfigError("reading an ONNX graph needs onnx, which is not installed", hint=EXPORT_HINT) from exc
    try:
        # Only the graph's signature is needed; weights kept in external files are not read.
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ... for a missing or corrupt file
        raise StageError(f"cannot load ONNX model {onnx_path}: {exc}", hint="re-run the export stage") from exc
    initializers = {init.name for init in model.graph.initializer}
    # onnx.TensorProto element type -> Triton's name: the same words, but for the float types' spelling.
    rename = {"FLOAT": "FP32", "DOUBLE": "FP64", "FLOAT16": "FP16", "BFLOAT16": "BF16"}
    to_triton = {code: f"TYPE_{rename.get(key, key)}" for key, code in onnx.TensorProto.DataType.items()}

    def tensor(value: Any) -> OnnxTensor:
        tensor_type = value.type.tensor_type
        shape = tensor_type.shape.dim
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in shape)
        static_batch = bool(shape) and shape[0].HasField("dim_value")
        dtype = to_triton.get(tensor_type.elem_type)
        return OnnxTensor(value.name, dims, static_batch, dtype if dtype in DATA_TYPES else None)

    inputs = [tensor(v) for v in model.graph.input if v.name not in initializers]
    return inputs, [tensor(v) for v in model.graph.output]


def triton_dims(where: str, tensor: OnnxTensor, max_batch_size: int) -> tuple[int, ...]:
    """The dims Triton's config must state for ``tensor``: batch-less when Triton batches (max_batch_size >= 1)."""
    if max_batch_size == 0:
        return tensor.dims
    if tensor.static_batch:
        raise ConfigError(
            f"{where}: {tensor.name!r} has a fixed batch dim {tensor.dims[0]}, so the export is not dynamic-batch "
            f"and cannot serve max_batch_size {max_batch_size}",
            hint="set max_batch_size: 0 (Triton then sends the full shape) or export with dynamic_batch: true",
        )
    return tensor.dims[1:]


def spec_from_onnx(
    onnx_path: Path, *, name: str, max_batch_size: int, labels: tuple[str, ...] = (), **kwargs: Any
) -> TritonModelSpec:
    """A spec whose input/output names, dims and data types are read from the ONNX graph of ``onnx_path``.

    ``kwargs`` set or override any other ``TritonModelSpec`` field, e.g. ``preferred_batch_sizes``, or
    ``platform="tensorrt_plan", model_file=plan`` for an engine built from this ONNX.
    """
    onnx_path = Path(onnx_path)
    fields = {f.name for f in dataclasses.fields(TritonModelSpec)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        near = difflib.get_close_matches(unknown[0], fields, n=1)
        raise ConfigError(
            f"spec_from_onnx: unknown TritonModelSpec field(s) {unknown}; valid: {', '.join(sorted(fields))}",
            hint=f"did you mean {near[0]!r}?" if near else None,
        )
    where = f"ONNX model {onnx_path}"
    inputs, outputs = load_onnx_io(onnx_path)
    if len(inputs) != 1 or len(outputs) != 1:
        raise ConfigError(
            f"{where}: a classifier has one input and one output, this graph has inputs "
            f"{[t.name for t in inputs]} and outputs {[t.name for t in outputs]}",
            hint="build the TritonModelSpec by hand for a multi-tensor model",
        )
    (inp,), (out,) = inputs, outputs
    for tensor in (inp, out):
        if tensor.dtype is None:
            raise ConfigError(f"{where}: {tensor.name!r} has an element type Triton has no name for")
    derived: dict[str, Any] = {
        "name": name,
        "platform": "onnxruntime_onnx",
        "model_file": onnx_path,
        "input_name": inp.name,
        "input_dims": triton_dims(where, inp, max_batch_size),
        "input_dtype": inp.dtype,
        "output_name": out.name,
        "output_dims": triton_dims(where, out, max_batch_size),
        "output_dtype": out.dtype,
        "max_batch_size": max_batch_size,
        "labels": tuple(labels),
    }
    return TritonModelSpec(**{**derived, **kwargs})


def version_dirs(model_dir: Path) -> list[Path]:
    """The numbered version folders of a model folder, in version order."""
    if not model_dir.is_dir():
        return []
    return sorted((p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
