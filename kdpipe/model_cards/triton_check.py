"""Checks of a Triton model repository on disk: what a Triton server would refuse or misread, found before it
loads. ``validate_repository`` is what the serve stage runs on its own output, and what a user can run on a
repository edited by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdpipe.errors import ConfigError, StageError
from kdpipe.model_cards.triton import (
    CONFIG_FILENAME,
    PLATFORM_FILES,
    load_onnx_io,
    model_config_module,
    read_model_config,
    triton_dims,
    version_dirs,
)


def validate_repository(repo_dir: Path) -> list[str]:
    """Check every model folder of a Triton repository; returns the problems found, empty when all is well.

    Checked: the config parses and names its folder, each version folder holds the platform's model file, label
    files exist with one line per class, preferred batch sizes fit, and for ONNX models the config's tensors,
    dims (batch-less when max_batch_size >= 1) and data types agree with the graph.
    """
    repo_dir = Path(repo_dir)
    if not repo_dir.is_dir():
        return [f"{repo_dir}: the Triton model repository does not exist"]
    problems: list[str] = []
    for model_dir in sorted(p for p in repo_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        problems += _model_problems(model_dir)
    return problems


def _model_problems(model_dir: Path) -> list[str]:
    config_path = model_dir / CONFIG_FILENAME
    if not config_path.is_file():
        return [f"{model_dir}: no {CONFIG_FILENAME}"]
    try:
        config = read_model_config(config_path)
    except ConfigError as exc:
        return [exc.message]
    problems = []
    if config.name and config.name != model_dir.name:
        problems.append(f"{config_path}: name {config.name!r} differs from its folder {model_dir.name!r}")
    if config.max_batch_size < 0:
        problems.append(f"{config_path}: max_batch_size {config.max_batch_size} is negative")
    preferred = [s for s in config.dynamic_batching.preferred_batch_size if s > config.max_batch_size]
    if preferred:
        problems.append(f"{config_path}: preferred_batch_size {preferred} > max_batch_size {config.max_batch_size}")
    for output in config.output:
        if output.label_filename:
            problems += _label_problems(config_path, model_dir / output.label_filename, output)
    model_name = config.default_model_filename or PLATFORM_FILES.get(config.platform)
    if model_name is None:
        return [*problems, f"{config_path}: platform {config.platform!r} is not one of {', '.join(PLATFORM_FILES)}"]
    versions = version_dirs(model_dir)
    if not versions:
        problems.append(f"{model_dir}: no numbered version folder (e.g. 1/{model_name})")
    for version_dir in versions:
        model_path = version_dir / model_name
        if not model_path.is_file():
            found = sorted(p.name for p in version_dir.glob("model.*"))
            problems.append(
                f"{model_path}: missing; platform {config.platform!r} loads {model_name}"
                + (f" (found {', '.join(found)})" if found else "")
            )
        elif config.platform == "onnxruntime_onnx":
            problems += _onnx_problems(config_path, config, model_path)
    return problems


def _label_problems(config_path: Path, labels_path: Path, output: Any) -> list[str]:
    if not labels_path.is_file():
        return [f"{config_path}: output {output.name!r} label_filename {labels_path.name!r} does not exist"]
    count = len(labels_path.read_text(encoding="utf-8").splitlines())
    classes = output.dims[-1] if output.dims else -1
    if classes not in (-1, count):
        return [f"{labels_path}: {count} labels for output {output.name!r} of {classes} classes"]
    return []


def _onnx_problems(config_path: Path, config: Any, model_path: Path) -> list[str]:
    """Disagreements between the config's tensors and the ONNX graph Triton would load with it."""
    try:
        inputs, outputs = load_onnx_io(model_path)
    except (ConfigError, StageError) as exc:
        return [exc.message]
    problems = []
    for kind, declared, graph in (("input", config.input, inputs), ("output", config.output, outputs)):
        by_name = {t.name: t for t in graph}
        for tensor in declared:
            actual = by_name.get(tensor.name)
            if actual is None:
                problems.append(f"{config_path}: {kind} {tensor.name!r} is not in {model_path} (has {list(by_name)})")
                continue
            try:
                expected = triton_dims(str(model_path), actual, config.max_batch_size)
            except ConfigError as exc:
                problems.append(exc.message)
                continue
            dims = tuple(tensor.dims)
            # A symbolic graph dim accepts any configured size; a fixed one must be stated exactly.
            if len(dims) != len(expected) or any(g != -1 and d != g for d, g in zip(dims, expected, strict=True)):
                batch_note = " (batch dim left out)" if config.max_batch_size > 0 else ""
                problems.append(
                    f"{config_path}: {kind} {tensor.name!r} dims {list(dims)} do not match the ONNX graph's "
                    f"{list(expected)}{batch_note}"
                )
            data_type = model_config_module().DataType.Name(tensor.data_type)
            if actual.dtype != data_type:
                problems.append(f"{config_path}: {kind} {tensor.name!r} is {data_type}, the graph's is {actual.dtype}")
    missing = sorted({t.name for t in inputs} - {t.name for t in config.input})
    if missing:
        problems.append(f"{config_path}: the graph's inputs {missing} are missing from the config")
    return problems
