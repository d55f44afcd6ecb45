"""GitHub-flavoured Markdown tables: the one way kdpipe writes them (bench.md, the model card, its sections)."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence


def escape_cell(text: str) -> str:
    """A table cell's text: a pipe would end the cell and a newline the row."""
    return text.replace("|", "\\|").replace("\n", " ")


def table(header: Sequence[str], rows: Iterable[Sequence[str]], *, right: Collection[int] = ()) -> str:
    """The table's lines (no trailing newline); every cell is escaped, columns whose index is in ``right`` are
    right-aligned (numbers)."""
    rule = ["---:" if i in right else "---" for i in range(len(header))]
    lines = [header, rule, *rows]
    return "\n".join("| " + " | ".join(escape_cell(str(c)) for c in line) + " |" for line in lines)
