"""One generic registry for everything kdpipe looks up by name: KD methods, stage types, export formats,
benchmark backends. Unknown names raise a ConfigError that lists the choices and suggests the nearest one."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from kdpipe.errors import ConfigError

T = TypeVar("T")


def suggest(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """Return ' (did you mean 'x'?)' for the closest of ``choices`` to ``name``, or '' when none is close. A choice
    that differs only by look-alike characters (``l``/``1``, ``O``/``0``: ``min_topl``) wins over closer spellings."""
    alike = [c for c in choices if _lookalike(c) == _lookalike(str(name))]
    if alike:
        return f" (did you mean '{alike[0]}'?)"
    close = difflib.get_close_matches(str(name).lower(), [c.lower() for c in choices], n=1, cutoff=0.6)
    if not close:
        return ""
    original = next(c for c in choices if c.lower() == close[0])
    return f" (did you mean '{original}'?)"


_LOOKALIKE = str.maketrans({"l": "1", "i": "1", "|": "1", "o": "0"})


def _lookalike(text: str) -> str:
    return text.lower().translate(_LOOKALIKE)


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered object with its name, one-line summary and free-form frozen metadata."""

    name: str
    obj: T
    summary: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """Name -> object mapping with did-you-mean errors. ``kind`` is used in messages ("KD method", "stage type")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        self.generation = 0
        """Bumped by every change, so that models built from the entries (the config unions) know to rebuild."""

    def register(self, name: str, *, summary: str = "", **meta: Any) -> Callable[[T], T]:
        """Decorator: ``@METHODS.register("kd", summary="...")``. Registering a name twice is a programming error."""

        def deco(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            doc = summary or ((getattr(obj, "__doc__", None) or "").strip().splitlines() or [""])[0]
            self._entries[name] = Entry(name=name, obj=obj, summary=doc, meta=dict(meta))
            self.generation += 1
            return obj

        return deco

    def get(self, name: str) -> T:
        return self.get_entry(name).obj

    def get_entry(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            names = self.names()
            raise ConfigError(
                f"unknown {self.kind} {name!r}{suggest(name, names)}; choose one of: {', '.join(names)}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def in_registration_order(self) -> list[Entry[T]]:
        """Entries in the order they were registered (built-ins first, then plugins): where the first match is a
        default, e.g. the backend ``kdpipe bench`` picks for a file."""
        return list(self._entries.values())

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for a plugin's tests, which register and remove their objects)."""
        self.get_entry(name)
        del self._entries[name]
        self.generation += 1

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries[n] for n in self.names())

    def __len__(self) -> int:
        return len(self._entries)


# The registries kdpipe looks names up in. Entries are added where the things are defined (a stage file, a KD method
# file) by ``@STAGES.register(...)`` etc.; importing ``kdpipe.stages`` populates all of them.
STAGES: Registry[Any] = Registry("stage type")
METHODS: Registry[Any] = Registry("KD method")
FORMATS: Registry[Any] = Registry("export format")
BACKENDS: Registry[Any] = Registry("benchmark backend")
