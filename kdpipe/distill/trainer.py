"""The training loop shared by teacher training and every KD method.

It owns what methods should not have to: device placement, mixed precision, the optimizer and lr schedule,
evaluation, metrics, and checkpoints. A checkpoint is written atomically after every epoch and, on SIGTERM or
SIGINT, at the next step boundary; rerunning resumes from it and (CPU, fixed seed) reproduces an uninterrupted
run exactly, because the data order and augmentation of every step are functions of (seed, epoch, step) and the
global RNG state is saved with the weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from kdpipe import distributed
from kdpipe.config import TrainConfig
from kdpipe.distill.early_stopping import EarlyStopping
from kdpipe.distill.evaluate import EvalResult, evaluate
from kdpipe.distill.methods.base import KDMethod
from kdpipe.distill.precision import Precision, ResolvedPrecision, resolve_precision, strided_convs_on_one_pixel
from kdpipe.distill.step import Build, StepControl
from kdpipe.errors import ConfigError, DataError, Interrupted
from kdpipe.fileio import atomic_write_with, zip_damage
from kdpipe.progress import NullProgress, Progress

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "kdpipe-train-checkpoint/2"
"""/2: methods keep their epoch statistics in an ``EpochStats`` submodule (state_dict keys ``stats.*``)."""


class Batches(Protocol):
    """What the trainer needs from a data loader (kdpipe.data.BatchLoader satisfies it)."""

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def iter_from(self, step: int) -> Iterator[tuple[Tensor, Tensor]]: ...

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)
    """One entry per epoch: epoch, lr, train loss parts, train_top1, and eval metrics when evaluated."""
    best_top1: float = float("nan")
    best_epoch: int = -1
    final: EvalResult | None = None
    resumed_from: int | None = None
    """Epoch (0-based) the run resumed at, or None for a fresh start."""
    stopped_early: int | None = None
    """With ``train.early_stopping``: the epoch (1-based) after which training stopped, or None."""
    seconds: float = 0.0
    precision: str = "fp32"
    """The precision that trained (``kdpipe.distill.precision``), which the stage asked for or its fallback."""
    precision_note: str = ""
    """Why it is not the one asked for ("" when it is)."""


def lr_factor(cfg: TrainConfig, epoch: int) -> float:
    """Multiplier of the base lr at (0-based) ``epoch``: warm-up then step/cosine/constant."""
    s = cfg.schedule
    if s.warmup_epochs and epoch < s.warmup_epochs:
        return 0.1 + 0.9 * epoch / s.warmup_epochs
    if s.name == "step":
        return s.gamma ** sum(epoch >= m for m in s.milestones)
    if s.name == "cosine":
        span = max(1, cfg.epochs - s.warmup_epochs)
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - s.warmup_epochs) / span))
    return 1.0


def classifier_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model``'s class head (timm's ``get_classifier``; none for a model without one)."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    return list(head.parameters()) if isinstance(head, nn.Module) else []


def fine_tuning_groups(params: list[nn.Parameter], model: nn.Module | None, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Optimizer parameter groups for ``params`` with ``lr_scale`` from ``backbone_lr_scale`` and ``layer_decay``.

    ``model`` is the network being trained (the student; the teacher in the teacher stage): its class head keeps
    lr x 1, the rest of it lr x backbone_lr_scale, and with ``layer_decay`` each of its layers timm's decayed scale
    too (timm's groups, norms and biases without weight decay). Parameters of other modules in ``params`` (a
    method's adapters, an online peer) form one group at lr x 1. With the defaults: one group, as before.
    """
    if model is None or (cfg.backbone_lr_scale == 1.0 and cfg.layer_decay is None):
        return [{"params": params}]
    wanted = {id(p) for p in params}
    head = {id(p) for p in classifier_parameters(model)}
    if cfg.layer_decay is not None:
        from timm.optim import param_groups_layer_decay

        base = param_groups_layer_decay(model, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay)
    else:
        base = [{"params": [p for p in model.parameters() if p.requires_grad], "lr_scale": 1.0}]
    groups: list[dict[str, Any]] = []
    in_model: set[int] = set()
    for group in base:
        for is_head in (True, False):
            members = [p for p in group["params"] if id(p) in wanted and (id(p) in head) == is_head]
            if not members:
                continue
            scale = float(group.get("lr_scale", 1.0)) * (1.0 if is_head else cfg.backbone_lr_scale)
            extra = {"weight_decay": group["weight_decay"]} if "weight_decay" in group else {}
            groups.append({"params": members, "lr_scale": scale, **extra})
            in_model.update(id(p) for p in members)
    rest = [p for p in params if id(p) not in in_model]
    if rest:
        groups.append({"params": rest, "lr_scale": 1.0})
    return groups


def create_optimizer(
    params: list[torch.nn.Parameter] | list[dict[str, Any]], cfg: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    """SGD or AdamW from ``cfg``: PyTorch's fused kernels on CUDA (one launch for all parameters), multi-tensor
    ``foreach`` kernels elsewhere, unless ``cfg.performance.fused_optimizer`` says otherwise; the math is the same."""
    fused = cfg.performance.fused_optimizer
    if fused is None:
        fused = device.type == "cuda"
    foreach = None if fused else True
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
            foreach=foreach,
            fused=fused or None,
        )
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=foreach, fused=fused or None)


def _reduce_epoch_sums(
    sums: dict[str, float], counts: dict[str, int], correct: int, seen: int
) -> tuple[dict[str, float], dict[str, int], int, int]:
    """The epoch's per-key sums and counts, and top-1 hits, added up over ranks (one all_reduce)."""
    keys = sorted(sums)
    local = torch.tensor([*(sums[k] for k in keys), *(counts[k] for k in keys), correct, seen], dtype=torch.float64)
    total = distributed.all_reduce_sum(local).tolist()
    n = len(keys)
    return (
        dict(zip(keys, total[:n], strict=True)),
        {k: int(v) for k, v in zip(keys, total[n : 2 * n], strict=True)},
        int(total[2 * n]),
        int(total[2 * n + 1]),
    )


def default_channels_last(device: torch.device, precision: Precision) -> bool:
    """``train.performance.channels_last`` when unset: NHWC where it was measured faster, on CUDA (tensor cores) and
    for bf16 on CPU (1.35x a KD step, 1.32-1.72 over 3 rounds; fp32 on CPU: 0.89x, 0.87-1.22; see
    benchmarks/results/train_options_cpu.md)."""
    return device.type == "cuda" or (device.type == "cpu" and precision == "bf16")


def sync_batchnorm(method: KDMethod, world: distributed.World, device: torch.device) -> None:
    """Make every BatchNorm the method trains a SyncBatchNorm (the frozen teacher is left alone: it never uses batch
    statistics). A no-op for a single process; PyTorch has no SyncBatchNorm on CPU, which is refused with the fix."""
    if not world.enabled:
        return
    if device.type != "cuda":
        raise ConfigError(
            f"train.performance.sync_bn needs CUDA; this {world.size}-process job trains on {device.type} with "
            f"{world.backend or 'gloo'}, where PyTorch has no SyncBatchNorm",
            hint="set train.performance.sync_bn: false (BatchNorm statistics are then per rank)",
        )
    torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)  # replaces the modules in place, keeping the parameters


def compile_networks(method: KDMethod, mode: str, device: torch.device) -> None:
    """``torch.compile`` (in place, so state_dict keys do not change) every network ``method`` trains and its frozen
    teacher. On CPU, inductor generates C++: a machine without a compiler is refused here with the fix."""
    if device.type == "cpu" and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        raise ConfigError(
            "train.performance.compile needs a C++ compiler on CPU (torch inductor), and none is installed",
            hint="install g++ (apt-get install g++) or set train.performance.compile: false",
        )
    modules = list(method.networks().values())
    if method.teacher is not None and method.teacher_role == "frozen":
        modules.append(method.teacher)
    for module in modules:
        module.compile(mode=mode)


class _StopFlag:
    """Turns SIGTERM/SIGINT into a flag the loop checks at step boundaries (installed in the main thread only)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: saving a checkpoint at the end of this step", signal.Signals(signum).name)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Trains ``method`` (its student and any training-only modules) with the settings in ``cfg``."""

    def __init__(
        self,
        method: KDMethod,
        cfg: TrainConfig,
        *,
        train_batches: Batches,
        eval_batches: Batches,
        num_classes: int,
        device: torch.device,
        checkpoint_path: Path,
        fingerprint: str,
        precision: Precision = "fp32",
        progress: Progress | None = None,
        label: str = "train",
        on_epoch: Callable[[dict[str, float]], None] | None = None,
        stop_after_steps: int | None = None,
        input_shape: tuple[int, int, int] | None = None,
    ) -> None:
        self.method = method.to(device)
        self.cfg = cfg
        self.train_batches = train_batches
        self.eval_batches = eval_batches
        self.num_classes = num_classes
        self.device = device
        self.checkpoint_path = checkpoint_path
        self.fingerprint = fingerprint
        self.progress = progress or NullProgress()
        self.label = label
        self.on_epoch = on_epoch
        # Test hook: behave as if SIGTERM arrived after this many optimizer steps (counted from this fit() call).
        self.stop_after_steps = stop_after_steps
        self.resolved = resolve_precision(precision, device)
        if self.resolved.precision == "bf16" and device.type == "cpu" and input_shape is not None:
            wrong = strided_convs_on_one_pixel(method.networks(), input_shape)
            if wrong:
                listed = ", ".join(wrong[:3]) + (f" and {len(wrong) - 3} more" if len(wrong) > 3 else "")
                self.resolved = ResolvedPrecision(
                    precision,
                    "fp32",
                    f"torch {torch.__version__}'s CPU bf16 convolution computes wrong weight gradients for a strided "
                    f"convolution over a feature map one pixel wide ({listed}); larger images avoid it",
                )
        self.precision = self.resolved.precision
        if self.resolved.reason:
            log.info("%s: precision %s asked for, training in %s: %s", label, precision, self.precision,
                     self.resolved.reason)  # fmt: skip
        self.amp_dtype = self.resolved.autocast_dtype
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        perf = cfg.performance
        self.channels_last = (
            perf.channels_last if perf.channels_last is not None else default_channels_last(device, self.precision)
        )
        if self.channels_last:
            self.method.to(memory_format=torch.channels_last)
        if perf.compile:
            compile_networks(self.method, perf.compile_mode, device)
        self.world = distributed.world()
        # How often the loop reads values back from the device (each read waits for the GPU to catch up).
        self.sync_every = 1 if device.type == "cpu" else 25
        if perf.sync_bn:
            sync_batchnorm(self.method, self.world, device)
        distributed.broadcast_state(self.method)  # every rank starts from rank 0's weights
        self.optimizer: torch.optim.Optimizer | None = None
        # The trainer builds every optimizer: its own for what the method does not declare, and the method's
        # declared ones (optimizer_specs), which it hands back through the StepControl.
        specs = method.optimizer_specs()
        own = {
            name: self._optimizer_factory(s.params, s.lr, build=s.build, scheduled=s.scheduled, **s.overrides)
            for name, s in specs.items()
        }
        self.control = StepControl(scaler=self.scaler, optimizers=own, bound=True)
        method.bind(self.control)
        if method.manual_optimization:
            if not own:
                raise TypeError(f"{type(method).__name__} optimizes manually but declares no optimizer_specs")
        else:
            self.optimizer = self._optimizer_factory(self.method.optimized_parameters())

    def _optimizer_factory(
        self,
        params: Any,
        lr: float | None = None,
        *,
        build: Build | None = None,
        scheduled: bool = True,
        **overrides: Any,
    ) -> torch.optim.Optimizer:
        """The optimizer of ``params``: the stage's (TrainConfig with ``overrides``), or ``build(params, lr)`` for one
        of the method's own kind. ``scheduled``: its lr follows the stage's schedule from base lr ``lr`` (the groups
        carry ``base_lr``, which ``_begin_epoch`` scales); else it stays at ``lr``."""
        cfg = self.cfg.model_copy(update={"lr": self.cfg.lr if lr is None else lr, **overrides})
        if build is not None:
            optimizer = build(list(params), cfg.lr)
        else:
            groups = fine_tuning_groups(list(params), getattr(self.method, "student", None), cfg)
            optimizer = create_optimizer(groups, cfg, self.device)
        for group in optimizer.param_groups if scheduled else ():
            # follows the schedule: lr = base_lr * lr_factor(epoch); lr_scale is the fine-tuning group's share
            group["base_lr"] = cfg.lr * group.get("lr_scale", 1.0)
            group["lr"] = group["base_lr"]
        return optimizer

    def _freeze_backbone(self, epoch: int) -> None:
        """``freeze_backbone_epochs``: the trained network's backbone takes no gradient for its first epochs."""
        student = getattr(self.method, "student", None)
        if self.cfg.freeze_backbone_epochs <= 0 or student is None:
            return
        frozen = epoch < self.cfg.freeze_backbone_epochs
        head = {id(p) for p in classifier_parameters(student)}
        for p in student.parameters():
            if id(p) not in head:
                p.requires_grad_(not frozen)

    def _check_finite(self, loss_sum: float, epoch: int, step: int) -> None:
        """Stop on a nan/inf loss (the epoch's running sum is finite only if every step's loss was)."""
        if not math.isfinite(loss_sum):
            raise FloatingPointError(
                f"{self.label}: the training loss became {loss_sum} in epoch {epoch + 1} (by step {step + 1}); "
                + (
                    "lower the lr, or use precision bf16/fp32 instead of fp16"
                    if self.precision == "fp16"
                    else f"lower the lr (training in {self.precision})"
                )
            )

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def _save(self, epoch: int, step: int, result: TrainResult, stopper: EarlyStopping | None) -> None:
        if not self.world.is_main:  # rank 0 writes; under data parallelism every rank holds the same state
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": self.fingerprint,
            "epoch": epoch,
            "step": step,
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else {},
            "method_optimizers": {k: o.state_dict() for k, o in self.method.own_optimizers().items()},
            "scaler": self.scaler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "history": json.dumps(result.history),
            "best": [result.best_top1, result.best_epoch],
            "early_stopping": stopper.state_dict() if stopper is not None else {},
        }
        atomic_write_with(self.checkpoint_path, lambda tmp: torch.save(state, tmp))

    def _load(self, result: TrainResult, stopper: EarlyStopping | None) -> tuple[int, int]:
        """Restore the last checkpoint if it belongs to this exact stage config; returns (epoch, step) to start at."""
        path = self.checkpoint_path
        if not path.exists():
            return 0, 0
        damage = zip_damage(path)  # torch.load checks no CRC: a flipped bit in the weights would load silently
        if damage is not None:
            log.warning("ignoring damaged checkpoint %s (%s); training from the start", path, damage)
            return 0, 0
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or foreign file: never trust it, start over
            log.warning("ignoring unreadable checkpoint %s (%s); training from the start", path, exc)
            return 0, 0
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            found = state.get("format") if isinstance(state, dict) else None
            why = (
                f"written in checkpoint format {found!r}, not {CHECKPOINT_FORMAT!r}"
                if found
                else "not a kdpipe training checkpoint"
            )
            log.warning("ignoring %s: %s; training from the start", path, why)
            return 0, 0
        if state.get("fingerprint") != self.fingerprint:
            log.info("checkpoint %s is from a different config; training from the start", path)
            return 0, 0
        self.method.load_state_dict(state["method"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        saved = state.get("method_optimizers", {})
        for key, opt in self.method.own_optimizers().items():
            if key in saved:
                opt.load_state_dict(saved[key])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        result.history = json.loads(state["history"])
        result.best_top1, result.best_epoch = float(state["best"][0]), int(state["best"][1])
        if stopper is not None and state.get("early_stopping"):
            stopper.load_state_dict(state["early_stopping"])
        epoch, step = int(state["epoch"]), int(state["step"])
        result.resumed_from = epoch
        log.info("resuming %s from %s at epoch %d step %d", self.label, path, epoch + 1, step)
        return epoch, step

    # -- loop ----------------------------------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self, images: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """One optimisation step on a batch (the method's ``training_step`` under autocast, then the trainer's
        optimizer step unless the method stepped its own); returns the method's outputs. Benchmarks time this."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            out = self.method.training_step(images, targets)
        loss = out["loss"]  # its finiteness is checked in fit() at the host-sync cadence, not here
        if self.optimizer is not None:  # else the method stepped its own optimizers through the StepControl
            self.control.apply(loss, self.optimizer)
        self.scaler.update()
        return out

    def fit(self) -> TrainResult:
        """Train ``cfg.epochs`` epochs (resuming from the stage's checkpoint when it matches), evaluating every
        ``eval_every`` epochs; returns the history and the final evaluation. Raises ``Interrupted`` after saving a
        checkpoint when SIGINT/SIGTERM arrives."""
        result = TrainResult(precision=self.precision, precision_note=self.resolved.reason)
        cfg = self.cfg
        stopper = EarlyStopping(cfg.early_stopping, self.method.deployable()) if cfg.early_stopping else None
        start_epoch, start_step = self._load(result, stopper)
        # A run that stopped early and was resumed (killed before its stage finished) has nothing left to train.
        end_epoch = cfg.epochs if stopper is None or stopper.stopped_epoch is None else start_epoch
        if len(self.train_batches) == 0:
            raise DataError(f"the train split has fewer samples than batch_size={cfg.batch_size}; lower batch_size")
        t0 = time.perf_counter()
        self._steps_done = 0
        self.method.train()
        with _StopFlag() as stop:
            for epoch in range(start_epoch, end_epoch):
                lr = self._begin_epoch(epoch)
                first = start_step if epoch == start_epoch else 0
                t_epoch = time.perf_counter()
                totals = self._train_epoch(epoch, first, stop, result, stopper)
                row = self._epoch_row(epoch, lr, totals)
                row["train_seconds"] = time.perf_counter() - t_epoch  # the steps alone: no evaluation, no checkpoint
                self._evaluate_epoch(epoch, row, result, stopper)
                result.history.append(row)
                if self.on_epoch is not None:
                    self.on_epoch(row)
                self._save(epoch + 1, 0, result, stopper)
                if stopper is not None and stopper.stopped_epoch is not None:
                    log.info(
                        "%s: no eval top-1 gain over %.4f (epoch %d) in %d evaluations; stopped after epoch %d",
                        self.label,
                        stopper.best,
                        stopper.best_epoch,
                        stopper.cfg.patience,
                        epoch + 1,
                    )
                    break
        restored = stopper is not None and stopper.finish()
        if stopper is not None:
            result.stopped_early = stopper.stopped_epoch
        if restored or result.final is None or start_epoch >= end_epoch:
            result.final = evaluate(self.method.deployable(), self.eval_batches, self.num_classes)
        result.seconds = time.perf_counter() - t0
        return result

    # -- the parts of an epoch -------------------------------------------------------------------------------------

    def _begin_epoch(self, epoch: int) -> float:
        """The schedule's lr for ``epoch`` on every scheduled param group and in the StepControl, the backbone
        freeze, the method's epoch hook and the loader's epoch; returns the student lr."""
        factor = lr_factor(self.cfg, epoch)
        lr = self.cfg.lr * factor
        optimizers = [self.optimizer, *self.method.own_optimizers().values()]
        for group in (g for opt in optimizers if opt is not None for g in opt.param_groups if "base_lr" in g):
            group["lr"] = group["base_lr"] * factor  # groups without base_lr keep a fixed lr
        self.control.lr = lr
        self._freeze_backbone(epoch)
        self.method.on_epoch_start(epoch, self.cfg.epochs)
        self.train_batches.set_epoch(epoch)
        return lr

    def _train_epoch(
        self, epoch: int, first: int, stop: _StopFlag, result: TrainResult, stopper: EarlyStopping | None
    ) -> _EpochTotals:
        """Steps ``first..`` of ``epoch``: running sums of the logged outputs, the finite-loss check at the host-sync
        cadence, and the agreed stop on a signal (every rank at the same step, after a checkpoint)."""
        # Running sums stay on the device: reading them back waits for the GPU, so that happens every
        # `sync_every` steps (every step on CPU, where it costs nothing) and at the end of the epoch.
        totals = _EpochTotals(hits=torch.zeros((), dtype=torch.int64, device=self.device))
        shown_loss = math.nan
        task = self.progress.task(f"{self.label} {epoch + 1}/{self.cfg.epochs}", total=len(self.train_batches))
        task.advance(first)
        try:
            for step, (images, targets) in enumerate(self.train_batches.iter_from(first), start=first):
                out = self.train_step(images, targets)
                totals.add(out, targets)
                self._steps_done += 1
                synced = self._steps_done % self.sync_every == 0 or step + 1 == len(self.train_batches)
                if synced:
                    shown_loss = float(out["loss"].detach())
                    self._check_finite(float(totals.sums["loss"]), epoch, step)
                task.advance(1, loss=shown_loss)
                if self.stop_after_steps is not None and self._steps_done >= self.stop_after_steps:
                    stop.signum = signal.SIGTERM
                if self.world.enabled and synced and distributed.any_rank(stop.signum is not None):
                    stop.signum = stop.signum or signal.SIGTERM  # every rank stops at the same step
                if stop.signum is not None and (synced or not self.world.enabled):
                    self._save(epoch, step + 1, result, stopper)
                    raise Interrupted(
                        f"{self.label}: stopped by {signal.Signals(stop.signum).name} at epoch {epoch + 1}, "
                        f"step {step + 1}; checkpoint saved to {self.checkpoint_path}",
                        hint="rerun the same command to resume",
                    )
        finally:
            task.close()
        return totals

    def _epoch_row(self, epoch: int, lr: float, totals: _EpochTotals) -> dict[str, float]:
        """The epoch's logged row: train means (summed over ranks) and the method's own statistics."""
        host_sums = {k: float(v) for k, v in totals.sums.items()}
        counts, correct, seen = totals.counts, int(totals.hits), totals.seen
        if self.world.enabled:
            host_sums, counts, correct, seen = _reduce_epoch_sums(host_sums, counts, correct, seen)
            distributed.broadcast_state(self.method)  # BatchNorm statistics saw only this rank's shards
        row: dict[str, float] = {"epoch": epoch + 1, "lr": lr}
        row.update({f"train_{k}": v / max(counts[k], 1) for k, v in host_sums.items()})
        row["train_top1"] = correct / max(seen, 1)
        row.update(self.method.epoch_metrics())
        return row

    def _evaluate_epoch(
        self, epoch: int, row: dict[str, float], result: TrainResult, stopper: EarlyStopping | None
    ) -> None:
        """On evaluation epochs: the deployed network (and every other network of an online method) on the eval
        split, the best epoch, and early stopping."""
        cfg = self.cfg
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            ev = evaluate(self.method.deployable(), self.eval_batches, self.num_classes)
            row.update({"eval_top1": ev.top1, "eval_top5": ev.top5, "eval_loss": ev.loss})
            networks = self.method.networks()
            for name, net in networks.items() if len(networks) > 1 else ():
                if name == self.method.deployed_network:  # online methods: every network under its name
                    row[f"eval_top1_{name}"] = ev.top1
                else:
                    row[f"eval_top1_{name}"] = evaluate(net, self.eval_batches, self.num_classes).top1
            if not ev.top1 <= result.best_top1:  # also true while best is nan
                result.best_top1, result.best_epoch = ev.top1, epoch + 1
            result.final = ev
            if stopper is not None and stopper.update(ev.top1, epoch + 1):
                row["early_stop"] = 1.0
        self.method.train()


@dataclass
class _EpochTotals:
    """Running sums of one epoch's logged outputs (on the device) and top-1 hits."""

    hits: Tensor
    sums: dict[str, Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    """Per key: a part some steps do not return is averaged over those that do."""
    seen: int = 0

    def add(self, out: dict[str, Tensor], targets: Tensor) -> None:
        n = targets.numel()
        for key, value in out.items():
            if key != "logits" and value.numel() == 1:
                part = value.detach().double().reshape(()) * n
                self.sums[key] = self.sums[key] + part if key in self.sums else part
                self.counts[key] = self.counts.get(key, 0) + n
        self.hits += (out["logits"].argmax(1) == targets).sum()
        self.seen += n
