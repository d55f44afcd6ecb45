"""The layer search of parity-gated mixed precision (kdpipe.exports.formats.mixed_precision), on a scripted graph
family: each "graph" file records which layers it keeps in float, and a table says which images each such graph gets
wrong. The real ONNX path is exercised end to end in tests/stages (test_deploy_stages, test_qad)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from kdpipe.exports import formats
from kdpipe.exports import quantize as quantize_mod

LAYERS = ["a", "b", "c", "d"]
IMAGES = 10


def _scripted(monkeypatch: pytest.MonkeyPatch, wrong: dict[frozenset[str], set[int]]) -> None:
    """``wrong[float layers]``: the images that graph gets wrong (a set not listed gets the all-int8 graph's)."""

    def top1(path: Path, images: np.ndarray) -> np.ndarray:
        pred = np.zeros(len(images), dtype=np.int64)
        if path.name == "fp32.onnx":
            return pred
        kept = frozenset(json.loads(path.read_text()))
        for i in wrong.get(kept, wrong[frozenset()]):
            pred[i] = 1
        return pred

    monkeypatch.setattr(formats, "_top1", top1)
    monkeypatch.setattr(quantize_mod, "quantizable_nodes", lambda _path: list(LAYERS))


def _quantize(path: Path, float_nodes: Sequence[str]) -> Path:
    path.write_text(json.dumps(sorted(float_nodes)))
    return path


def _run(tmp_path: Path, budget: int, min_agreement: float) -> tuple[dict, list[str]]:
    fp32 = tmp_path / "fp32.onnx"
    fp32.write_text("fp32")
    out = _quantize(tmp_path / "model.onnx", [])
    record = formats.mixed_precision(fp32, out, _quantize, np.zeros((IMAGES, 1)), budget, min_agreement)
    return record, json.loads(out.read_text())


def test_a_layer_that_undoes_an_earlier_fix_is_not_kept(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """a and b each fix one image alone but break both together; c fixes the other alone. The search keeps a, skips
    b, keeps c: a plain prefix of the ranking (a, b) would have ended below the all-int8 graph's agreement."""
    _scripted(
        monkeypatch,
        {
            frozenset(): {0, 1, 2},
            frozenset("a"): {1, 2},
            frozenset("b"): {0, 2},
            frozenset("c"): {0, 1},
            frozenset("ab"): {0, 1, 2, 3},
            frozenset("ac"): {1},
            frozenset("abc"): {0, 1, 2, 3},
        },
    )
    record, written = _run(tmp_path, budget=3, min_agreement=0.9)
    assert record["agreement_int8"] == 0.7
    assert record["float_layers"] == ["a", "c"] == written
    assert record["agreement_mixed"] == 0.9
    assert (tmp_path / formats.ALL_INT8).exists() and not (tmp_path / "mixed.trial.onnx").exists()


def test_the_budget_bounds_the_layers_kept(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _scripted(
        monkeypatch,
        {frozenset(): {0, 1, 2}, frozenset("a"): {1, 2}, frozenset("b"): {0, 2}, frozenset("ab"): {2}},
    )
    record, written = _run(tmp_path, budget=1, min_agreement=1.0)
    assert record["float_layers"] == ["a"] == written and record["agreement_mixed"] == 0.8


def test_no_layer_that_helps_leaves_the_all_int8_graph(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _scripted(monkeypatch, {frozenset(): {0, 1}})
    record, written = _run(tmp_path, budget=4, min_agreement=1.0)
    assert record["float_layers"] == [] == written and record["agreement_mixed"] == record["agreement_int8"] == 0.8


def test_a_graph_that_meets_the_gate_is_left_alone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _scripted(monkeypatch, {frozenset(): {0}})
    record, _ = _run(tmp_path, budget=4, min_agreement=0.9)
    assert record["float_layers"] == [] and "ranking" not in record and not (tmp_path / formats.ALL_INT8).exists()
