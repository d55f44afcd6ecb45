"""``Acceptance``: the state the parts share. The arguments and the time budget, subprocesses run inside it, the
run's data (decoded once, then resident on the device), the images parity and calibration draw, and the student that
the onnxruntime and TensorRT parts export."""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .core import REPO, Command, OutOfTime, PartRecord
from .sizes import DRY_SIZES, GPU_SIZES, SEED, resolve_data

if TYPE_CHECKING:
    import torch
    from torch import nn

    from kdpipe.data import BatchLoader, Splits


class Acceptance:
    """State shared by the parts: arguments, deadline, work folder, the data and the trained student."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.dry_run: bool = args.dry_run
        self.sizes = DRY_SIZES if self.dry_run else GPU_SIZES
        if args.teacher or args.student:
            self.sizes = dataclasses.replace(
                self.sizes, teacher=args.teacher or self.sizes.teacher, student=args.student or self.sizes.student
            )
        self.data = resolve_data(args.data, self.dry_run)
        self.work = work
        self.started = time.perf_counter()
        self.deadline = self.started + args.budget_s
        self.import_paths: list[str] = []
        self.fatal: str | None = None
        self.records: dict[str, PartRecord] = {}
        self._splits: Splits | None = None
        self._device_splits: Splits | None = None
        self._student: tuple[nn.Module, Path] | None = None
        self.data_record: dict[str, Any] = {}
        self.student_record: dict[str, Any] = {}

    # time and subprocesses ------------------------------------------------------------------------------------

    def remaining(self) -> float:
        """Seconds of the budget left."""
        return self.deadline - time.perf_counter()

    def require_time(self, what: str, seconds: float = 1.0) -> None:
        """``OutOfTime`` when less than ``seconds`` of the budget is left for ``what``."""
        if self.remaining() < seconds:
            raise OutOfTime(f"time budget: {self.args.budget_s:.0f} s spent before {what}")

    @property
    def cuda(self) -> bool:
        """Whether this run uses the GPU (never in a dry run)."""
        import torch

        return not self.dry_run and torch.cuda.is_available()

    @property
    def device(self) -> torch.device:
        import torch

        return torch.device("cuda", 0) if self.cuda else torch.device("cpu")

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of every subprocess: the carried wheels and the checkout first on PYTHONPATH, no GPU in
        a dry run, wide logs, and no --require-gpu leaking in from the caller."""
        env = {k: v for k, v in os.environ.items() if k != "KDPIPE_REQUIRE_GPU"}
        path = [*self.import_paths, env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
        env["COLUMNS"] = "200"
        env["PYTHONUNBUFFERED"] = "1"
        if self.dry_run:
            env["CUDA_VISIBLE_DEVICES"] = ""
            env["OMP_NUM_THREADS"] = str(self.args.threads)
        env.update(extra or {})
        return env

    def run(self, argv: list[str], *, timeout: float, name: str, env: dict[str, str] | None = None) -> Command:
        """Run ``argv`` in its own process group (killed whole at ``timeout`` seconds, capped by the budget); its
        output is kept in <work>/logs/<name>.log. ``env``: variables on top of ``self.env()``."""
        capped = self.remaining() < timeout
        timeout = max(1.0, min(timeout, self.remaining()))
        print(f"    $ {' '.join(argv)}  (timeout {timeout:.0f} s)", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=self.env(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
            rc: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # torchrun's workers too: the whole group this call started
            stdout, stderr = proc.communicate()
            rc = None
            stderr += f"\n[killed after {timeout:.0f} s]"
        command = Command(argv, rc, time.perf_counter() - t0, stdout, stderr, budget_capped=capped)
        logs = self.work / "logs"
        logs.mkdir(exist_ok=True)
        (logs / f"{name}.log").write_text(f"$ {' '.join(argv)}\n{stdout}\n--- stderr ---\n{stderr}", encoding="utf-8")
        return command

    # data and the shared student ------------------------------------------------------------------------------

    def splits(self) -> Splits:
        """The run's splits on the CPU (decoded once, through kdpipe's cache: $KDPIPE_CACHE or ~/.cache/kdpipe)."""
        if self._splits is None:
            from kdpipe.config import DataConfig
            from kdpipe.data import create_splits

            subset = self.sizes.pipeline_subset if self.dry_run else None
            cfg = DataConfig.model_validate(self.data.config(subset))
            t0 = time.perf_counter()
            self._splits = create_splits(cfg, seed=SEED, base_dir=REPO)
            described = self._splits.describe()
            described.pop("classes", None)
            self.data_record = {"source": self.data.label, "config": self.data.config(subset), **described}
            self.data_record["load_s"] = round(time.perf_counter() - t0, 2)
        return self._splits

    def device_splits(self) -> Splits:
        """The splits moved to the device once: every loader built on them gathers there, without a copy."""
        if self._device_splits is None:
            from kdpipe.data import TensorSplit

            splits, device = self.splits(), self.device

            def moved(split: Any) -> TensorSplit:
                assert isinstance(split, TensorSplit)  # data.loader is memory
                return TensorSplit(split.images.to(device), split.labels.to(device))

            self._device_splits = dataclasses.replace(
                splits,
                train=moved(splits.train),
                val=moved(splits.val) if splits.val is not None else None,
                test=moved(splits.test),
            )
            resident = 0
            for split in (self._device_splits.train, self._device_splits.val, self._device_splits.test):
                if isinstance(split, TensorSplit):
                    resident += split.images.nbytes + split.labels.nbytes
            self.data_record["resident_bytes"] = resident
            self.data_record["resident_on"] = str(device)
        return self._device_splits

    def loader(self, split: Any, *, batch_size: int, train: bool) -> BatchLoader:
        """A kdpipe ``BatchLoader`` over a device-resident ``split`` with the run's normalisation and augmentation."""
        from kdpipe.data import BatchLoader

        splits = self.device_splits()
        augment = self.data.augment if train else "none"
        return BatchLoader(
            split,
            batch_size=batch_size,
            mean=splits.mean,
            std=splits.std,
            train=train,
            augment=augment,
            device=self.device,
        )

    def network(self, name: str) -> nn.Module:
        """A fresh ``name`` (timm or kdpipe model) sized for the run's data."""
        from kdpipe.models.factory import create_model

        splits = self.splits()
        return create_model(name, num_classes=splits.num_classes, in_chans=splits.in_chans)

    def calibration_images(self, count: int) -> torch.Tensor:
        """``count`` normalised training images for int8 calibration, on the CPU: the export stage's own draw
        (``kdpipe.stages.export.calibration_images``, seeded, over the whole class-sorted train split)."""
        from kdpipe.stages.export import calibration_images

        return calibration_images(self.splits(), count, SEED)

    def parity_images(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` normalised test images and their labels, on the CPU, without augmentation: the export stage's
        seeded "parity" draw (``kdpipe.data.sample_indices``), not the first ``count`` of a class-sorted split."""
        from kdpipe.data import normalize, sample_indices

        splits = self.splits()
        index = sample_indices(len(splits.test), count, SEED, "parity")
        return normalize(splits.test.load(index), splits.mean, splits.std), splits.test.labels[index]

    def student(self) -> tuple[nn.Module, Path]:
        """A student trained a few epochs with kdpipe's Trainer (CE) on the resident data, as a CPU fp32 copy,
        and its fp32 ONNX from ``export_onnx``; built once and shared by the onnxruntime and TensorRT parts."""
        if self._student is None:
            import torch

            from kdpipe.config import TrainConfig
            from kdpipe.distill.methods import create_method
            from kdpipe.distill.methods.ce import CEParams
            from kdpipe.distill.trainer import Trainer
            from kdpipe.exports import export_onnx
            from kdpipe.stages.export import export_preprocessing

            splits, device, sizes = self.device_splits(), self.device, self.sizes
            torch.manual_seed(SEED)
            method = create_method(CEParams(), self.network(sizes.student), None, None)
            train = self.loader(splits.train, batch_size=sizes.student_batch, train=True)
            test = self.loader(splits.test, batch_size=256, train=False)
            cfg = TrainConfig(epochs=sizes.student_epochs, batch_size=sizes.student_batch, lr=0.1)
            trainer = Trainer(
                method,
                cfg,
                train_batches=train,
                eval_batches=test,
                num_classes=splits.num_classes,
                device=device,
                checkpoint_path=self.work / "student" / "last.pt",
                fingerprint="gpu-acceptance-student",
                precision="bf16" if self.cuda else "fp32",
                label="student",
            )
            result = trainer.fit()
            cpu = copy.deepcopy(method.deployable()).to("cpu", torch.float32)
            cpu = cpu.to(memory_format=torch.contiguous_format).eval()
            path = self.work / "student.fp32.onnx"
            exported = export_onnx(cpu, path, preprocessing=export_preprocessing(splits), opset=18)
            self.student_record = {
                "model": sizes.student,
                "epochs": sizes.student_epochs,
                "precision": trainer.precision,
                "test_top1": result.final.top1 if result.final is not None else None,
                "train_seconds": round(result.seconds, 2),
                "onnx": {**exported.to_dict(), "path": path.name},
            }
            self._student = (cpu, path)
        return self._student

    def pipeline_config(self, name: str, stages: str) -> Path:
        """A stages.yaml for a ``kdpipe run`` subprocess on the run's data (JSON flow style is YAML)."""
        subset = self.sizes.pipeline_subset if self.data.root is not None else None
        text = (
            f"version: 1\nname: {name}\nseed: {SEED}\ndevice: {'cuda' if self.cuda else 'cpu'}\n"
            f"data: {json.dumps(self.data.config(subset))}\nstages:\n{stages}"
        )
        path = self.work / name / "stages.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    def teacher_and_distill(self) -> str:
        """The ``stages:`` of a teacher and a KD student (on the GPU three epochs each: enough to leave chance
        level, so the parity of the exports downstream compares real predictions)."""
        s = self.sizes
        train = f"{{epochs: {s.pipeline_epochs}, batch_size: {s.pipeline_batch}, lr: 0.1}}"
        return (
            f"  teacher:\n    type: teacher\n    model: {s.teacher}\n    weights: {{train: {train}}}\n"
            f"  distill:\n    type: distill\n    student: {s.student}\n    method: {{name: kd}}\n"
            f"    train: {train}\n    precision: bf16\n"
        )
