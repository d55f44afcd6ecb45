"""No config string reaches code execution. Every call in kdpipe's source that can run code chosen at run time
(eval/exec/compile, dynamic imports, shells and subprocesses, unpickling, unsafe YAML, TorchScript) is found by
walking the syntax tree, and each must be on the allow-list below with the reason it cannot be steered by a
stages.yaml, a --set override or a data file. A new one fails this test until it is reviewed and listed here."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[2] / "kdpipe"

# Calls that are never acceptable, whatever the arguments.
FORBIDDEN = {"eval", "exec", "compile", "__import__", "breakpoint", "os.system", "os.popen", "pty.spawn"}
FORBIDDEN_PREFIXES = ("os.exec", "os.spawn", "os.posix_spawn", "runpy.", "marshal.load", "shelve.", "dill.")
# Calls that are acceptable only where listed in ALLOWED.
REVIEWED = {"importlib.import_module", "import_module", "pickle.load", "pickle.loads", "torch.jit.load"}
REVIEWED_PREFIXES = ("subprocess.",)
SAFE_YAML_LOADERS = {"_SafeLineLoader", "yaml.SafeLoader", "yaml.CSafeLoader"}

# (file relative to kdpipe/, call) -> why no config value can steer it.
ALLOWED: dict[tuple[str, str], str] = {
    (
        "environment.py",
        "subprocess.run",
    ): "git rev-parse HEAD / git status with fixed argv lists, no shell, cwd = kdpipe's own folder",
    (
        "plugins.py",
        "importlib.import_module",
    ): "import_all imports the modules pkgutil lists in kdpipe's own method and stage packages, never a config value",
    (
        "data/sources.py",
        "importlib.import_module",
    ): "module names come from the constant _LOADERS table; data.kind is a Literal validated before",
    (
        "exports/runtime.py",
        "importlib.import_module",
    ): "require_module(name): every caller passes a string literal (checked below)",
    (
        "doctor.py",
        "importlib.import_module",
    ): "`kdpipe doctor` imports the packages named in its constant _CORE/_EXPORT tables to report their versions",
    (
        "bench/standalone.py",
        "torch.jit.load",
    ): "`kdpipe bench MODEL` on a file the user names on the command line, not a config value; TorchScript runs in the TorchScript interpreter, not as a Python pickle",
}


@dataclass(frozen=True)
class Finding:
    file: str
    line: int
    call: str
    problem: str

    def __str__(self) -> str:
        return f"kdpipe/{self.file}:{self.line}: {self.call}: {self.problem}"


def dotted(node: ast.expr) -> str:
    """``a.b.c`` of a call's function, or "" when it is not a plain (dotted) name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def audit(source: str, file: str) -> list[Finding]:
    """Every risky call in ``source`` (one module) that is not acceptable by its own arguments."""
    findings: list[Finding] = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        line = node.lineno

        def add(problem: str, name: str = name, line: int = line) -> None:
            findings.append(Finding(file, line, name, problem))

        if name in FORBIDDEN or name.startswith(FORBIDDEN_PREFIXES):
            add("runs code or a shell chosen at run time")
        elif name in REVIEWED or name.startswith(REVIEWED_PREFIXES):
            shell = _keyword(node, "shell")
            if shell is not None and not _is_const(shell, False):
                add("subprocess with shell=True")
            else:
                add("needs review")
        elif name == "torch.load" and not _is_const(_keyword(node, "weights_only"), True):
            add("torch.load without weights_only=True unpickles arbitrary objects")
        elif (
            name in ("yaml.load", "yaml.load_all")
            and dotted(_keyword(node, "Loader") or ast.Constant(None)) not in SAFE_YAML_LOADERS
        ):
            add("yaml.load with a loader that may construct Python objects")
        elif name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"):
            add("unsafe YAML loader")
        elif (
            name in ("np.load", "numpy.load")
            and not _is_const(_keyword(node, "allow_pickle"), False)
            and _keyword(node, "allow_pickle") is not None
        ):
            add("np.load with allow_pickle")
        elif name == "require_module" and not (node.args and isinstance(node.args[0], ast.Constant)):
            add("require_module with a computed module name")
    return findings


def _source_findings() -> list[Finding]:
    out: list[Finding] = []
    for path in sorted(SOURCE.rglob("*.py")):
        out.extend(audit(path.read_text(encoding="utf-8"), str(path.relative_to(SOURCE))))
    return out


def test_every_code_execution_sink_is_reviewed() -> None:
    unreviewed = [f for f in _source_findings() if (f.file, f.call) not in ALLOWED or f.problem != "needs review"]
    assert not unreviewed, "calls that could run code chosen at run time:\n" + "\n".join(map(str, unreviewed))


def test_allow_list_entries_have_reasons() -> None:
    assert all(len(reason) > 20 for reason in ALLOWED.values())


@pytest.mark.parametrize(
    ("snippet", "problem"),
    [
        ("eval(cfg.expr)", "runs code"),
        ("exec(text)", "runs code"),
        ("__import__(name)", "runs code"),
        ("os.system(cmd)", "runs code"),
        ("os.execvp(a, b)", "runs code"),
        ("subprocess.run(cmd, shell=True)", "shell=True"),
        ("subprocess.Popen(cmd, shell=flag)", "shell=True"),
        ("subprocess.check_output(['ls'])", "needs review"),
        ("importlib.import_module(cfg.plugin)", "needs review"),
        ("pickle.loads(blob)", "needs review"),
        ("torch.load(path)", "weights_only"),
        ("torch.load(path, weights_only=False)", "weights_only"),
        ("yaml.load(text, Loader=yaml.Loader)", "construct Python objects"),
        ("yaml.load(text)", "construct Python objects"),
        ("yaml.unsafe_load(text)", "unsafe YAML"),
        ("np.load(path, allow_pickle=True)", "allow_pickle"),
        ("require_module(cfg.backend)", "computed module name"),
    ],
)
def test_audit_finds_each_kind_of_sink(snippet: str, problem: str) -> None:
    """The audit itself: each risky pattern is reported (so an empty report above means something)."""
    (finding,) = audit(snippet, "example.py")
    assert problem in finding.problem


@pytest.mark.parametrize(
    "snippet",
    [
        "torch.load(path, map_location='cpu', weights_only=True)",
        "yaml.load(text, Loader=_SafeLineLoader)",
        "yaml.safe_load(text)",
        "re.compile(pattern)",
        "model.compile(mode='default')",
        "np.load(path)",
        "require_module('onnx')",
    ],
)
def test_audit_accepts_safe_calls(snippet: str) -> None:
    assert audit(snippet, "example.py") == []
