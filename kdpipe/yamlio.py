"""YAML reading for stages.yaml and overrides: a safe loader that refuses duplicate keys, and the line of every key
(so a config error can name ``file:line``)."""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml

from kdpipe.errors import ConfigError

Lines = dict[tuple[str | int, ...], int]
"""Location of a key (as a tuple of keys and list indices) -> its 1-based line in the file."""


MAX_DEPTH = 100
"""Deepest nesting of lists and mappings accepted (a stages.yaml needs about 6); deeper input would exhaust
Python's recursion limit in the composer and constructor."""


class _SafeLineLoader(yaml.SafeLoader):
    """SafeLoader (no object-constructing tags) that refuses duplicate keys and too deep nesting, and reports a value
    it cannot build (an integer past Python's digit limit, a date like 2001-13-45) as a YAML error at its place."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_DEPTH} levels deep", self.peek_event().start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError) as exc:
            raise yaml.constructor.ConstructorError(None, None, f"invalid value: {exc}", node.start_mark) from exc


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, Hashable):
            raise yaml.constructor.ConstructorError(
                None, None, f"a {type(key).__name__} cannot be a mapping key", key_node.start_mark
            )
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_SafeLineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _collect_lines(node: yaml.Node, prefix: tuple[str | int, ...], out: Lines, seen: set[int] | None = None) -> None:
    out[prefix] = node.start_mark.line + 1
    # An alias is the anchored node itself: walk it once, or aliases of aliases (a "billion laughs" file, or an
    # anchor that contains itself) take exponential or endless time.
    seen = set() if seen is None else seen
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            out[(*prefix, key)] = key_node.start_mark.line + 1
            _collect_lines(value_node, (*prefix, key), out, seen)
            out[(*prefix, key)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _collect_lines(item, (*prefix, i), out, seen)


def lookup_line(lines: Lines, loc: tuple[str | int, ...]) -> int | None:
    """Line of the deepest prefix of ``loc`` present in the file. Elements that are not keys (a discriminated
    union's tag that pydantic inserts into locations) are skipped."""
    best: int | None = lines.get(())
    path: tuple[str | int, ...] = ()
    for part in loc:
        candidate = (*path, part)
        if candidate in lines:
            path = candidate
            best = lines[candidate]
    return best


def parse_yaml(text: str, path: Path) -> tuple[dict[str, Any], Lines]:
    """Parse a stages.yaml safely; returns the mapping and a location -> line map."""
    if not text.strip():
        raise ConfigError(f"{path}: the file is empty", hint="start from examples/digits.yaml")
    try:
        node = yaml.compose(text, Loader=_SafeLineLoader)
        data = yaml.load(text, Loader=_SafeLineLoader)
    except yaml.reader.ReaderError as exc:  # a character YAML forbids: name its line, not "<unicode string>"
        line = text.count("\n", 0, exc.position) + 1
        char = chr(exc.character) if isinstance(exc.character, int) else exc.character
        raise ConfigError(f"{path}:{line}: YAML error: the character {char!r} is not allowed in YAML") from exc
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = " ".join(p for p in (exc.context, exc.problem) if p)
        raise ConfigError(f"{where}: YAML syntax error: {what}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: YAML error: {exc}") from exc
    if node is None or data is None:
        raise ConfigError(f"{path}: the file is empty", hint="start from examples/digits.yaml")
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError(f"{path}:1: the top level must be a mapping (version, name, data, stages), not a {kind}")
    lines: Lines = {}
    _collect_lines(node, (), lines)
    return data, lines


def load_value(text: str) -> Any:
    """One YAML value (a scalar, or a flow list/mapping) with the same safe loader; raises yaml.YAMLError."""
    return yaml.load(text, Loader=_SafeLineLoader)
