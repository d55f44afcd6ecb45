"""Parts 3 and 4: every registered KD method trained a few steps in each precision through kdpipe's own Trainer, and
benchmarks/train_throughput.py run eager, compiled, and compiled with CUDA graphs against the images/s target."""

from __future__ import annotations

import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from .context import Acceptance
from .core import NEEDS_CUDA, PARTS, REPO, TAIL_CHARS, OutOfTime, PartRecord, describe_error
from .sizes import SEED

TARGET_IMAGES_PER_S = 30_000
"""kdpipe's training throughput target: resnet32x4 -> resnet8x4, batch 512, bf16, on one GPU."""


def _method_cell(acc: Acceptance, name: str, precision: str) -> dict[str, Any]:
    """Three steps (one short epoch) of method ``name`` in ``precision`` through ``Trainer.fit``."""
    import torch

    from kdpipe.config import TrainConfig
    from kdpipe.data import TensorSplit, sample_indices
    from kdpipe.distill.methods import MethodContext, create_method
    from kdpipe.distill.trainer import Trainer
    from kdpipe.registry import METHODS

    splits, device, sizes = acc.device_splits(), acc.device, acc.sizes
    cls = METHODS.get(name)
    params = cls.Params()
    teacher_name = sizes.teacher if cls.teacher_role != "none" else None
    cls.check_pair(params, sizes.student, teacher_name)
    torch.manual_seed(SEED)
    teacher = acc.network(sizes.teacher) if teacher_name else None
    if teacher is not None and cls.teacher_role == "joint":
        teacher.train()
    student = acc.network(sizes.student)
    batch, steps = sizes.method_batch, sizes.method_steps
    context = MethodContext.from_splits(
        splits,
        batch_size=batch,
        seed=SEED,
        device=device,
        student_name=sizes.student,
        teacher_name=teacher_name or "",
    )
    method = create_method(params, student, teacher, context)
    train, test = splits.train, splits.test
    assert isinstance(train, TensorSplit) and isinstance(test, TensorSplit)
    n_eval = min(sizes.method_eval_images, len(test))
    # Drawn from the resident splits (gathered on the device): an ImageFolder split is sorted by class, its first
    # images would all be one class.
    picked = sample_indices(len(train), batch * steps, SEED, "acceptance-methods-train").to(device)
    loader = acc.loader(TensorSplit(train.images[picked], train.labels[picked]), batch_size=batch, train=True)
    held = sample_indices(len(test), n_eval, SEED, "acceptance-methods-eval").to(device)
    evaluation = acc.loader(TensorSplit(test.images[held], test.labels[held]), batch_size=256, train=False)
    trainer = Trainer(
        method,
        TrainConfig(epochs=1, batch_size=batch, lr=0.05),
        train_batches=loader,
        eval_batches=evaluation,
        num_classes=splits.num_classes,
        device=device,
        checkpoint_path=acc.work / "methods" / f"{name}-{precision}.pt",
        fingerprint=f"gpu-acceptance-{name}-{precision}",
        precision=precision,  # type: ignore[arg-type]  # one of fp32 | bf16 | fp16
        label=f"{name} {precision}",
    )
    if acc.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = trainer.fit()
    if acc.cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    row = result.history[-1]
    loss = float(row["train_loss"])
    return {
        "method": name,
        "precision_requested": precision,
        "precision": trainer.precision,
        "precision_note": getattr(result, "precision_note", ""),
        "status": "ok" if math.isfinite(loss) else "failed",
        "steps": len(loader) * int(row["epoch"]),
        "batch_size": batch,
        "train_loss": loss,
        "loss_finite": math.isfinite(loss),
        "eval_top1": row.get("eval_top1"),
        "networks": sorted(method.networks()),
        "seconds": round(seconds, 3),
        "peak_cuda_bytes": torch.cuda.max_memory_allocated() if acc.cuda else None,
    }


def part_methods(acc: Acceptance, rec: PartRecord) -> None:
    """Every registered method x precision for a few steps on the resident data."""
    import torch

    import kdpipe.distill.methods  # noqa: F401  (importing the package registers every method)
    from kdpipe.registry import METHODS

    splits = acc.device_splits()
    names = [entry.name for entry in METHODS.in_registration_order()]
    if not names:
        raise RuntimeError("kdpipe.registry.METHODS is empty: no KD method registered")
    rec.results.update(
        methods=names,
        teacher=acc.sizes.teacher,
        student=acc.sizes.student,
        data=acc.data_record,
        cells=[],
    )
    (acc.work / "methods").mkdir(exist_ok=True)
    failures: list[str] = []
    for name in names:
        for precision in acc.sizes.precisions:
            cell: dict[str, Any]
            try:
                acc.require_time(f"method {name} {precision}")
                cell = _method_cell(acc, name, precision)
            except OutOfTime as exc:
                cell = {"method": name, "precision_requested": precision, "status": "skipped", "reason": str(exc)}
            except Exception as exc:
                cell = {"method": name, "precision_requested": precision, "status": "failed"}
                cell.update(error=describe_error(exc), traceback=traceback.format_exc()[-TAIL_CHARS:])
            if cell["status"] == "failed":
                failures.append(f"{name} {precision}: {cell.get('error') or 'loss ' + str(cell.get('train_loss'))}")
            rec.results["cells"].append(cell)
            print(f"    {name:>13} {precision}: {_cell_line(cell)}", flush=True)
            if acc.cuda:
                torch.cuda.empty_cache()
        for precision in acc.sizes.skipped_precisions:
            why = f"{NEEDS_CUDA}: {precision} autocast is a GPU setting (the Trainer trains fp16 as fp32 on CPU)"
            rec.results["cells"].append(
                {"method": name, "precision_requested": precision, "status": "skipped", "reason": why}
            )
    cells = rec.results["cells"]
    ran = [c for c in cells if c["status"] in ("ok", "failed")]
    finite = [c for c in ran if c.get("loss_finite")]
    expected = len(names) * len(acc.sizes.precisions)
    rec.target(
        "every_method_trains_with_finite_loss",
        value=f"{len(finite)}/{expected}",
        threshold=f"{expected}",
        rule="every method x precision ran its steps with a finite loss",
        met=len(finite) == expected,
    )
    rec.summary = f"{len(finite)} of {expected} cells finite on {splits.name or acc.data.label}"
    if failures:
        raise RuntimeError("; ".join(failures))
    skipped = [c for c in cells if c["status"] == "skipped" and "time budget" in c.get("reason", "")]
    if skipped:
        raise OutOfTime(f"time budget: {len(skipped)} method cells not run")


def _cell_line(cell: dict[str, Any]) -> str:
    """One method cell in the log."""
    if cell["status"] == "ok":
        return (
            f"ok, {cell['steps']} steps, loss {cell['train_loss']:.4f}, {cell['seconds']:.2f} s ({cell['precision']})"
        )
    return f"{cell['status']}: {cell.get('error') or cell.get('reason') or cell.get('train_loss')}"


def _throughput_row(path: Path) -> dict[str, Any]:
    """The numbers a train_throughput.py result holds for its largest batch."""
    data = json.loads(path.read_text(encoding="utf-8"))
    row = data["results"][-1]
    kd, plain = row["kdpipe"], row["plain"]
    return {
        "batch_size": row["batch_size"],
        "precision": data["precision"],
        "compile": data["compile"],
        "compile_mode": data.get("compile_mode"),
        "kdpipe_images_per_s": kd["images_per_s"],
        "plain_images_per_s": plain["images_per_s"],
        "kdpipe_over_plain_time": row["ratio_kdpipe_over_plain"],
        "kdpipe_tflops": kd["tflops"],
        "kdpipe_max_memory_allocated_bytes": kd.get("max_memory_allocated_bytes"),
        "plain_max_memory_allocated_bytes": plain.get("max_memory_allocated_bytes"),
        "peak_rss_bytes": data.get("peak_rss_bytes"),
        "met": data["met"],
        "not_measured": data["not_measured"],
        "setup_s": data["seconds"]["setup"],
        "measure_s": data["seconds"]["measurement"],
    }


def throughput_variants(dry_run: bool, threads: int = 1) -> list[tuple[str, list[str], float]]:
    """(name, train_throughput.py arguments, timeout in s) of each measured variant: on the GPU eager, compiled and
    compiled with CUDA graphs at batch 512 in bf16 (fewer rounds when compiled: the compile dominates); the CPU smoke
    run in a dry run."""
    if dry_run:
        return [("eager", ["--smoke", "--device", "cpu", "--threads", str(threads)], 240.0)]
    base = ["--device", "cuda", "--batch-sizes", "512", "--precision", "bf16"]
    compiled = ["--repeats", "2", "--steps", "30", "--warmup", "5", "--compile"]
    return [
        ("eager", [*base, "--repeats", "3"], 120.0),
        ("compile", [*base, *compiled], 150.0),
        ("reduce-overhead", [*base, *compiled, "--compile-mode", "reduce-overhead"], 150.0),
    ]


def part_throughput(acc: Acceptance, rec: PartRecord) -> None:
    """benchmarks/train_throughput.py: eager, torch.compile, and compile with CUDA graphs."""
    script = str(REPO / "benchmarks" / "train_throughput.py")
    variants = throughput_variants(acc.dry_run, acc.args.threads)
    later = PARTS[PARTS.index("throughput") + 1 :]
    selected = acc.args.parts or PARTS
    reserve = 0.0 if acc.dry_run or not set(later) & set(selected) else acc.args.reserve_s
    rows: dict[str, Any] = {}
    failures = []
    for name, args, cap in variants:
        available = acc.remaining() - (reserve if name != "eager" else 0.0)
        if available < 60:
            rows[name] = {"status": "skipped", "reason": f"time budget: {reserve:.0f} s kept for the parts after"}
            continue
        out = acc.work / f"throughput_{name}.json"
        command = acc.run(
            [sys.executable, script, *args, "--out", str(out)], timeout=min(cap, available), name=f"throughput-{name}"
        )
        if command.timed_out and command.budget_capped:
            rows[name] = {"status": "skipped", **command.describe(), "reason": "time budget: stopped when it ran out"}
            continue
        if command.rc != 0 or not out.is_file():
            failures.append(name)
            rows[name] = {"status": "failed", **command.describe(), "error": command.tail()}
            continue
        rows[name] = {"status": "ok", **command.describe(), **_throughput_row(out)}
    if acc.dry_run:
        why = (
            f"{NEEDS_CUDA}: torch.compile variants are timed on the GPU (inductor's CPU C++ build of four networks "
            "takes minutes on 2 cores)"
        )
        for name in ("compile", "reduce-overhead"):
            rows[name] = {"status": "skipped", "reason": why}
    rec.results["variants"] = rows
    for name, row in rows.items():
        value = row.get("kdpipe_images_per_s") if row.get("status") == "ok" else None
        if acc.cuda and value is not None:
            met: bool | None = value >= TARGET_IMAGES_PER_S
            why_not = None
        else:
            met = None
            why_not = (
                f"{NEEDS_CUDA}: the target is CUDA bf16 at batch 512" if not acc.cuda else row.get("reason", "not run")
            )
        rec.target(
            f"images_per_s_{name}",
            value=value,
            threshold=TARGET_IMAGES_PER_S,
            rule=f"kdpipe images/s at batch 512, bf16, {name} >= {TARGET_IMAGES_PER_S}",
            met=met,
            why=why_not,
        )
    rec.summary = ", ".join(
        f"{n}: {r['kdpipe_images_per_s']:,.0f} img/s" if r.get("status") == "ok" else f"{n}: {r['status']}"
        for n, r in rows.items()
    )
    if failures:
        raise RuntimeError(f"train_throughput.py failed for {', '.join(failures)}: {rows[failures[0]]['error']}")
