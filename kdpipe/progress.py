"""A minimal progress interface so library code (trainer, exporters) reports progress without depending on
a terminal library. The CLI passes a rich-backed implementation; tests and library users get the silent one."""

from __future__ import annotations

from typing import Protocol


class ProgressTask(Protocol):
    def advance(self, n: int = 1, **fields: object) -> None: ...

    def close(self) -> None: ...


class Progress(Protocol):
    def task(self, description: str, total: int | None) -> ProgressTask: ...


class _NullTask:
    def advance(self, n: int = 1, **fields: object) -> None:
        pass

    def close(self) -> None:
        pass


class NullProgress:
    """Reports nothing."""

    def task(self, description: str, total: int | None) -> ProgressTask:
        return _NullTask()
