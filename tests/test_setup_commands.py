"""The README's two set-up commands and CI's are the same text: `.ci/run` runs the README's install-and-run command
and its test command verbatim, so a change to one that is not made to the other fails here, before a user finds
that the README's commands no longer work while CI stays green."""

from __future__ import annotations

import re
import shlex

from tests.conftest import REPO


def readme_setup_commands() -> list[str]:
    """The one-line ```bash blocks of the README's "## Set up" section, in order."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Set up\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```bash\n(.*?)^```$", section, re.MULTILINE | re.DOTALL)
    commands = [b.strip() for b in blocks]
    assert all("\n" not in c for c in commands), f"each set-up block is one command line: {commands}"
    return commands


def ci_setup_commands() -> list[str]:
    """The line after each ``# README set-up command N`` comment of .ci/run, in order."""
    lines = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    found = {}
    for i, line in enumerate(lines):
        match = re.match(r"#\s*README set-up command (\d+)", line.strip())
        if match:
            found[int(match[1])] = lines[i + 1].strip()
    return [found[k] for k in sorted(found)]


def test_readme_has_exactly_two_setup_commands() -> None:
    commands = readme_setup_commands()
    assert len(commands) == 2, commands
    install, tests = commands
    assert "kdpipe run examples/digits.yaml" in install and "-c constraints.txt" in install
    assert "pytest" in tests and "pytest" not in install


def test_ci_runs_the_readme_setup_commands_verbatim() -> None:
    assert ci_setup_commands() == readme_setup_commands()


def test_setup_makes_and_uses_its_own_virtualenv() -> None:
    """PEP 668 systems refuse a pip install into the system Python, and CI must not see packages left on the
    machine: the first command makes a plain virtualenv (no --system-site-packages), and both commands run that
    virtualenv's programs, not whatever is first on PATH."""
    install, tests = readme_setup_commands()
    steps = [shlex.split(part) for part in install.split("&&")]
    venv_step = steps[0]
    assert venv_step[:3] == ["python3", "-m", "venv"] and "--system-site-packages" not in venv_step, venv_step
    venv = venv_step[-1]
    assert all(step[0].startswith(f"{venv}/bin/") for step in steps[1:]), steps
    assert shlex.split(tests)[0] == f"{venv}/bin/python"
    assert f"/{venv}/" in (REPO / ".gitignore").read_text(encoding="utf-8").split(), "the virtualenv is not ignored"


def test_ci_fails_when_pytest_collects_nothing() -> None:
    text = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r'if \[ "\$status" -eq 5 \]; then\n(.*\n)*?\s*exit 1', text), "pytest exit 5 must fail CI"
