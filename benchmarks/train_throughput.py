"""Images per second of one distillation training step: kdpipe's Trainer + BatchLoader against a hand-written
PyTorch loop of the same math, with achieved TFLOP/s against the device's measured matmul peak, and memory.

Targets (issue "Training performance", items 4 and 5):
- CPU (the 2-core CI machine, 2 threads, fp32): kdpipe's step time <= 1.05x the plain loop's, at every batch size;
- CUDA (an H100, bf16): kdpipe >= 30,000 images/s at batch 512;
- CUDA: the GPU-resident CIFAR-100 uint8 data (train + test images and labels) <= 200 MB.
A run judges only the targets of the device it measured; the others are recorded as null ("not measured here").

Method: teacher resnet32x4 (frozen, eval) and student resnet8x4, 3x32x32 inputs, 100 classes, built once from one seed;
each implementation trains its own copy of the same initial weights. The data is one uint8 split placed on the device
once and shared by both: synthetic uniform-random images and labels by default (--samples, 50,000 like the CIFAR-100
train split; throughput does not depend on pixel values), or the real CIFAR-100 train split through kdpipe's imagefolder
source with --data. (a) kdpipe: a ``Trainer`` around ``create_method(KDParams(), ...)`` with a default ``TrainConfig``,
fed by a ``BatchLoader`` over the split (augment "cifar"); a step is ``next()`` on the loader's iterator (index gather,
seeded crop + flip, normalisation, all on the device) then ``Trainer._step``; the fit loop's per-step logging
(``float(loss)``, top-1) is not timed. (b) plain PyTorch: the same gather; crop with 4 px zero padding + horizontal flip
per sample as one batched index (flip, pad, unfold, one window per sample) from the global RNG; x/255, mean/std; teacher
forward under ``torch.inference_mode()``; student forward; loss = ce_weight * CE + kd_weight * T^2 * KL(batchmean) with
KDParams' defaults; SGD with TrainConfig's lr, momentum, nesterov and weight decay (fused kernels on CUDA, foreach
elsewhere, as the trainer picks them); the trainer's effective precision (autocast; on CPU bf16 only where the CPU
computes it natively), channels_last and --compile settings. A round is one short epoch per implementation: the shuffled
order (the loader's iterator / a randperm) is made inside the timed region, then --steps steps run; on CUDA each
implementation's steps run back to back between two CUDA events, on CPU the two implementations' steps are interleaved
ABBA and each is timed alone with perf_counter. --warmup steps of each implementation run once per batch size before its
first round. Rounds alternate which implementation goes first, so load from other processes hits both; each kdpipe/plain
ratio is taken within a round and the median over --repeats rounds is compared with the target; images/s come from the
median step time. FLOPs of one step (teacher forward + student forward + backward) are counted once with
``torch.utils.flop_counter.FlopCounterMode`` on the plain step (fp32, batch 8, scaled linearly with the batch); achieved
TFLOP/s = step FLOPs / step time, also given as a fraction of the best square-matmul rate in the step's dtype (4096 on
CUDA, 1024 and 2048 fp32 on CPU; timed before and after the steps, best kept). Memory: on CUDA ``max_memory_allocated``
per cell (reset before each) and the allocator growth when the data is placed; on CPU the process's peak RSS
(``getrusage``; it never resets, so it only grows). The size of a full CIFAR-100 residency is measured from the tensors
with --data and computed from the shapes otherwise.

Defaults: CPU max(1, 256 // batch) timed steps per round (4, 2, 1), 1 warm-up step, 3 rounds: 4 to 6 minutes at 2
threads on the 2-core machine (a batch-512 step takes 20 to 35 s); CUDA 50 steps, 10 warm-up, 5 rounds. ``--smoke``
(batch 64, 1 warm-up and 1 timed step, 1 round, 1,024 samples, the matmul peak timed once) checks the flow in about
20 s on an idle machine; its numbers mean nothing and go to train_throughput_<device>_smoke.json unless --out says
otherwise.

    python benchmarks/train_throughput.py [--device cpu] [--batch-sizes 64 128 512] [--repeats 3] [--data]
    python benchmarks/train_throughput.py --smoke --out /tmp/train_throughput_smoke.json
    python benchmarks/train_throughput.py --batch-sizes 512 --compile --compile-mode reduce-overhead  # CUDA graphs
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from _common import SHARED_DATA, environment, write_result
from torch import Tensor, nn

if TYPE_CHECKING:
    from kdpipe.config import TrainConfig
    from kdpipe.distill.methods.kd import KDParams
    from kdpipe.distill.trainer import Precision

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = SHARED_DATA / "cifar100-jpg.tar.gz"
TEACHER, STUDENT = "resnet32x4", "resnet8x4"
NUM_CLASSES = 100
SHAPE = (3, 32, 32)
CROP_PADDING = 4
CIFAR100_TRAIN, CIFAR100_TEST = 50_000, 10_000
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
FLOP_COUNT_BATCH = 8
TARGET_CPU_RATIO = 1.05
TARGET_CUDA_IMAGES_PER_S = 30_000
TARGET_CUDA_BATCH = 512
TARGET_RESIDENT_BYTES = 200_000_000
NOT_MEASURED = "not measured here"


# -- data ---------------------------------------------------------------------------------------------------------


@dataclass
class Data:
    """The uint8 train split both implementations read, already on the device."""

    images: Tensor
    labels: Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    resident_bytes_measured: int | None
    """CUDA: allocator growth when the train (+ test) tensors were placed; None on CPU."""
    cifar100_bytes: int
    """Images + labels of a full CIFAR-100 train + test residency."""
    cifar100_bytes_how: str


def cifar100_bytes_from_shape() -> int:
    pixels = (CIFAR100_TRAIN + CIFAR100_TEST) * SHAPE[0] * SHAPE[1] * SHAPE[2]
    return pixels * torch.uint8.itemsize + (CIFAR100_TRAIN + CIFAR100_TEST) * torch.int64.itemsize


def place(tensors: list[Tensor], device: torch.device) -> tuple[list[Tensor], int | None]:
    """Move ``tensors`` to ``device``; on CUDA also return how much the allocator grew."""
    if device.type != "cuda":
        return [t.to(device) for t in tensors], None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    moved = [t.to(device) for t in tensors]
    torch.cuda.synchronize(device)
    return moved, torch.cuda.memory_allocated(device) - before


def synthetic_data(samples: int, device: torch.device, seed: int) -> tuple[Data, list[Tensor]]:
    """Uniform-random uint8 images and labels; a CIFAR-100-sized test split is placed beside them on CUDA so the
    measured residency is that of train + test. Returns the data and the extra tensors to keep alive."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (samples, *SHAPE), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (samples,), generator=generator)
    tensors = [images, labels]
    if device.type == "cuda":
        tensors += [
            torch.zeros(CIFAR100_TEST, *SHAPE, dtype=torch.uint8),
            torch.zeros(CIFAR100_TEST, dtype=torch.int64),
        ]
    moved, grown = place(tensors, device)
    data = Data(
        images=moved[0],
        labels=moved[1],
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
        source=f"synthetic uint8, {samples} samples, seed {seed}",
        resident_bytes_measured=grown,
        cifar100_bytes=cifar100_bytes_from_shape(),
        cifar100_bytes_how="arithmetic from the shapes: (50,000 + 10,000) x 3x32x32 uint8 + int64 labels",
    )
    return data, moved[2:]


def cifar100_data(root: Path, device: torch.device) -> tuple[Data, list[Tensor]]:
    """The real CIFAR-100 train split through kdpipe's imagefolder source (no validation hold-out)."""
    from kdpipe.config import DataConfig
    from kdpipe.data import TensorSplit, create_splits

    cfg = DataConfig(kind="imagefolder", root=root.resolve(), augment="cifar", val_fraction=0.0, loader="memory")
    splits = create_splits(cfg, seed=0, base_dir=REPO)
    if splits.num_classes != NUM_CLASSES or (splits.in_chans, splits.image_size, splits.image_size) != SHAPE:
        raise SystemExit(f"{root}: expected 100 classes of 3x32x32 images, got {splits.describe()}")
    train, test = splits.train, splits.test
    assert isinstance(train, TensorSplit) and isinstance(test, TensorSplit)  # loader="memory": decoded tensors
    parts = [train.images, train.labels, test.images, test.labels]
    moved, grown = place(parts, device)
    data = Data(
        images=moved[0],
        labels=moved[1],
        mean=splits.mean,
        std=splits.std,
        source=splits.name,
        resident_bytes_measured=grown,
        cifar100_bytes=sum(t.nbytes for t in parts),
        cifar100_bytes_how="measured: nbytes of the train and test image and label tensors",
    )
    return data, moved[2:]


# -- the two implementations --------------------------------------------------------------------------------------


class Implementation(Protocol):
    name: str

    def start_round(self, batch_size: int, epoch: int) -> None: ...

    def step(self) -> None: ...


def build_networks(seed: int) -> tuple[nn.Module, nn.Module]:
    from kdpipe.models.factory import create_model

    torch.manual_seed(seed)
    teacher = create_model(TEACHER, num_classes=NUM_CLASSES, in_chans=SHAPE[0])
    student = create_model(STUDENT, num_classes=NUM_CLASSES, in_chans=SHAPE[0])
    return teacher, student


class KdpipeStep:
    """kdpipe's step: the next batch of a BatchLoader iterator, then ``Trainer._step``."""

    name = "kdpipe"

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        data: Data,
        cfg: TrainConfig,
        batch_sizes: list[int],
        precision: Precision,
        device: torch.device,
        workdir: Path,
    ) -> None:
        from kdpipe.data import BatchLoader, TensorSplit
        from kdpipe.distill.methods import create_method
        from kdpipe.distill.methods.base import MethodContext
        from kdpipe.distill.methods.kd import KDParams
        from kdpipe.distill.trainer import Trainer

        split = TensorSplit(data.images, data.labels)  # already on the device: the loaders do not copy it

        def loader(batch_size: int, train: bool) -> BatchLoader:
            augment = "cifar" if train else "none"
            return BatchLoader(
                split, batch_size=batch_size, mean=data.mean, std=data.std, train=train, augment=augment, device=device
            )

        self.loaders = {b: loader(b, train=True) for b in batch_sizes}
        context = MethodContext(
            input_shape=SHAPE, num_classes=NUM_CLASSES, device=device, student_name=STUDENT, teacher_name=TEACHER
        )
        method = create_method(KDParams(), student, teacher, context)
        self.trainer = Trainer(
            method,
            cfg,
            train_batches=self.loaders[batch_sizes[0]],
            eval_batches=loader(256, train=False),
            num_classes=NUM_CLASSES,
            device=device,
            checkpoint_path=workdir / "never-written.pt",
            fingerprint="train_throughput",
            precision=precision,
        )
        self.trainer.method.train()  # what fit() does before its loop
        self._batches: Any = iter(())

    def start_round(self, batch_size: int, epoch: int) -> None:
        loader = self.loaders[batch_size]
        loader.set_epoch(epoch)
        self._batches = loader.iter_from(0)

    def step(self) -> None:
        images, targets = next(self._batches)
        self.trainer.train_step(images, targets)


def crop_flip(images: Tensor, padding: int) -> Tensor:
    """Per-sample random crop after zero ``padding`` and random horizontal flip of a uint8 ``(B, C, H, W)`` batch:
    flip the chosen samples, pad, view every crop window with ``unfold`` and index one window per sample."""
    b, _, h, w = images.shape
    device = images.device
    flipped = torch.rand(b, device=device) < 0.5
    images = torch.where(flipped[:, None, None, None], images.flip(3), images)
    windows = F.pad(images, (padding, padding, padding, padding)).unfold(2, h, 1).unfold(3, w, 1)
    top = torch.randint(0, 2 * padding + 1, (b,), device=device)
    left = torch.randint(0, 2 * padding + 1, (b,), device=device)
    return windows[torch.arange(b, device=device), :, top, left]  # (B, C, H, W)


class PlainStep:
    """The same step written directly against PyTorch."""

    name = "plain"

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        data: Data,
        cfg: TrainConfig,
        kd: KDParams,
        *,
        precision: str,
        channels_last: bool,
        compile_mode: str | None,
        device: torch.device,
    ) -> None:
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        self.student = student.to(device).train()
        if channels_last:
            self.teacher.to(memory_format=torch.channels_last)
            self.student.to(memory_format=torch.channels_last)
        if compile_mode is not None:
            self.teacher.compile(mode=compile_mode)
            self.student.compile(mode=compile_mode)
        self.images, self.labels = data.images, data.labels
        self.mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
        self.channels_last = channels_last
        self.device = device
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        kernels: dict[str, bool] = {"fused": True} if device.type == "cuda" else {"foreach": True}
        self.optimizer = torch.optim.SGD(
            self.student.parameters(),
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov,
            weight_decay=cfg.weight_decay,
            **kernels,
        )
        self.temperature, self.ce_weight, self.kd_weight = kd.temperature, kd.ce_weight, kd.kd_weight
        self.batch_size, self.k = 1, 0
        self.order = torch.arange(1)

    def start_round(self, batch_size: int, epoch: int) -> None:
        self.batch_size, self.k = batch_size, 0
        self.order = torch.randperm(len(self.labels), device=self.device)

    def loss(self, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> Tensor:
        t = self.temperature
        ce = F.cross_entropy(student_logits.float(), targets)
        log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
        log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=1)
        kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
        return self.ce_weight * ce + self.kd_weight * kl * t * t

    def step(self) -> None:
        index = self.order[self.k * self.batch_size : (self.k + 1) * self.batch_size]
        self.k += 1
        images = crop_flip(self.images[index], CROP_PADDING)
        x = images.float().div_(255.0).sub_(self.mean).div_(self.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        targets = self.labels[index]
        autocast = (
            torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        )
        with autocast:
            with torch.inference_mode():
                teacher_logits = self.teacher(x)
            loss = self.loss(self.student(x), teacher_logits, targets)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()


# -- measurement --------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_round(impl: Implementation, batch_size: int, epoch: int, steps: int, device: torch.device) -> float:
    """CUDA: seconds per step of one implementation's round (the epoch's order, then ``steps`` steps back to back,
    so the host may run ahead of the GPU as in training), from CUDA events."""
    synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    impl.start_round(batch_size, epoch)
    for _ in range(steps):
        impl.step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / steps


def cpu_round(impls: list[Implementation], batch_size: int, epoch: int, steps: int) -> dict[str, float]:
    """CPU: seconds per step of every implementation over one round. Each starts its epoch, then their steps run
    interleaved in ABBA order, each step timed alone (CPU work is synchronous), so a burst of load from another
    process lands on both implementations instead of on one."""
    total = dict.fromkeys((impl.name for impl in impls), 0.0)
    for impl in impls:
        t0 = time.perf_counter()
        impl.start_round(batch_size, epoch)
        total[impl.name] += time.perf_counter() - t0
    for i in range(steps):
        for impl in impls if i % 2 == 0 else impls[::-1]:
            t0 = time.perf_counter()
            impl.step()
            total[impl.name] += time.perf_counter() - t0
    return {name: seconds / steps for name, seconds in total.items()}


def peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, tries: int) -> float:
    """Best achieved TFLOP/s of an ``n`` x ``n`` matmul in ``dtype`` over ``tries`` timings."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    calls = 20 if device.type == "cuda" else 1
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(tries):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            a @ b
        synchronize(device)
        best = min(best, (time.perf_counter() - t0) / calls)
    return 2 * n**3 / best / 1e12


def matmul_peaks(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Measured matmul TFLOP/s by "<dtype>_<n>"; fp32 always, plus the step's dtype."""
    dtypes = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    sizes = [4096] if device.type == "cuda" else [1024, 2048]
    peaks = {}
    for dt in dict.fromkeys([torch.float32, dtype]):
        for n in sizes:
            peaks[f"{dtypes[dt]}_{n}"] = matmul_tflops(device, dt, n, tries=10 if device.type == "cuda" else 5)
    return peaks


def count_flops_per_image(
    teacher: nn.Module, student: nn.Module, data: Data, cfg: TrainConfig, kd: KDParams
) -> dict[str, float]:
    """FLOPs per image of one plain step (fp32, CPU copies, batch FLOP_COUNT_BATCH): total and teacher forward."""
    from torch.utils.flop_counter import FlopCounterMode

    cpu = torch.device("cpu")
    small = Data(
        images=data.images[:FLOP_COUNT_BATCH].cpu(),
        labels=data.labels[:FLOP_COUNT_BATCH].cpu(),
        mean=data.mean,
        std=data.std,
        source=data.source,
        resident_bytes_measured=None,
        cifar100_bytes=0,
        cifar100_bytes_how="",
    )
    loop = PlainStep(
        copy.deepcopy(teacher),
        copy.deepcopy(student),
        small,
        cfg,
        kd,
        precision="fp32",
        channels_last=False,
        compile_mode=None,
        device=cpu,
    )
    loop.start_round(FLOP_COUNT_BATCH, 0)
    with FlopCounterMode(display=False) as step_counter:
        loop.step()
    with FlopCounterMode(display=False) as teacher_counter, torch.inference_mode():
        loop.teacher(torch.zeros(FLOP_COUNT_BATCH, *SHAPE))
    total, teacher_fwd = step_counter.get_total_flops(), teacher_counter.get_total_flops()
    return {
        "step": total / FLOP_COUNT_BATCH,
        "teacher_forward": teacher_fwd / FLOP_COUNT_BATCH,
        "student_forward_backward": (total - teacher_fwd) / FLOP_COUNT_BATCH,
    }


def measure(
    impls: list[Implementation], batch_sizes: list[int], steps: dict[int, int], args: argparse.Namespace
) -> dict[int, dict[str, Any]]:
    """Per batch size: warm-up, then --repeats rounds alternating which implementation goes first."""
    device: torch.device = args.device
    cells: dict[int, dict[str, Any]] = {}
    for b in batch_sizes:
        print(f"batch {b}: warm-up ({args.warmup} steps each), {args.repeats} rounds of {steps[b]} steps", flush=True)
        for impl in impls:
            impl.start_round(b, 0)
            for _ in range(args.warmup):
                impl.step()
        synchronize(device)
        times: dict[str, list[float]] = {impl.name: [] for impl in impls}
        memory: dict[str, dict[str, int]] = {impl.name: {} for impl in impls}
        for r in range(args.repeats):
            order = impls if r % 2 == 0 else impls[::-1]
            if device.type != "cuda":
                for name, seconds in cpu_round(order, b, 1 + r, steps[b]).items():
                    times[name].append(seconds)
                    memory[name]["peak_rss_bytes_so_far"] = peak_rss_bytes()
            for impl in order if device.type == "cuda" else ():
                torch.cuda.reset_peak_memory_stats(device)
                baseline = torch.cuda.memory_allocated(device)
                times[impl.name].append(cuda_round(impl, b, 1 + r, steps[b], device))
                peak, mem = torch.cuda.max_memory_allocated(device), memory[impl.name]
                mem["max_memory_allocated_bytes"] = max(mem.get("max_memory_allocated_bytes", 0), peak)
                mem["peak_above_baseline_bytes"] = max(mem.get("peak_above_baseline_bytes", 0), peak - baseline)
            line = ", ".join(f"{name} {b / t[-1]:.1f} img/s" for name, t in times.items())
            print(f"  round {r + 1}/{args.repeats}: {line}", flush=True)
        cells[b] = {"times": times, "memory": memory}
    return cells


# -- report -------------------------------------------------------------------------------------------------------


def summarize(
    cells: dict[int, dict[str, Any]],
    steps: dict[int, int],
    flops_per_image: dict[str, float],
    peak_tflops: float,
) -> list[dict[str, Any]]:
    rows = []
    for b, cell in cells.items():
        times = cell["times"]
        step_flops = flops_per_image["step"] * b
        row: dict[str, Any] = {"batch_size": b, "timed_steps_per_round": steps[b], "step_flops": step_flops}
        for name, per_round in times.items():
            median = statistics.median(per_round)
            tflops = step_flops / median / 1e12
            row[name] = {
                "step_s_median": median,
                "step_s_per_round": per_round,
                "images_per_s": b / median,
                "tflops": tflops,
                "fraction_of_matmul_peak": tflops / peak_tflops,
                **cell["memory"][name],
            }
        ratios = [k / p for k, p in zip(times["kdpipe"], times["plain"], strict=True)]
        row["ratio_kdpipe_over_plain_per_round"] = ratios
        row["ratio_kdpipe_over_plain"] = statistics.median(ratios)
        rows.append(row)
    return rows


def resident_bytes(data: Data) -> tuple[int, str]:
    """Bytes of a CIFAR-100 train + test residency, and how they were found: the allocator's growth when the data
    holds 50,000 train samples (real or synthetic) on CUDA, else ``data.cifar100_bytes``."""
    if data.resident_bytes_measured is not None and len(data.labels) == CIFAR100_TRAIN:
        return data.resident_bytes_measured, "CUDA allocator growth when the train and test tensors were placed"
    return data.cifar100_bytes, data.cifar100_bytes_how


def targets_met(
    rows: list[dict[str, Any]], device: torch.device, precision: str, data: Data
) -> tuple[dict[str, bool | None], dict[str, str]]:
    """``met`` for every target (None where this device cannot measure it) and why a target is None."""
    met: dict[str, bool | None] = {}
    why: dict[str, str] = {}
    cpu = device.type == "cpu"
    for row in rows:
        key = f"cpu_kdpipe_over_plain_le_{TARGET_CPU_RATIO}_batch{row['batch_size']}"
        met[key] = row["ratio_kdpipe_over_plain"] <= TARGET_CPU_RATIO if cpu else None
        if not cpu:
            why[key] = f"{NOT_MEASURED}: a CPU target, this run is on {device.type}"
    key = f"cuda_bf16_images_per_s_ge_{TARGET_CUDA_IMAGES_PER_S}_batch{TARGET_CUDA_BATCH}"
    at_512 = [r for r in rows if r["batch_size"] == TARGET_CUDA_BATCH]
    if device.type == "cuda" and precision == "bf16" and at_512:
        met[key] = at_512[0]["kdpipe"]["images_per_s"] >= TARGET_CUDA_IMAGES_PER_S
    else:
        met[key] = None
        why[key] = (
            f"{NOT_MEASURED}: needs CUDA, bf16 and batch {TARGET_CUDA_BATCH} (this run: {device.type}, {precision})"
        )
    key = "cuda_cifar100_resident_le_200MB"
    if device.type == "cuda":
        met[key] = resident_bytes(data)[0] <= TARGET_RESIDENT_BYTES
    else:
        met[key] = None
        why[key] = f"{NOT_MEASURED}: GPU residency (the size from the shapes is in data.cifar100_train_test_bytes)"
    return met, why


def markdown(rows: list[dict[str, Any]], device: torch.device) -> str:
    mem_key, mem_label = (
        ("max_memory_allocated_bytes", "max allocated MB")
        if device.type == "cuda"
        else ("peak_rss_bytes_so_far", "peak RSS MB")
    )
    lines = [
        f"| batch | kdpipe img/s | plain img/s | kdpipe/plain time | kdpipe TFLOP/s | plain TFLOP/s | kdpipe % of peak "
        f"| kdpipe {mem_label} | plain {mem_label} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        k, p = r["kdpipe"], r["plain"]
        lines.append(
            f"| {r['batch_size']} | {k['images_per_s']:.1f} | {p['images_per_s']:.1f} | "
            f"{r['ratio_kdpipe_over_plain']:.3f} | {k['tflops']:.4f} | {p['tflops']:.4f} | "
            f"{100 * k['fraction_of_matmul_peak']:.1f} | {k[mem_key] / 1e6:.0f} | {p[mem_key] / 1e6:.0f} |"
        )
    return "\n".join(lines)


def write(out: Path | None, name: str, payload: dict[str, Any]) -> Path:
    """benchmarks/results/<name>.json through ``write_result``, or ``out`` with the same content."""
    if out is None:
        return write_result(name, payload)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": name, "environment": environment(), **payload}, indent=2) + "\n")
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda | cpu | cuda:N (default: cuda if available, else cpu)")
    parser.add_argument(
        "--precision", choices=["fp32", "bf16", "fp16"], default=None, help="default: bf16 on CUDA, fp32 on CPU"
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="NHWC networks and inputs (default: the trainer's, on for CUDA, off on CPU)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile both networks of both implementations")
    parser.add_argument(
        "--compile-mode",
        choices=["default", "reduce-overhead", "max-autotune"],
        default="default",
        help="torch.compile mode with --compile (train.performance.compile_mode; reduce-overhead captures CUDA graphs)",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128, 512])
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed steps per round (default: 50 on CUDA; on CPU max(1, 256 // batch))",
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps per batch size (default: 10 CUDA, 1 CPU)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="alternating rounds (default: 5 CUDA, 3 CPU)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: 2 on CPU, as is on CUDA)"
    )
    parser.add_argument("--samples", type=int, default=CIFAR100_TRAIN, help="synthetic train samples (default 50,000)")
    parser.add_argument(
        "--data",
        type=Path,
        nargs="?",
        const=DEFAULT_DATA,
        default=None,
        help=f"real CIFAR-100 (imagefolder tar or folder) instead of synthetic data; alone: {DEFAULT_DATA}",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--smoke", action="store_true", help="batch 64, 1 warm-up + 1 timed step, 1 round: checks the flow"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="default: benchmarks/results/train_throughput_<dev>.json"
    )
    args = parser.parse_args()
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = args.device.type == "cuda"
    if args.smoke:
        args.batch_sizes, args.samples = [64], min(args.samples, 1024)
        args.steps, args.warmup, args.repeats = args.steps or 1, args.warmup or 1, args.repeats or 1
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.warmup = (10 if cuda else 1) if args.warmup is None else args.warmup
    args.repeats = (5 if cuda else 3) if args.repeats is None else args.repeats
    args.threads = args.threads or (None if cuda else 2)
    if args.compile_mode != "default" and not args.compile:
        parser.error("--compile-mode needs --compile")
    if min(args.batch_sizes) < 2 or args.repeats < 1 or args.warmup < 0 or (args.steps is not None and args.steps < 1):
        parser.error("batch sizes must be >= 2, --repeats and --steps >= 1, --warmup >= 0")
    return args


def main() -> None:
    args = parse_args()
    device: torch.device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    from kdpipe.config import PerformanceConfig, TrainConfig
    from kdpipe.distill.methods.kd import KDParams

    batch_sizes = sorted(set(args.batch_sizes))
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kdpipe-throughput-")))
        t_setup = time.perf_counter()
        if args.data is not None:
            data, keep_alive = cifar100_data(args.data, device)
        else:
            data, keep_alive = synthetic_data(args.samples, device, args.seed)
        n = len(data.labels)
        steps = {b: args.steps or (50 if device.type == "cuda" else max(1, 256 // b)) for b in batch_sizes}
        too_long = [b for b in batch_sizes if max(steps[b], args.warmup) > n // b]
        if too_long:
            raise SystemExit(f"{n} samples hold fewer than --steps/--warmup full batches of {too_long}")

        cfg = TrainConfig(
            epochs=1,
            batch_size=batch_sizes[0],
            performance=PerformanceConfig(
                channels_last=args.channels_last, compile=args.compile, compile_mode=args.compile_mode
            ),
        )
        kd = KDParams()
        teacher, student = build_networks(args.seed)
        flops_per_image = count_flops_per_image(teacher, student, data, cfg, kd)
        plain_teacher, plain_student = copy.deepcopy(teacher), copy.deepcopy(student)
        kdpipe_impl = KdpipeStep(teacher, student, data, cfg, batch_sizes, args.precision, device, workdir)
        trainer = kdpipe_impl.trainer
        plain_impl = PlainStep(
            plain_teacher,
            plain_student,
            data,
            cfg,
            kd,
            precision=trainer.precision,
            channels_last=trainer.channels_last,
            compile_mode=cfg.performance.compile_mode if args.compile else None,
            device=device,
        )
        dtype = trainer.amp_dtype or torch.float32
        peaks_before = matmul_peaks(device, dtype)
        setup_s = time.perf_counter() - t_setup

        load_before = os.getloadavg()
        t0 = time.perf_counter()
        cells = measure([kdpipe_impl, plain_impl], batch_sizes, steps, args)
        measure_s = time.perf_counter() - t0
        load_after = os.getloadavg()
        del keep_alive
        # Best of the measurements before and after the steps: a busy moment lowers one of them, never both.
        peaks_after = peaks_before if args.smoke else matmul_peaks(device, dtype)
        peaks = {k: max(v, peaks_after[k]) for k, v in peaks_before.items()}
        dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        peak = max(v for k, v in peaks.items() if k.startswith(dtype_name + "_"))

    rows = summarize(cells, steps, flops_per_image, peak)
    met, not_measured = targets_met(rows, device, trainer.precision, data)
    applicable = [v for v in met.values() if v is not None]
    name = f"train_throughput_{device.type}" + ("_smoke" if args.smoke else "")
    result: dict[str, Any] = {
        "method": __doc__.split("Method: ", 1)[1].split("\n\n", 1)[0].replace("\n", " "),
        "smoke": args.smoke,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "teacher": TEACHER,
        "student": STUDENT,
        "input_shape": list(SHAPE),
        "num_classes": NUM_CLASSES,
        "precision_requested": args.precision,
        "precision": trainer.precision,
        "channels_last": trainer.channels_last,
        "compile": args.compile,
        "compile_mode": args.compile_mode if args.compile else None,
        "fused_optimizer": device.type == "cuda",
        "train_config": cfg.model_dump(mode="json", include={"lr", "momentum", "nesterov", "weight_decay"}),
        "kd_params": kd.model_dump(mode="json"),
        "threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "warmup_steps": args.warmup,
        "repeats": args.repeats,
        "load_average_1_5_15": {"before": load_before, "after": load_after},
        "seconds": {"setup": setup_s, "measurement": measure_s},
        "data": {
            "source": data.source,
            "train_samples": n,
            "train_images_bytes": data.images.nbytes,
            "resident_bytes_measured_cuda": data.resident_bytes_measured,
            "cifar100_train_test_bytes": resident_bytes(data)[0],
            "cifar100_train_test_bytes_how": resident_bytes(data)[1],
        },
        "flops_per_image": flops_per_image,
        "matmul_peak_tflops": peaks,
        "peak_tflops_used": {"dtype": dtype_name, "tflops": peak},
        "results": rows,
        "targets": {
            "cpu_kdpipe_over_plain_step_time_max": TARGET_CPU_RATIO,
            "cuda_bf16_images_per_s_batch512_min": TARGET_CUDA_IMAGES_PER_S,
            "cuda_cifar100_resident_bytes_max": TARGET_RESIDENT_BYTES,
        },
        "met": met,
        "not_measured": not_measured,
        "all_met": all(applicable) if applicable else None,
    }
    if device.type == "cpu":
        result["peak_rss_bytes"] = peak_rss_bytes()
    path = write(args.out, name, result)
    print(markdown(rows, device))
    print(f"matmul peak ({dtype_name}): {peak:.3f} TFLOP/s; step GFLOPs/image: {flops_per_image['step'] / 1e9:.3f}")
    size, how = resident_bytes(data)
    print(f"CIFAR-100 train+test uint8 residency: {size / 1e6:.1f} MB ({how})")
    print(json.dumps({"met": met, "all_met": result["all_met"]}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
