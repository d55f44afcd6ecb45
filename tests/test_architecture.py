"""The import layout (pyproject's [tool.importlinter] contracts): layers, no import circles, training and export
independent. A new module that imports upward or closes a circle fails here with the offending import chain."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("importlinter") is None, reason="import-linter is a dev dependency")
def test_import_contracts_are_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "3 kept, 0 broken" in done.stdout


def test_every_error_type_exits_with_a_code_the_table_names() -> None:
    """kdpipe.errors.EXIT_CODES is the one exit-code table (summary.json's status, the README's list): an error type
    with a code outside it would end a run with a status nobody documents."""
    import kdpipe.errors as errors

    def subclasses(cls: type) -> list[type]:
        return [cls, *(s for sub in cls.__subclasses__() for s in subclasses(sub))]

    codes = {cls.__name__: cls.exit_code for cls in subclasses(errors.KdpipeError)}
    assert len(codes) >= 6 and set(codes.values()) <= set(errors.EXIT_CODES), codes
    assert errors.status_of(4) == "gate_failed" and errors.status_of(130) == "interrupted"
    assert errors.status_of(1) == "failed"  # a crash outside kdpipe's own errors
