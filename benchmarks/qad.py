"""Quantization-aware distillation against post-training quantization, on real CIFAR-100, measured on a CPU.

The question: when int8 post-training quantization (PTQ) of a compact distilled student loses accuracy, how much of
it does kdpipe's ``qad`` stage (ModelOpt fake quantization, fine-tuned with KD from the teacher) win back, at what
latency, and what does parity-gated mixed precision (the most sensitive layers kept in float) buy instead?

Protocol (every run goes through the real CLI, ``kdpipe run``):

1. One teacher (``--teacher``, default resnet20) is trained on the full CIFAR-100 JPEG copy
   (../shared/data/cifar100-jpg.tar.gz; 49,000 train images, 1,000 held out as a validation split, 10,000 test)
   once, seed 0.
2. For each seed, a student (``--student``, default timm's mobilenetv3_small_100: depthwise convolutions, hard-swish
   and squeeze-excite, the kind PTQ hurts; mobilenetv2_x0_5_cifar lost under half a point) is distilled from it with
   KD (``--distill-precision``, default bf16: only how the fp32 student is obtained); then, from the same student:
   - ``onnx``: the fp32 ONNX (the latency reference);
   - ``ptq``: onnx-int8, static QDQ calibrated on 512 training images;
   - ``mixed``: the same int8 graph with ``mixed_precision: --mixed-budget`` and an agreement target
     ``--mixed-agreement`` on the 1,000 held-out images (layers ranked there, never on the test split);
   - ``qad``: the qad stage, fine-tuned ``--qad-epochs`` epochs with KD from the teacher, written in the same int8
     layout as ``ptq`` (onnxruntime's), re-quantized from the fine-tuned weights with the same calibration images.
   ``--weights per-tensor`` (default) quantizes each weight tensor with one scale in all three int8 graphs, which is
   what makes PTQ lose points on a depthwise network; ``per-channel`` is the easy case.
3. Latency: onnxruntime CPU (2 threads) of the fp32, PTQ, QAD and mixed graphs at batch 1 and 64, interleaved over
   ``--repeats`` rounds (p50 of each round; the table gives the median over rounds and QAD/PTQ's ratio with its
   range), run alone after training.

Targets (issue 19): PTQ loses >= 1 point against fp32; QAD recovers >= 70 % of PTQ's drop; QAD's int8 latency within
10 % of PTQ's.

Writes ``benchmarks/results/qad_cpu.json`` and ``.md`` (or ``--name``) with device, versions and commit.
``--smoke`` runs a tiny version (1 epoch each, 2 classes' worth of work) to check the flow; ``--phase latency``
re-measures latency from finished runs.

    python benchmarks/qad.py [--work DIR] [--seeds 0 1] [--jobs 2] [--teacher-epochs 20] [--epochs 15]
        [--qad-epochs 4] [--weights per-tensor|per-channel] [--phase all|train|latency] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from _common import SHARED_DATA, write_result

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = SHARED_DATA / "cifar100-jpg.tar.gz"
GRAPHS = ("fp32", "ptq", "qad", "mixed")
CONTROL_KEYS = ("control_fp32_top1", "control_ptq_top1")
BATCHES = (1, 64)


def _train(epochs: int, lr: float, batch_size: int = 128) -> dict[str, Any]:
    return {
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "schedule": {"name": "cosine"},
    }


def _data(root: Path, val_fraction: float) -> dict[str, Any]:
    return {
        "kind": "imagefolder",
        "root": str(root),
        "image_size": 32,
        "augment": "cifar",
        "val_fraction": val_fraction,
    }


OPEN = {"min_agreement": 0.0, "max_top1_drop": 1.0}
"""Parity gates wide open: this benchmark records what each graph does; it does not stop at a gate."""


def teacher_yaml(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "version": 1,
        "name": "qad-teacher",
        "seed": 0,
        "device": "cpu",
        "data": _data(args.data, args.val_fraction),
        "stages": {
            "teacher": {
                "type": "teacher",
                "model": args.teacher,
                "weights": {"train": _train(args.teacher_epochs, 0.1)},
                "precision": "fp32",
            }
        },
    }


def _teacher_top1(teacher_dir: Path, runs: list[Path]) -> float:
    """The teacher's test top-1: from its own run, else as a student run's teacher stage measured it."""
    for run in [teacher_dir, *runs]:
        top1 = _json(run / "teacher" / "result.json").get("metrics", {}).get("top1")
        if top1 is not None:
            return float(top1)
    return float("nan")


def student_yaml(args: argparse.Namespace, seed: int, teacher_weights: Path) -> dict[str, Any]:
    per_channel = args.weights == "per-channel"
    int8 = {"format": "onnx-int8", "calibration_samples": 512, "per_channel": per_channel, "simplify": False}
    return {
        "version": 1,
        "name": f"qad-s{seed}",
        "seed": seed,
        "device": "cpu",
        "data": _data(args.data, args.val_fraction),
        "stages": {
            "teacher": {"type": "teacher", "model": args.teacher, "weights": {"checkpoint": str(teacher_weights)}},
            "distill": {
                "type": "distill",
                "student": args.student,
                "method": {"name": "kd", "temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9},
                # --smoke: one epoch on 1,000 images at 0.05 can diverge (logits ~1e10), and QAD of that goes nan
                "train": _train(args.epochs, 0.01 if args.smoke else 0.05),
                # fp32 by default, as the teacher and the qad stage; --distill-precision bf16 only changes how the
                # fp32 student is obtained (3x faster on a bf16 CPU): PTQ, QAD and the control all start from it
                "precision": args.distill_precision,
            },
            # --smoke's one-epoch students can have logits in the hundreds, where 1e-2 is below float rounding
            "onnx": {"type": "export", "format": "onnx", "parity": {"max_abs_diff": 1e6 if args.smoke else 1e-2}},
            "ptq": {"type": "export", "needs": ["distill"], **int8, "parity": OPEN},
            "qad": {
                "type": "qad",
                "needs": ["distill"],
                "method": {"name": "kd", "temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9},
                "train": _train(args.qad_epochs, args.qad_lr),
                "calibration_samples": 512,
                "per_channel": per_channel,
                "parity": OPEN,
                "max_drop_vs_fp32": 1.0,
            },
            "mixed": {
                "type": "export",
                "needs": ["distill"],
                **int8,
                "mixed_precision": args.mixed_budget,
                "parity": {**OPEN, "min_agreement": args.mixed_agreement},
            },
        },
    }


def control_yaml(args: argparse.Namespace, seed: int, teacher_weights: Path, student: Path) -> dict[str, Any]:
    """The fp32 control of QAD: the distilled student (``student``, its checkpoint) fine-tuned with the qad stage's
    KD, epochs and lr but without fake quantization, then quantized as PTQ is. QAD minus this control is what
    training under quantization adds beyond training longer."""
    raw = student_yaml(args, seed, teacher_weights)
    stages = raw["stages"]
    qad = stages["qad"]
    raw["name"] = f"qad-control-s{seed}"
    raw["stages"] = {
        "teacher": stages["teacher"],
        "control": {
            **stages["distill"],
            "student_weights": {"checkpoint": str(student)},
            "method": qad["method"],
            "train": qad["train"],
            "precision": "fp32",  # as the qad stage fine-tunes, whatever --distill-precision was
        },
        "control_ptq": {**stages["ptq"], "needs": ["control"]},
    }
    return raw


def _write(raw: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def run_kdpipe(recipe: Path, run_dir: Path, threads: int | None = None) -> int:
    """``python -m kdpipe run`` of ``recipe`` into ``run_dir`` (up-to-date stages are skipped); its exit code."""
    command = [sys.executable, "-m", "kdpipe", "-q", "run", str(recipe), "--out", str(run_dir)]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    print("$", " ".join(command), file=sys.stderr, flush=True)
    return subprocess.run(command, cwd=REPO, env=env, check=False).returncode


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def collect(run_dir: Path) -> dict[str, Any]:
    """One seed's accuracy: the fp32 student, PTQ, QAD and mixed precision (test top-1, fractions), what mixed
    precision kept in float, QAD's own PTQ baseline, and training times."""
    distill, ptq, qad = (_json(run_dir / s / "result.json") for s in ("distill", "ptq", "qad"))
    mixed_parity, mixed = _json(run_dir / "mixed" / "parity.json"), _json(run_dir / "mixed" / "mixed_precision.json")
    row: dict[str, Any] = {
        "fp32_top1": distill["metrics"]["top1"],
        "ptq_top1": ptq["metrics"]["top1"],
        "qad_top1": qad["metrics"]["top1"],
        "qad_ptq_baseline_top1": qad["metrics"]["ptq_top1"],  # the qad stage's own PTQ: equal to ptq_top1
        # the fake-quantized network the int8 graph was exported from, and how often the two agree on test images
        "qad_network_top1": qad["metrics"].get("torch_top1"),
        "qad_graph_agreement": qad["metrics"].get("top1_agreement"),
        "mixed_top1": mixed_parity.get("export_top1"),
        "mixed_float_layers": mixed.get("float_layers"),
        "mixed_agreement": [mixed.get("agreement_int8"), mixed.get("agreement_mixed")],
        "distill_seconds": distill["info"]["train_seconds"],
        "qad_seconds": qad["info"]["qad"]["train_seconds"],
        "params": distill["metrics"]["params"],
    }
    control = [_json(control_dir(run_dir) / stage / "result.json") for stage in ("control", "control_ptq")]
    if all(control):
        row.update({key: result["metrics"]["top1"] for key, result in zip(CONTROL_KEYS, control, strict=True)})
    lost = row["fp32_top1"] - row["ptq_top1"]
    row["ptq_drop"] = lost
    row["qad_drop"] = row["fp32_top1"] - row["qad_top1"]
    row["recovered"] = (row["qad_top1"] - row["ptq_top1"]) / lost if lost > 0 else None
    return row


def control_dir(run_dir: Path) -> Path:
    return run_dir.with_name(run_dir.name + "-control")


def graphs(run_dir: Path) -> dict[str, Path]:
    mixed = run_dir / "mixed" / "model.onnx"
    return {
        "fp32": run_dir / "onnx" / "model.onnx",
        "ptq": run_dir / "ptq" / "model.onnx",
        "qad": run_dir / "qad" / "model.onnx",
        **({"mixed": mixed} if mixed.is_file() and (run_dir / "mixed" / "mixed_precision.json").is_file() else {}),
    }


def measure_latency(paths: dict[str, Path], repeats: int, threads: int, min_time_s: float) -> dict[str, Any]:
    """p50 per round of every graph at every batch size, rounds interleaved (fp32, ptq, qad, mixed, fp32, ...) so
    a slow spell of the shared machine falls on all of them; kdpipe's own benchmark machinery times each cell."""
    from kdpipe.bench import BenchTarget, run_benchmark

    rounds: dict[str, dict[int, list[float]]] = {g: {b: [] for b in BATCHES} for g in paths}
    for _ in range(repeats):
        for label, path in paths.items():
            cells = run_benchmark(
                [BenchTarget(label, "onnxruntime", path)],
                list(BATCHES),
                (3, 32, 32),
                warmup=5,
                min_iterations=20,
                min_time_s=min_time_s,
                threads=threads,
                device="cpu",
            )
            for cell in cells:
                if cell.p50_ms is None:
                    raise RuntimeError(f"{path}: {cell.error}")
                rounds[label][cell.batch_size].append(cell.p50_ms)
    out: dict[str, Any] = {"p50_ms_rounds": {g: {str(b): v for b, v in r.items()} for g, r in rounds.items()}}
    out["p50_ms"] = {g: {str(b): statistics.median(v) for b, v in r.items()} for g, r in rounds.items()}
    ratios: dict[str, Any] = {}
    for other in ("qad", "mixed"):
        if other not in rounds:
            continue
        for b in BATCHES:
            per_round = [q / p for q, p in zip(rounds[other][b], rounds["ptq"][b], strict=True)]
            ratios[f"{other}/ptq@{b}"] = {
                "median": statistics.median(per_round),
                "min": min(per_round),
                "max": max(per_round),
            }
    out["ratios"] = ratios
    return out


def _pm(values: list[float]) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {sd:.2f}"


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over seeds (top-1 in %, drops in points), the share of PTQ's drop QAD recovers, and the targets."""
    ok = [r for r in rows if "error" not in r]

    def pct(key: str) -> list[float]:
        return [100.0 * r[key] for r in ok if r.get(key) is not None]

    drop_ptq = statistics.fmean(pct("ptq_drop")) if ok else float("nan")
    drop_qad = statistics.fmean(pct("qad_drop")) if ok else float("nan")
    recovered = (drop_ptq - drop_qad) / drop_ptq if drop_ptq > 0 else None
    return {
        "fp32_top1": pct("fp32_top1"),
        "ptq_top1": pct("ptq_top1"),
        "qad_top1": pct("qad_top1"),
        "mixed_top1": pct("mixed_top1"),
        **{key: pct(key) for key in CONTROL_KEYS},
        "ptq_drop_points": drop_ptq,
        "qad_drop_points": drop_qad,
        "recovered_share": recovered,
        "targets": {
            "ptq_drop_at_least_1_point": drop_ptq >= 1.0,
            "qad_recovers_70_percent": recovered is not None and recovered >= 0.7,
        },
    }


def markdown(result: dict[str, Any]) -> str:
    s, env, meta = result["summary"], result["environment"], result["protocol"]
    if not s["fp32_top1"]:
        errors = "; ".join(f"seed {r['seed']}: {r.get('error')}" for r in result["rows"])
        return f"# Quantization-aware distillation vs post-training quantization (CPU)\n\nNo seed finished: {errors}\n"
    lat = result.get("latency", {})
    lines = [
        "# Quantization-aware distillation vs post-training quantization (CPU)",
        "",
        f"- CIFAR-100 JPEG copy: 49,000 train / 1,000 held-out / 10,000 test images. Teacher `{meta['teacher']}` "
        f"({meta['teacher_epochs']} epochs, test top-1 {meta['teacher_top1']:.2%}); student `{meta['student']}` "
        f"distilled with KD for {meta['epochs']} epochs "
        f"({meta.get('distill_precision', 'fp32')}); seeds {meta['seeds']}.",
        f"- int8 graphs: onnxruntime static QDQ, {meta['weights']} weights (7-bit, reduced range), uint8 activations "
        "calibrated on 512 training images. QAD: the qad stage, "
        f"{meta['qad_epochs']} epochs of KD at lr {meta['qad_lr']} under ModelOpt fake quantization, re-quantized in "
        "the same layout with the scales fine-tuning trained. "
        f"Mixed: onnx-int8 with mixed_precision {meta['mixed_budget']} "
        f"(target agreement {meta['mixed_agreement']} with fp32 on the held-out images).",
        f"- {env.get('date', '')}, {env.get('device')}, {env.get('cpu_count')} CPUs, torch {env.get('torch')}, "
        f"onnxruntime {env.get('onnxruntime')}, modelopt {meta.get('modelopt')}, commit `{env.get('commit')}`.",
        f"- `{meta['command']}`",
        "",
        "| | fp32 | PTQ int8 | QAD int8 | mixed (PTQ + float layers) |",
        "|---|---|---|---|---|",
        f"| test top-1 (%) | {_pm(s['fp32_top1'])} | {_pm(s['ptq_top1'])} | {_pm(s['qad_top1'])} | "
        f"{_pm(s['mixed_top1']) if s['mixed_top1'] else '—'} |",
        f"| drop vs fp32 (points) | — | {s['ptq_drop_points']:.2f} | {s['qad_drop_points']:.2f} | "
        f"{statistics.fmean(s['fp32_top1']) - statistics.fmean(s['mixed_top1']):.2f} |"
        if s["mixed_top1"]
        else f"| drop vs fp32 (points) | — | {s['ptq_drop_points']:.2f} | {s['qad_drop_points']:.2f} | — |",
    ]
    if lat:
        for b in BATCHES:
            cells = [
                f"{lat['p50_ms'][g][str(b)]:.3f}" if g in lat["p50_ms"] else "—"
                for g in ("fp32", "ptq", "qad", "mixed")
            ]
            lines.append(f"| p50 ms, batch {b} (seed {lat['seed']}) | " + " | ".join(cells) + " |")
    recovered = s["recovered_share"]
    lines += [
        "",
        f"QAD recovers {recovered:.0%} of PTQ's drop (target >= 70 %; PTQ's drop target >= 1 point: "
        f"{'met' if s['targets']['ptq_drop_at_least_1_point'] else 'missed'})."
        if recovered is not None
        else "PTQ lost nothing here: there is no drop to recover.",
        "",
    ]
    if s.get("control_ptq_top1"):
        control_gain = statistics.fmean(s["control_ptq_top1"]) - statistics.fmean(s["ptq_top1"])
        qad_gain = statistics.fmean(s["qad_top1"]) - statistics.fmean(s["ptq_top1"])
        lines += [
            f"fp32 control (the distilled student fine-tuned {meta['qad_epochs']} more epochs with the same KD and lr, "
            f"no fake quantization): fp32 {_pm(s['control_fp32_top1'])}, its PTQ int8 {_pm(s['control_ptq_top1'])}. "
            f"Over PTQ of the original student, QAD gains {qad_gain:+.2f} points and the control's PTQ "
            f"{control_gain:+.2f}: {qad_gain - control_gain:+.2f} points are what training under quantization adds "
            "beyond training longer.",
        ]
    else:
        lines.append(
            f"QAD trains the student {meta['qad_epochs']} more epochs (under fake quantization); without the fp32 "
            "control (--control) part of QAD's gain over PTQ may be that extra training rather than "
            "quantization-awareness."
        )
    if lat:
        for key, r in lat["ratios"].items():
            lines.append(f"- latency {key}: {r['median']:.3f} (range {r['min']:.3f}-{r['max']:.3f} over rounds)")
    lines += [
        "",
        "Per seed:",
        "",
        "| seed | fp32 | PTQ | QAD | QAD network (agreement) | mixed | float layers (mixed) | QAD's own PTQ "
        "| control fp32 | control PTQ |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['seed']} | error: {r['error']} | | | | | | | | |")
            continue
        mixed = f"{100 * r['mixed_top1']:.2f}" if r.get("mixed_top1") is not None else "—"
        control = [f"{100 * r[k]:.2f}" if r.get(k) is not None else "—" for k in CONTROL_KEYS]
        network = (
            f"{100 * r['qad_network_top1']:.2f} ({r['qad_graph_agreement']:.2f})"
            if r.get("qad_network_top1") is not None
            else "—"
        )
        lines.append(
            f"| {r['seed']} | {100 * r['fp32_top1']:.2f} | {100 * r['ptq_top1']:.2f} | {100 * r['qad_top1']:.2f} | "
            f"{network} | {mixed} | {len(r.get('mixed_float_layers') or [])} | "
            f"{100 * r['qad_ptq_baseline_top1']:.2f} | "
            f"{control[0]} | {control[1]} |"
        )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--work", type=Path, default=Path("/tmp/kdpipe-qad-bench"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--jobs", type=int, default=2, help="student runs side by side, one thread each")
    p.add_argument("--teacher", default="resnet20")
    p.add_argument("--student", default="mobilenetv3_small_100")
    p.add_argument("--teacher-epochs", type=int, default=20)
    p.add_argument(
        "--teacher-weights", type=Path, help="a teacher checkpoint trained before (its --teacher-epochs): no training"
    )
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--distill-precision", choices=["fp32", "bf16"], default="bf16", help="the distill stage's")
    p.add_argument("--qad-epochs", type=int, default=4)
    p.add_argument("--qad-lr", type=float, default=0.005)
    p.add_argument("--weights", choices=["per-tensor", "per-channel"], default="per-tensor")
    p.add_argument("--mixed-budget", type=int, default=8)
    p.add_argument("--mixed-agreement", type=float, default=0.97)
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--control",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also fine-tune the fp32 student as QAD does, without quantization, and quantize it (the fp32 control)",
    )
    p.add_argument("--phase", choices=["all", "train", "latency"], default="all")
    p.add_argument("--name", default="qad_cpu")
    p.add_argument("--results", type=Path, default=None, help="folder for the results (default benchmarks/results)")
    p.add_argument("--smoke", action="store_true", help="1 epoch each, 1 round of latency: checks the flow only")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.teacher_epochs = args.epochs = args.qad_epochs = 1
        args.repeats, args.mixed_budget = 1, 2
    args.data = args.data.absolute()
    if not args.data.exists():
        print(f"{args.data} is absent (the CIFAR-100 archive ships beside the checkout)", file=sys.stderr)
        return 2
    work = args.work.absolute()
    teacher_dir = work / "teacher"
    t0 = time.time()
    train = args.phase in ("all", "train")
    if args.teacher_weights is not None:  # a teacher trained before (by this script): not trained again
        teacher_weights = args.teacher_weights.absolute()
    else:
        if train and run_kdpipe(_write(teacher_yaml(args), work / "teacher.yaml"), teacher_dir) != 0:
            return 1
        teacher_weights = teacher_dir / "teacher" / "model.safetensors"
    recipes = {s: _write(student_yaml(args, s, teacher_weights), work / f"student-s{s}.yaml") for s in args.seeds}
    if train:
        threads = 1 if args.jobs > 1 else None
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            codes = list(pool.map(lambda s: run_kdpipe(recipes[s], work / f"s{s}", threads), args.seeds))
        print("exit codes:", dict(zip(args.seeds, codes, strict=True)), file=sys.stderr)
        if args.control:
            students = {s: work / f"s{s}" / "distill" / "model.safetensors" for s in args.seeds}
            controls = {
                s: _write(control_yaml(args, s, teacher_weights, student), work / f"control-s{s}.yaml")
                for s, student in students.items()
                if student.is_file()
            }
            with ThreadPoolExecutor(max_workers=args.jobs) as pool:
                codes = list(
                    pool.map(lambda s: run_kdpipe(controls[s], control_dir(work / f"s{s}"), threads), controls)
                )
            print("control exit codes:", dict(zip(controls, codes, strict=True)), file=sys.stderr)
    rows = []
    for seed in args.seeds:
        try:
            rows.append({"seed": seed, **collect(work / f"s{seed}")})
        except (KeyError, TypeError) as exc:
            rows.append({"seed": seed, "error": f"incomplete run: {exc!r}"})
    result: dict[str, Any] = {
        "protocol": {
            "teacher": args.teacher,
            "student": args.student,
            "teacher_epochs": args.teacher_epochs,
            "teacher_top1": _teacher_top1(teacher_dir, [work / f"s{s}" for s in args.seeds]),
            "epochs": args.epochs,
            "distill_precision": args.distill_precision,
            "qad_epochs": args.qad_epochs,
            "qad_lr": args.qad_lr,
            "weights": args.weights,
            "mixed_budget": args.mixed_budget,
            "mixed_agreement": args.mixed_agreement,
            "control": args.control,
            "seeds": args.seeds,
            "smoke": args.smoke,
            "command": "python benchmarks/qad.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "modelopt": _version("nvidia-modelopt"),
        },
        "rows": rows,
        "summary": summarize(rows),
    }
    ok = [r for r in rows if "error" not in r]
    if ok and args.phase in ("all", "latency"):
        seed = ok[0]["seed"]
        result["latency"] = {
            "seed": seed,
            "threads": args.threads,
            "repeats": args.repeats,
            **measure_latency(graphs(work / f"s{seed}"), args.repeats, args.threads, 0.2 if args.smoke else 1.0),
        }
    result["wall_seconds"] = time.time() - t0
    path = write_result(args.name, result, args.results)
    # the environment the json recorded: taken again now, the commit would read "-dirty" for the json just written
    path.with_suffix(".md").write_text(markdown(json.loads(path.read_text(encoding="utf-8"))), encoding="utf-8")
    print(path.with_suffix(".md").read_text(encoding="utf-8"))
    return 0 if ok else 1


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
