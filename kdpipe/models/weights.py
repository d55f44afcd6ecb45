"""Weight files: save a model's state_dict as ``.safetensors``, load one back, read its metadata.

Weights are written as ``.safetensors`` with string metadata (arch, num_classes, in_chans, ...), atomically through
``kdpipe.fileio``. Reading accepts ``.safetensors`` and torch files, the latter only through
``torch.load(weights_only=True)``: a checkpoint is data, never code. Every failure to read or fit a file is a
``DataError`` that names the file and says what to do, not a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from kdpipe.errors import DataError
from kdpipe.fileio import WriteError, atomic_write_with, zip_damage

__all__ = [
    "HeadChange",
    "fit_pretrained_state",
    "load_weights",
    "read_state_dict",
    "read_weights_metadata",
    "save_weights",
]

_logger = logging.getLogger(__name__)

_SAFETENSORS_SUFFIX = ".safetensors"
_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Keys under which training scripts nest the state_dict (timm/Lightning, CRD/mdistiller, common tutorials).
_NESTED_KEYS = ("state_dict", "model", "model_state_dict")
# Prefixes a wrapper adds to every key: DistributedDataParallel/DataParallel, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SHOW = 5  # how many offending keys an error message lists


def save_weights(model: nn.Module, path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``model``'s state_dict to ``path`` (``.safetensors``) atomically and return the path.

    The file's metadata holds ``arch``, ``num_classes``, ``in_chans`` (from the model) plus ``metadata``; a key in
    ``metadata`` may repeat a derived value but not contradict it. The file is written with ``atomic_write_with``
    (temporary file in the same folder, fsync, rename, fsync of the folder): a reader sees the old file or the new
    one, never half. A failed write raises the ``OSError`` itself.
    """
    path = Path(path)
    if path.suffix.lower() != _SAFETENSORS_SUFFIX:
        raise ValueError(f"save_weights writes safetensors; name the file *.safetensors, got {path}")
    meta = {"format": "pt", **_model_facts(model)}
    for key, value in (metadata or {}).items():
        if not isinstance(value, str):
            raise TypeError(f"safetensors metadata values must be str; {key!r} is {type(value).__name__}")
        if key in meta and meta[key] != value:
            raise ValueError(f"metadata {key}={value!r} contradicts the model ({key}={meta[key]!r})")
        meta[key] = value

    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, value in model.state_dict().items():
        tensor = value.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share memory (tied weights); give repeats their own copy.
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in storages and tensor.numel():
            tensor = tensor.clone()
        storages.add(ptr)
        tensors[key] = tensor

    try:
        atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    except WriteError as e:
        # save_weights has always raised the OSError itself (the stage runner reports it with a traceback in
        # error.log); unwrap fileio's WriteError so callers keep seeing that type and message.
        if isinstance(e.__cause__, OSError):
            raise e.__cause__ from None
        raise
    _logger.debug("saved %d tensors to %s", len(tensors), path)
    return path


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a weight file's state_dict and metadata, with the checks of ``load_weights`` but no model to fit.

    The formats are ``load_weights``'s; a file that cannot be read safely is a ``DataError``.
    """
    path = Path(path)
    _require_file(path)
    suffix = path.suffix.lower()
    if suffix == _SAFETENSORS_SUFFIX:
        return _read_safetensors(path)
    if suffix in _TORCH_SUFFIXES:
        return _extract_state_dict(_read_torch_file(path), path)
    raise DataError(
        f"{path}: unsupported weight file type {suffix or '(no suffix)'!r}",
        hint=f"use a {_SAFETENSORS_SUFFIX} file or a torch file ({', '.join(_TORCH_SUFFIXES)})",
    )


@dataclass(frozen=True)
class HeadChange:
    """A classifier dropped from a weight file because the run has another number of classes (timm's rule)."""

    file_classes: int
    classes: int
    layers: tuple[str, ...]

    def describe(self) -> str:
        return (
            f"classifier {', '.join(self.layers)} re-initialised: the weights have {self.file_classes} classes, "
            f"the run {self.classes}"
        )


def fit_pretrained_state(
    model: nn.Module, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path: str | Path
) -> tuple[dict[str, torch.Tensor], HeadChange | None]:
    """Check that pretrained weights fit ``model`` everywhere except, possibly, its class head.

    The head (``model.pretrained_cfg["classifier"]``) may differ in its number of outputs only: then the returned
    ``HeadChange`` says so, and the caller drops it as timm does for a new ``num_classes``. Any other difference
    (a missing or unexpected key, another shape, a head of other input width) raises ``load_weights``'s
    ``DataError``. Returns the state with wrapper prefixes removed.
    """
    path = Path(path)
    expected = model.state_dict()
    state = _strip_wrapper_prefixes(dict(state), expected)
    names = _as_tuple((getattr(model, "pretrained_cfg", None) or {}).get("classifier"))
    head_keys = {f"{name}.{part}" for name in names for part in ("weight", "bias")}
    changed = [
        k
        for k in sorted(head_keys)
        if k in state
        and k in expected
        and state[k].shape != expected[k].shape
        and state[k].shape[1:] == expected[k].shape[1:]
    ]
    change = None
    if changed:
        file_classes = {int(state[k].shape[0]) for k in changed}
        if len(file_classes) == 1:
            layers = tuple(name for name in names if f"{name}.weight" in changed or f"{name}.bias" in changed)
            change = HeadChange(file_classes.pop(), int(expected[changed[0]].shape[0]), layers)
    skip = {f"{name}.{part}" for name in (change.layers if change else ()) for part in ("weight", "bias")}
    _check_fits(
        model,
        {k: v for k, v in state.items() if k not in skip},
        {k: v for k, v in expected.items() if k not in skip},
        metadata,
        path,
    )
    return state, change


def load_weights(model: nn.Module, path: str | Path) -> dict[str, str]:
    """Load a weight file into ``model`` and return the file's metadata (empty when it has none).

    Accepts ``.safetensors`` and torch files (``.pt``, ``.pth``, ``.bin``, ``.ckpt``) holding a state_dict, bare or
    under ``state_dict``, ``model`` or ``model_state_dict``; for torch files the metadata is the scalar entries beside
    the nested state_dict (``epoch``, ``best_acc``, ...). Wrapper prefixes (``module.``, ``_orig_mod.``) are removed.
    Every key and shape must match the model.

    Raises:
        DataError: the file is missing, is not a checkpoint, is truncated, needs code execution to unpickle, or
            does not fit the model (missing/unexpected keys, shape mismatches).
    """
    path = Path(path)
    state, metadata = read_state_dict(path)
    expected = model.state_dict()
    state = _strip_wrapper_prefixes(state, expected)
    _check_fits(model, state, expected, metadata, path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # already checked above; this guards against module-specific load hooks
        raise DataError(f"{path} could not be loaded into {_arch(model)}: {_first_line(e)}") from e
    _logger.debug("loaded %d tensors from %s", len(state), path)
    return metadata


def read_weights_metadata(path: str | Path) -> dict[str, str]:
    """Return the string metadata stored in a ``.safetensors`` file, without reading its tensors."""
    path = Path(path)
    _require_file(path)
    if path.suffix.lower() != _SAFETENSORS_SUFFIX:
        raise DataError(f"{path}: only {_SAFETENSORS_SUFFIX} files carry metadata", hint="re-save it with save_weights")
    return _read_safetensors(path, tensors=False)[1]


def _require_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"weight file {path} does not exist", hint=f"check the path (relative to {Path.cwd()})")
    if not path.is_file():
        raise DataError(f"weight file {path} is not a file", hint="point to the .safetensors/.pt file itself")


def _read_safetensors(path: Path, tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            # safe_open handles are not iterable: .keys() is the API.
            state = {key: f.get_tensor(key) for key in f.keys()} if tensors else {}  # noqa: SIM118
    except SafetensorError as e:
        raise DataError(
            f"{path} is not a valid safetensors file ({_first_line(e)}): it is truncated or not a checkpoint",
            hint="copy or export the file again",
        ) from e
    return state, metadata


def _read_torch_file(path: Path) -> Any:
    with open(path, "rb") as f:
        head = f.read(64)
    # torch.save writes a zip archive (torch >= 1.6) or, in the legacy format, a pickle (protocol >= 2 opens 0x80).
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        what = "it is empty" if not head else f"it starts with {head[:24]!r}"
        raise DataError(
            f"{path} is not a PyTorch checkpoint: {what}",
            hint="point weights.checkpoint at a file written by torch.save or save_weights",
        )
    damage = zip_damage(path) if head.startswith(b"PK\x03\x04") else None
    if damage is not None:  # torch.load checks no CRC: flipped bits in the weights would load silently
        raise DataError(f"{path} is truncated or corrupt: {damage}", hint="copy the file again, or re-save it")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if "Weights only load failed" in str(e):
            needs = f" (it references {refused.group(1)})" if refused else ""
            raise DataError(
                f"{path} was refused: loading it would import and run Python code{needs}; kdpipe only loads "
                "tensors from torch files (torch.load with weights_only=True)",
                hint="in the environment that wrote it, re-save the tensors only: "
                "torch.save(model.state_dict(), 'weights.pt'), or save_weights(model, 'weights.safetensors')",
            ) from e
        raise DataError(f"{path} is not a readable PyTorch checkpoint ({_first_line(e)})") from e
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise DataError(
            f"{path} could not be read ({type(e).__name__}: {_first_line(e) or 'unexpected end of file'}): "
            "it is probably truncated or corrupt",
            hint="copy the file again, or re-save it",
        ) from e


def _extract_state_dict(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    metadata: dict[str, str] = {}
    state = obj
    if isinstance(obj, Mapping):
        for key in _NESTED_KEYS:
            if _is_state_dict(obj.get(key)):
                state = obj[key]
                scalars = {str(k): _scalar_str(v) for k, v in obj.items()}
                metadata = {k: v for k, v in scalars.items() if v is not None}
                break
    if not _is_state_dict(state):
        found = (
            f"a dict with keys {_few([str(k) for k in obj])}" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
        )
        raise DataError(
            f"{path} holds no state_dict: expected parameter names mapped to tensors, bare or under "
            f"{', '.join(repr(k) for k in _NESTED_KEYS)}; found {found}",
            hint="save it with torch.save(model.state_dict(), path) or save_weights(model, path)",
        )
    return dict(state), metadata


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _scalar_str(value: Any) -> str | None:
    if isinstance(value, torch.Tensor):
        return str(value.item()) if value.numel() == 1 else None
    return str(value) if isinstance(value, (str, int, float, bool)) else None


def _strip_wrapper_prefixes(state: dict[str, torch.Tensor], expected: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    # Strip only a prefix that every file key has and no model key has: a real submodule called "module" stays.
    stripped = True
    while stripped and state:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in expected):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped = True
    return state


def _check_fits(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    path: Path,
) -> None:
    # BatchNorm fills in a missing num_batches_tracked itself (files from torch < 0.4.1 lack it).
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) (in the model, not the file): {_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) (in the file, not the model): {_few(unexpected)}")
    if mismatched:
        shapes = "; ".join(
            f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in mismatched[:_SHOW]
        )
        more = f" (+{len(mismatched) - _SHOW} more)" if len(mismatched) > _SHOW else ""
        problems.append(f"{len(mismatched)} shape mismatch(es): {shapes}{more}")
    raise DataError(
        f"{path} does not fit {_arch(model)}:\n  " + "\n  ".join(problems),
        hint=_mismatch_hint(model, state, mismatched, metadata),
    )


def _mismatch_hint(
    model: nn.Module, state: Mapping[str, torch.Tensor], mismatched: list[str], metadata: Mapping[str, str]
) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    saved_arch = metadata.get("arch")
    if saved_arch and saved_arch != _arch(model):
        return f"the file was saved from {saved_arch!r}; build that model, or point to a checkpoint of {_arch(model)}"
    for name in _as_tuple(cfg.get("classifier")):
        key = f"{name}.weight"
        if key in mismatched:
            n = state[key].shape[0]
            return f"was it trained with num_classes={n}? Build the model with num_classes={n}, or use a matching file"
    for name in _as_tuple(cfg.get("first_conv")):
        key = f"{name}.weight"
        if key in mismatched and state[key].ndim == 4:
            c = state[key].shape[1]
            return f"was it trained with in_chans={c}? Build the model with in_chans={c}, or use a matching file"
    return "check that the file was trained with the same model name, num_classes and in_chans"


def _model_facts(model: nn.Module) -> dict[str, str]:
    facts = {"arch": _arch(model)}
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None:
        facts["num_classes"] = str(num_classes)
    in_chans = getattr(model, "in_chans", None)
    if in_chans is None:  # timm models without the attribute: read the stem conv named in the pretrained cfg
        first = _as_tuple((getattr(model, "pretrained_cfg", None) or {}).get("first_conv"))
        with contextlib.suppress(AttributeError):
            in_chans = getattr(model.get_submodule(first[0]), "in_channels", None) if first else None
    if in_chans is not None:
        facts["in_chans"] = str(in_chans)
    return facts


def _arch(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def _as_tuple(value: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _few(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return shown + (f", ... (+{len(items) - _SHOW} more)" if len(items) > _SHOW else "")


def _first_line(error: BaseException, limit: int = 200) -> str:
    line = (str(error).strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."
