"""Property-based fuzzing of the config loader: random YAML documents, random mutations of a valid stages.yaml
(keys dropped, renamed, duplicated; values of the wrong type, huge, unicode, deeply nested; non-mapping top
levels), hostile YAML snippets spliced into it, random text and random bytes, and random ``--set`` overrides.
``load_config`` must return a valid config or raise ConfigError whose every line names the file (and the line, for
anything inside the file); never another exception, never a hang. A fast variant runs by default, the long one
(2,500 documents and 1,000 overrides) with --runslow."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kdpipe.stages  # noqa: F401  (registers the stage types the config model is built from)
from kdpipe.config import load_config
from kdpipe.errors import ConfigError

VALID = """\
version: 1
name: fuzz
seed: 0
device: cpu
data: {kind: synthetic, num_classes: 4, num_samples: 64, image_size: 8, augment: none, val_fraction: 0.0}
stages:
  teacher:
    type: teacher
    model: resnet8
    weights: {train: {epochs: 1, batch_size: 32, lr: 0.05, schedule: {name: step, milestones: [1]}}}
  distill:
    type: distill
    student: resnet8
    method: {name: dkd, alpha: 1.0, beta: 8.0, temperature: 4.0}
    train: {epochs: 1, batch_size: 32}
  verify:
    type: verify
    min_top1: 0.0
  onnx:
    type: export
    format: onnx-int8
    parity: {min_agreement: 0.9}
  bench:
    type: benchmark
    backends: [torch, onnxruntime]
    batch_sizes: [1, 8]
    needs: [onnx]
  card:
    type: model_card
"""
BASE: dict[str, Any] = yaml.safe_load(VALID)
KEYS = sorted({"version", "name", "seed", "device", "data", "stages", "type", "model", "weights", "train", "epochs"})

# Snippets a hostile or careless author might write; spliced into the valid file at random lines.
HOSTILE = {
    "python-apply": '!!python/object/apply:os.system ["touch /tmp/kdpipe-fuzz-pwned"]',
    "python-name": "!!python/name:os.system",
    "list-key": "? [a, b]\n: 1",
    "map-key": "? {a: 1}\n: 2",
    "alias": "a: &x [1, 2]\nb: *x",
    "alias-bomb-8x6": "a: &a [x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b]\n"
    "d: &d [*c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e]",
    "alias-bomb-9x9": "a: &a [x, x, x, x, x, x, x, x, x]\n"
    + "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))
    + "j: [*i, *i]",
    "recursive-list": "a: &a [*a]",
    "recursive-map": "a: &a {b: *a}",
    "deep-block-list": "x: " + "\n".join("  " * i + "- " for i in range(150)) + "1",
    "merge-key": "<<: {seed: 3}",
    "huge-int": "seed: " + "9" * 5000,
    "huge-hex": "seed: 0x" + "f" * 5000,
    "huge-float": "seed: 1e999999",
    "bad-date": "seed: 2001-13-45",
    "bad-timestamp": "name: 2001-02-30 25:61:61",
    "deep-flow-list": "x: " + "[" * 3000 + "]" * 3000,
    "deep-flow-map": "x: " + "{a: " * 500 + "1" + "}" * 500,
    "nested-dashes": "- - - - - -",
    "tab": "\t- tab",
    "unterminated": "'unterminated",
    "directive": "%YAML 1.1\n---",
    "set-document": "--- !!set {a, b}",
    "document-end": "...",
    "bad-binary": "!!binary |\n  ====",
    "unicode-keys": "名前: 値\n😀: '\U0001f600'",
    "bom": "\ufeffname: bom",
    "nel": "key: \x85next",
    "bare-anchor": "&anchor",
    "undefined-alias": "*undefined_alias",
    "omap-duplicates": "!!omap [a: 1, a: 2]",
    "pairs": "!!pairs [a: 1]",
    "nan": "seed: !!float nan",
    "inf": "seed: .inf",
    "minus-inf": "seed: -.inf",
    "tagged-int": "version: !!int '1'",
}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**80), max_value=10**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["resnet8", "kd", "dkd", "teacher", "distill", "export", "onnx", "cpu", "cuda:7", "", "~", "null"]),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=16,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            out += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _paths(value, (*prefix, i))
    return out


def _parent(doc: Any, path: tuple[Any, ...]) -> Any:
    for part in path[:-1]:
        doc = doc[part]
    return doc


@st.composite
def mutated_config(draw: st.DrawFn) -> str:
    """The valid config with 1-4 structural mutations, dumped as YAML (or JSON, which is YAML too)."""
    doc: Any = json.loads(json.dumps(BASE))
    for _ in range(draw(st.integers(1, 4))):
        paths = [p for p in _paths(doc) if p]
        op = draw(st.sampled_from(["drop", "rename", "replace", "nest", "top"]))
        if op == "top":
            doc = draw(st.one_of(values, st.lists(st.just(doc), max_size=2)))
            continue
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = _parent(doc, path)
        key = path[-1]
        if op == "drop":
            del parent[key]
        elif op == "rename" and isinstance(parent, dict):
            new = draw(st.sampled_from([f"{key}x", str(key)[:-1], str(key).upper(), "stages"]) | st.text(max_size=8))
            parent[new] = parent.pop(key)
        elif op == "replace":
            parent[key] = draw(values)
        elif op == "nest":
            value = parent[key]
            for _ in range(draw(st.integers(1, 40))):
                value = draw(st.sampled_from([[value], {"x": value}]))
            parent[key] = value
    if draw(st.booleans()):
        return json.dumps(doc, ensure_ascii=draw(st.booleans()))
    return yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)


@st.composite
def spliced_text(draw: st.DrawFn) -> str:
    """The valid file's text with hostile snippets, duplicated or deleted lines, a truncation or a changed char."""
    lines = VALID.splitlines()
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["insert", "duplicate", "delete", "truncate", "char"]))
        i = draw(st.integers(0, len(lines) - 1)) if lines else 0
        if op == "insert":
            indent = " " * draw(st.sampled_from([0, 2, 4, 6]))
            snippet = draw(st.sampled_from(list(HOSTILE.values())))
            lines[i:i] = [indent + s for s in snippet.splitlines()]
        elif op == "duplicate" and lines:
            lines.insert(i, lines[i])
        elif op == "delete" and lines:
            del lines[i]
        elif op == "truncate" and lines:
            text = "\n".join(lines)
            lines = text[: draw(st.integers(0, len(text)))].splitlines()
        elif op == "char" and lines and lines[i]:
            j = draw(st.integers(0, len(lines[i]) - 1))
            ch = draw(st.characters(codec="utf-8"))
            lines[i] = lines[i][:j] + ch + lines[i][j + 1 :]
    return "\n".join(lines) + "\n"


random_yaml = values.map(lambda v: yaml.safe_dump(v, allow_unicode=True))
random_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=300)
documents = st.one_of(
    mutated_config(),
    mutated_config(),
    spliced_text(),
    spliced_text(),
    random_yaml,
    random_text,
    st.binary(max_size=200),
)

WHOLE_FILE = ("the file is empty", "cannot read the file", "YAML error")


def assert_loads_or_located_error(path: Path, content: str | bytes, overrides: list[str] | None = None) -> None:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    start = time.perf_counter()
    try:
        load_config(path, overrides or [])
    except ConfigError as exc:
        first, *more = str(exc).splitlines()
        if overrides and first.startswith("--set "):
            return  # an override's own error names the override (its YAML error may follow on more lines)
        # the first line, and every further problem of a validation error, name the file and the line
        for line in [first, *(m for m in more if m.startswith(str(path)))]:
            assert line.startswith(str(path)), f"error without the file: {line!r}"
            rest = line[len(str(path)) :]
            assert re.match(r":\d+", rest) or any(w in rest for w in WHOLE_FILE), f"error without a line: {line!r}"
    assert time.perf_counter() - start < 10, "the config loader took over 10 s"


@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "stages.yaml"


def test_the_base_config_is_valid(fuzz_file: Path) -> None:
    """The mutations start from a config that loads, so each error they get is the mutation's."""
    fuzz_file.write_text(VALID)
    assert load_config(fuzz_file).config.name == "fuzz"


FAST = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
LONG = settings(
    max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


@FAST
@given(content=documents)
def test_fuzz_config_documents(fuzz_file: Path, content: str | bytes) -> None:
    assert_loads_or_located_error(fuzz_file, content)


@pytest.mark.slow
@LONG
@given(content=documents)
def test_fuzz_config_documents_long(fuzz_file: Path, content: str | bytes) -> None:
    assert_loads_or_located_error(fuzz_file, content)


set_keys = st.lists(
    st.sampled_from(["stages", "distill", "train", "epochs", "data", "seed", "name", "x"]) | st.text(max_size=5),
    max_size=5,
).map(".".join)
set_values = st.one_of(st.sampled_from(list(HOSTILE.values())), random_yaml.map(lambda s: s.strip()), random_text)
overrides = st.lists(
    st.builds(lambda k, v, eq: f"{k}{'=' if eq else ''}{v}", set_keys, set_values, st.booleans()),
    min_size=1,
    max_size=3,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sets=overrides)
def test_fuzz_set_overrides(fuzz_file: Path, sets: list[str]) -> None:
    assert_loads_or_located_error(fuzz_file, VALID, sets)


@pytest.mark.slow
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sets=overrides)
def test_fuzz_set_overrides_long(fuzz_file: Path, sets: list[str]) -> None:
    assert_loads_or_located_error(fuzz_file, VALID, sets)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_each_hostile_snippet(fuzz_file: Path, name: str) -> None:
    """Every snippet, at the top level and inside a stage (deterministic, so a regression names its snippet)."""
    snippet = HOSTILE[name]
    assert_loads_or_located_error(fuzz_file, snippet + "\n" + VALID)
    assert_loads_or_located_error(
        fuzz_file,
        VALID.replace("    min_top1: 0.0\n", "    min_top1: 0.0\n    " + snippet.replace("\n", "\n    ") + "\n"),
    )
    assert not Path("/tmp/kdpipe-fuzz-pwned").exists()


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("backends: [torch, onnxruntime]", "backends: [0orch, onnxruntime]", "stages.bench.backends"),
        ("student: resnet8", "student: resnet9", "stages.distill.student"),
        ("name: dkd,", "name: dkdd,", "stages.distill.method"),
        ("format: onnx-int8", "format: onnx-int4", "stages.onnx.format"),
        ("device: cpu", "device: [cpu]", "device"),
    ],
    ids=["backend", "model", "method", "format", "device-type"],
)
def test_registry_name_errors_are_located(fuzz_file: Path, old: str, new: str, field: str) -> None:
    """Names checked against a registry (backends, models, methods, formats) fail at their file:line and field."""
    assert_loads_or_located_error(fuzz_file, VALID.replace(old, new))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(fuzz_file))}:\d+: {re.escape(field)}"):
        load_config(fuzz_file)
