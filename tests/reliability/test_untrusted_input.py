"""Hostile input never runs code: pickles that would run a shell command (as a teacher checkpoint, a planted
training checkpoint, a planted data-cache file, fake CIFAR batches), YAML tags that construct Python objects (in
stages.yaml and in --set), and tar archives whose members would escape the dataset folder. Every payload here really
runs a command when unpickled the ordinary way (checked below); kdpipe refuses them, and the marker file the command
would create never appears."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import kdpipe.stages  # noqa: F401  (registers the stage types the config model is built from)
from kdpipe.config import DataConfig, load_config
from kdpipe.data import cache, create_splits
from kdpipe.distill.trainer import CHECKPOINT_FORMAT
from kdpipe.errors import ConfigError, DataError
from tests.reliability._support import (
    TEACHER_FROM_CHECKPOINT,
    TRAINED_STAGES,
    assert_consistent,
    assert_same_weights,
    error_lines,
    mentions,
    result_of,
    run_cli,
)


class ShellPayload:
    """Unpickling this runs ``touch <marker>``: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_the_payload_is_live(tmp_path: Path) -> None:
    """Control: the payload does run its command under a plain pickle.load, so its absence below means something."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(ShellPayload(marker)))
    assert marker.exists()


# --- checkpoints --------------------------------------------------------------------------------------------------


def _torch_zip(path: Path, marker: Path) -> None:
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}, "config": ShellPayload(marker)}, path)


def _legacy_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"state_dict": ShellPayload(marker)}, protocol=2))


EVIL_CHECKPOINTS: dict[str, tuple[str, Callable[[Path, Path], None], str]] = {
    "torch-zip": ("teacher.pt", _torch_zip, "was refused: loading it would import and run Python code"),
    "legacy-pickle": ("teacher.pth", _legacy_pickle, "was refused: loading it would import and run Python code"),
    "bin": ("teacher.bin", _torch_zip, "was refused: loading it would import and run Python code"),
    "ckpt": ("teacher.ckpt", _legacy_pickle, "was refused: loading it would import and run Python code"),
    "pickle-named-safetensors": ("teacher.safetensors", _legacy_pickle, "is not a valid safetensors file"),
}


@pytest.mark.parametrize("case", list(EVIL_CHECKPOINTS))
def test_code_executing_teacher_checkpoint_is_refused(tmp_path: Path, case: str) -> None:
    name, write, message = EVIL_CHECKPOINTS[case]
    marker = tmp_path / "pwned"
    write(tmp_path / name, marker)
    config = tmp_path / "stages.yaml"
    config.write_text(TEACHER_FROM_CHECKPOINT.format(checkpoint=name))
    code, output = run_cli("run", config, "--out", tmp_path / "run", cwd=tmp_path)
    assert code == 3, output[-3000:]
    (error,) = error_lines(output)
    assert str(tmp_path / name) in error and message in error
    assert "Traceback" not in output
    assert not marker.exists(), "the checkpoint's command ran"
    assert not (tmp_path / "run" / "teacher" / "result.json").exists()


def test_planted_training_checkpoint_is_not_unpickled(interrupted: Path, reference: Path, tmp_path: Path) -> None:
    """A last.pt swapped for a code-executing pickle (right format tag, valid CRCs) is ignored: training starts
    over, the command never runs, and the result is the reference's."""
    run_dir = tmp_path / "run"
    shutil.copytree(interrupted, run_dir)
    marker = tmp_path / "pwned"
    checkpoint = run_dir / "teacher" / "checkpoints" / "last.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "epoch": 1, "step": 0, "method": ShellPayload(marker)}, checkpoint)
    code, output = run_cli("run", reference.parent / "stages.yaml", "--out", run_dir, cwd=tmp_path)
    assert code == 0, output[-3000:]
    assert not marker.exists(), "the planted checkpoint's command ran"
    assert mentions(output, f"ignoring unreadable checkpoint {checkpoint}")
    assert result_of(run_dir, "teacher")["info"]["resumed_from"] is None
    for stage in TRAINED_STAGES:
        assert_same_weights(reference / stage / "model.safetensors", run_dir / stage / "model.safetensors")
    assert_consistent(run_dir)


def test_planted_data_cache_file_is_not_unpickled(tmp_path: Path) -> None:
    """The dataset cache (a shared folder) is read with weights_only: a planted file is rebuilt, not run."""
    marker = tmp_path / "pwned"
    source = tmp_path / "data.tar"
    key = {"kind": "imagefolder", "source": source, "variant": "size=8", "identity": "file:x"}
    path = cache.cache_path(tmp_path, **key)  # type: ignore[arg-type]
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": cache.CACHE_FORMAT, "key": "whatever", "data": ShellPayload(marker)}, path)
    built = cache.load_or_build(tmp_path, **key, build=lambda: {"images": torch.ones(2, 3)})  # type: ignore[arg-type]
    assert torch.equal(built["images"], torch.ones(2, 3))  # type: ignore[arg-type]
    assert not marker.exists()


def test_fake_cifar_batches_are_not_unpickled(tmp_path: Path) -> None:
    """kind: cifar10 reads torchvision's pickled batches, but only after their MD5s match the published ones."""
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"):
        (folder / name).write_bytes(pickle.dumps(ShellPayload(marker)))
    (folder / "batches.meta").write_bytes(pickle.dumps(ShellPayload(marker)))
    with pytest.raises(DataError, match="not found or corrupt"):
        create_splits(DataConfig(kind="cifar10", root=tmp_path / "cifar"), seed=0, base_dir=tmp_path)
    assert not marker.exists()


# --- YAML ---------------------------------------------------------------------------------------------------------

CONFIG = """\
version: 1
name: {name}
device: cpu
data: {{kind: synthetic, num_classes: 4, num_samples: 64, image_size: 8, augment: none}}
stages:
  verify: {{type: verify, min_top1: 0.0}}
"""

PYTHON_TAGS = {
    "object/apply": '!!python/object/apply:os.system ["touch {marker}"]',
    "object/new": '!!python/object/new:os.system ["touch {marker}"]',
    "name": "!!python/name:os.system",
    "module": "!!python/module:os",
    "object": "!!python/object:subprocess.Popen {{args: [touch, {marker}]}}",
    "local-tag": '!os.system ["touch {marker}"]',
}


@pytest.mark.parametrize("tag", list(PYTHON_TAGS))
def test_yaml_python_tags_are_refused_with_file_and_line(tmp_path: Path, tag: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "stages.yaml"
    path.write_text(CONFIG.format(name=PYTHON_TAGS[tag].format(marker=marker)))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}:2:"), str(info.value)
    assert "could not determine a constructor" in str(info.value)
    assert not marker.exists()


def test_yaml_tag_in_a_set_override_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "stages.yaml"
    path.write_text(CONFIG.format(name="safe"))
    with pytest.raises(ConfigError, match=r"--set"):
        load_config(path, [f"name=!!python/object/apply:os.system ['touch {marker}']"])
    assert not marker.exists()


def test_yaml_tag_exits_2_with_one_line_error(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "stages.yaml"
    path.write_text(CONFIG.format(name=PYTHON_TAGS["object/apply"].format(marker=marker)))
    code, output = run_cli("run", path, "--out", tmp_path / "run", cwd=tmp_path)
    assert code == 2, output
    assert output.startswith(f"error: {path}:2:") and "Traceback" not in output
    assert not marker.exists() and not (tmp_path / "run").exists()


# --- tar archives -------------------------------------------------------------------------------------------------


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 7, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _add_file(tar: tarfile.TarFile, name: str, **pax: str) -> None:
    data = _png()
    info = tarfile.TarInfo(name)
    info.size = len(data)
    if pax:
        info.pax_headers = dict(pax)
    tar.addfile(info, io.BytesIO(data))


def _add_special(tar: tarfile.TarFile, name: str, kind: bytes, linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    tar.addfile(info)


def _evil_archive(path: Path, add_bad: Callable[[tarfile.TarFile], None], fmt: int = tarfile.PAX_FORMAT) -> Path:
    """A valid train/test imagefolder archive (.tar or .tar.gz by suffix) with one hostile member at the end."""
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w", format=fmt) as tar:
        for split in ("train", "test"):
            for cls in ("a", "b"):
                for i in range(2):
                    _add_file(tar, f"{split}/{cls}/{i}.png")
        add_bad(tar)
    return path


# Cases tests/data/test_imagefolder.py does not already cover (absolute, '..', symlink, hardlink, devices, FIFO).
TAR_CASES: dict[str, tuple[Callable[[tarfile.TarFile], None], str]] = {
    "windows-drive": (lambda t: _add_file(t, "C:/Windows/evil.png"), "absolute path"),
    "backslash-absolute": (lambda t: _add_file(t, "\\evil.png"), "absolute path"),
    "backslash-dotdot": (lambda t: _add_file(t, "train\\a\\..\\..\\..\\escape.png"), r"'\.\.'"),
    "dot-slash-dotdot": (lambda t: _add_file(t, "./train/../../escape.png"), r"'\.\.'"),
    "pax-path-dotdot": (lambda t: _add_file(t, "train/a/ok.png", path="../../escape.png"), r"'\.\.'"),
    "gnu-longname-dotdot": (lambda t: _add_file(t, "train/" + "x" * 120 + "/../../../escape.png"), r"'\.\.'"),
    "symlinked-folder": (lambda t: _add_special(t, "train/c", tarfile.SYMTYPE, "/etc"), "link"),
    "hardlink-absolute": (lambda t: _add_special(t, "train/a/h.png", tarfile.LNKTYPE, "/etc/passwd"), "link"),
}


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
@pytest.mark.parametrize("case", list(TAR_CASES))
def test_hostile_tar_member_is_refused(tmp_path: Path, case: str, suffix: str) -> None:
    add_bad, reason = TAR_CASES[case]
    fmt = tarfile.GNU_FORMAT if case.startswith("gnu") else tarfile.PAX_FORMAT
    (tmp_path / "data").mkdir()
    archive = _evil_archive(tmp_path / "data" / f"evil{suffix}", add_bad, fmt)
    with pytest.raises(DataError, match=rf"archive .*evil{suffix} has an unsafe member .*{reason}"):
        create_splits(DataConfig(kind="imagefolder", root=archive, val_fraction=0.0), seed=0, base_dir=tmp_path)
    assert not (tmp_path / "escape.png").exists() and not (tmp_path / "data" / "escape.png").exists()


def test_hostile_archive_run_exits_3_before_writing(tmp_path: Path) -> None:
    archive = _evil_archive(tmp_path / "evil.tar.gz", lambda t: _add_file(t, "train/../../escape.png"))
    config = tmp_path / "stages.yaml"
    config.write_text(
        TEACHER_FROM_CHECKPOINT.replace("{{checkpoint: {checkpoint}}}", "{{train: {{epochs: 1, batch_size: 2}}}}")
        .replace("kind: synthetic, num_classes: 4, num_samples: 64,", f"kind: imagefolder, root: {archive.name},")
        .format()
    )
    code, output = run_cli("run", config, "--out", tmp_path / "run", cwd=tmp_path)
    assert code == 3, output
    (error,) = error_lines(output)
    assert str(archive) in error and "'train/../../escape.png'" in error and "'..' path component" in error
    assert not (tmp_path.parent / "escape.png").exists()
    written = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert written == [".kdpipe.pid"], f"the run directory was written before the data check: {written}"
