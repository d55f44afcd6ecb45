"""Config overrides: ``--set key.path=value`` on the command line, and ``KDPIPE_SET_<PATH>=value`` in the
environment for orchestrators that configure a container through its variables.

An environment override names its key path after the prefix with ``__`` (two underscores) between keys, and the
path is lower-cased: ``KDPIPE_SET_STAGES__DISTILL__TRAIN__EPOCHS=3`` is ``--set stages.distill.train.epochs=3``.
Because variable names are conventionally upper-case and cannot hold ``-``, each key of the path also matches an
existing key of the stages.yaml that differs only in case or in ``-`` for ``_`` (a stage named ``Distill-Fast`` is
reached by ``KDPIPE_SET_STAGES__DISTILL_FAST__...``). Values are YAML, as with ``--set``. Environment overrides are
applied first, in the order of their variable names, then the command line's, so ``--set`` wins. Every error names
the variable (or the ``--set`` argument) it came from.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from kdpipe.errors import ConfigError
from kdpipe.yamlio import load_value

ENV_PREFIX = "KDPIPE_SET_"
_ENV_EXAMPLE = "e.g. KDPIPE_SET_STAGES__DISTILL__TRAIN__EPOCHS=3"


@dataclass(frozen=True)
class Override:
    """One assignment of a config value, with where it came from (for error messages)."""

    parts: tuple[str, ...]
    """The key path, e.g. ("stages", "distill", "train", "epochs")."""
    value: str
    """The value as written (parsed as YAML when applied)."""
    source: str
    """How the user wrote it: ``--set 'a.b=1'`` or the environment variable's name."""
    fold_case: bool = False
    """Match existing keys ignoring case and ``-`` vs ``_`` (environment variables)."""


def parse_set(assignment: str) -> Override:
    """An override from a ``--set key.path=value`` argument."""
    source = f"--set {assignment!r}"
    if "=" not in assignment:
        raise ConfigError(f"{source}: expected key.path=value, e.g. --set stages.distill.train.epochs=5")
    key, _, value = assignment.partition("=")
    parts = tuple(p for p in key.strip().split(".") if p)
    if not parts:
        raise ConfigError(f"{source}: the key is empty")
    return Override(parts, value, source)


def from_env(environ: Mapping[str, str]) -> list[Override]:
    """The ``KDPIPE_SET_*`` overrides in ``environ``, sorted by variable name."""
    overrides = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :]
        parts = tuple(rest.lower().split("__"))
        if not rest or any(not p for p in parts):
            raise ConfigError(
                f"{name}: not a key path; name the keys after {ENV_PREFIX} with __ between them, {_ENV_EXAMPLE}"
            )
        overrides.append(Override(parts, environ[name], name, fold_case=True))
    return overrides


def _match_key(node: dict[str, Any], part: str, fold_case: bool) -> str:
    if part in node or not fold_case:
        return part
    matches = [k for k in node if isinstance(k, str) and k.lower().replace("-", "_") == part.replace("-", "_")]
    return matches[0] if len(matches) == 1 else part


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's problem and column, without its ``in "<unicode string>"`` excerpt (the value is one line)."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if not problem:
        return str(exc).splitlines()[0]
    return f"{problem} at character {mark.column + 1}" if mark is not None else str(problem)


def apply_override(data: dict[str, Any], override: Override | str) -> tuple[str, ...]:
    """Apply one override to the parsed YAML in place; return the key path it set (with the file's spelling)."""
    if isinstance(override, str):
        override = parse_set(override)
    try:
        value = load_value(override.value)
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"{override.source}: the value {override.value!r} is not valid YAML: {_yaml_problem(exc)}",
            hint="a YAML list is [a, b], a mapping {k: v}; quote a plain string that holds YAML characters "
            "(--set 'key=\"text: with colon\"')",
        ) from exc
    node: Any = data
    path: list[str] = []
    for part in override.parts[:-1]:
        key: Any = _list_index(node, part, path, override) if isinstance(node, list) else None
        if key is None:
            key = _match_key(node, part, override.fold_case)
            nxt = node.get(key)
            if nxt is None:
                nxt = node[key] = {}
        else:
            nxt = node[key]
        path.append(str(key))
        if not isinstance(nxt, (dict, list)):
            raise ConfigError(f"{override.source}: {'.'.join(path)} is a value, not a mapping or a list")
        node = nxt
    part = override.parts[-1]
    if isinstance(node, list):
        index = _list_index(node, part, path, override)
        node[index] = value
        return (*path, str(index))
    last = _match_key(node, part, override.fold_case)
    node[last] = value
    return (*path, last)


def _list_index(node: list[Any], part: str, path: list[str], override: Override) -> int:
    """``part`` as an index into the list at ``path`` (``stages.sweep.methods.1.temperature``)."""
    if not part.isdigit() or int(part) >= len(node):
        where, size = ".".join(path), len(node)
        raise ConfigError(f"{override.source}: {where} is a list of {size}; {part!r} is not an index (0 to {size - 1})")
    return int(part)


def source_of(loc: tuple[str | int, ...], applied: Iterable[tuple[tuple[str, ...], str]]) -> str | None:
    """The source of the last applied override that set ``loc`` or a mapping above it. A validation error's
    location may hold tags pydantic inserts (a stage's type), so the override's keys must appear in order in it."""
    found = None
    for keys, source in applied:
        it = iter(str(p) for p in loc)
        if loc and str(loc[0]) == keys[0] and all(any(k == p for p in it) for k in keys):
            found = source
    return found


def flatten(value: Mapping[str, Any], sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of key paths, the inverse of what :func:`apply_override` walks:
    ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; an empty mapping stays a value."""
    out: dict[str, Any] = {}
    for key, item in value.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(item, Mapping) and item:
            out.update(flatten(item, sep, name))
        else:
            out[name] = item
    return out
