"""Method quality on real CIFAR, measured on a CPU: every KD method of kdpipe against the CE-only student.

A low-data protocol, which shows KD's gain clearly and fits a 2-core machine: the first ``--per-class`` training
images of each class of the CIFAR-10 JPEG copy (../shared/data/cifar10-jpg.tar.gz; by file name, so the subset is
fixed; default 250, a regime where the resnet20 teacher is 8 points above the CE-only resnet8 and KD's gain is
clear), evaluated on the FULL test split (10,000 images). One resnet20 teacher is trained once (seed 0, default 60
epochs) and shared by every offline method and seed; each method trains a resnet8 student for ``--epochs`` epochs
(SGD 0.05, momentum 0.9, wd 5e-4, batch 64, cosine, the same for every method) at each seed. Online methods train
from scratch: dml and switokd a resnet20 "teacher" network with the resnet8 student, ffsd two common resnet8 students
and a resnet8 leader; their deployed network is the resnet8, whose own baseline is the CE row (an independently
trained resnet8), and their resnet20 network's baseline is the shared teacher (an independently trained resnet20,
trained longer: compare with care).

Per-method settings follow each method's defaults (``kdpipe schema``), with warm-ups that the papers give in epochs of a
240-epoch run scaled to this run's length; fusion_ratio needs a validation split and holds 10 % of the subset out
(the others train on all of it). ``--jobs 2`` (the recorded table) runs two pinned single-thread runs side by side
after the teacher. Every run goes through the real CLI (``kdpipe run``, via kd_table.py's runner).

Writes ``benchmarks/results/method_quality_cpu.json`` and ``.md`` (or ``--name``): for each method mean ± std over
seeds of the best per-epoch test top-1 and the last-epoch test top-1, every seed's value, the wall time per run, the
gain over CE and the gap to KD, with device, versions and commit. ``--smoke`` shrinks everything to check the flow.

    python benchmarks/method_quality.py --jobs 2 [--seeds 0 1 2] [--methods ce kd ...] [--per-class 250]
        [--epochs 20] [--teacher-epochs 60] [--eval-every 10] [--data PATH] [--work DIR] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import kd_table
import yaml
from _common import SHARED_DATA, environment, write_result

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = SHARED_DATA / "cifar10-jpg.tar.gz"
TEACHER, STUDENT = "resnet20", "resnet8"
OFFLINE = ("kd", "dkd", "fusion_ratio", "dpk", "iakd")
JOINT = ("dml", "switokd")  # train the teacher stage's network with the student
METHODS = ("ce", *OFFLINE, *JOINT, "ffsd")
COST = {"ce": 1, "kd": 1.4, "dkd": 1.4, "fusion_ratio": 3.6, "dpk": 2, "iakd": 2, "dml": 3.3, "switokd": 3.3, "ffsd": 3}
"""Rough cost of one run relative to ce (measured on this protocol): --jobs starts the longest first."""
PAPER_EPOCHS = 240  # the CRD protocol the warm-up lengths below are given for
EVAL_EVERY = 10
"""Default epochs between test evaluations (10,000 images each, every network of an online method; about as long as
2-3 training epochs of the subset): the "best" column is over these, the last epoch always among them when --epochs
is a multiple."""


def method_params(name: str, epochs: int) -> dict[str, Any]:
    """The method block: defaults, warm-ups scaled from a PAPER_EPOCHS-epoch run, KD at the CRD convention."""
    warmup = max(1, round(20 * epochs / PAPER_EPOCHS))  # DKD's and DPK's 20 of 240 epochs
    blocks: dict[str, dict[str, Any]] = {
        "ce": {"name": "ce"},
        "kd": {"name": "kd", "temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9},
        "dkd": {"name": "dkd", "temperature": 4.0, "alpha": 1.0, "beta": 8.0, "warmup_epochs": warmup},
        "fusion_ratio": {"name": "fusion_ratio", "temperature": 4.0},
        "dpk": {"name": "dpk", "warmup_epochs": warmup},
        "iakd": {"name": "iakd"},
        "dml": {"name": "dml"},
        "switokd": {"name": "switokd"},
        "ffsd": {"name": "ffsd"},
    }
    return blocks[name]


def parse_variant(text: str) -> tuple[str, str, dict[str, Any]]:
    """``NAME=METHOD[:key=value,...]`` (values in YAML: 0.9, true, [1, 2]) -> (name, method, param overrides): an
    extra row, e.g. ``dpk_kd09=dpk:ce_weight=0.1,kd_weight=0.9`` for an ablation of a method's defaults."""
    name, sep, rest = text.partition("=")
    method, _, assignments = rest.partition(":")
    if not sep or not name.isidentifier() or method not in METHODS or name in METHODS:
        raise argparse.ArgumentTypeError(
            f"--variant {text!r}: expected NAME=METHOD[:key=value,...] with a new NAME and METHOD one of {METHODS}"
        )
    overrides: dict[str, Any] = {}
    for item in filter(None, assignments.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise argparse.ArgumentTypeError(f"--variant {text!r}: {item!r} is not key=value")
        overrides[key.strip()] = yaml.safe_load(value)
    return name, method, overrides


def stages_yaml(
    name: str,
    data_root: Path,
    epochs: int,
    batch_size: int,
    teacher_epochs: int,
    eval_every: int = EVAL_EVERY,
    method: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One row's stages.yaml (as a mapping): data, teacher stage (trained, or an architecture), distill. ``name`` is
    the row (a method, or a variant of ``method`` with param ``overrides``)."""
    base = method or name
    train = {
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "schedule": {"name": "cosine"},
        "eval_every": eval_every,
    }
    stages: dict[str, Any] = {}
    if base in OFFLINE:  # the shared checkpoint replaces this training (kd_table --teacher-checkpoint)
        stages["teacher"] = {
            "type": "teacher",
            "model": TEACHER,
            "weights": {"train": {**train, "epochs": teacher_epochs}},
        }
    elif base in JOINT:
        stages["teacher"] = {"type": "teacher", "model": TEACHER}
    block = {**method_params(base, epochs), **(overrides or {})}
    stages["distill"] = {"type": "distill", "student": STUDENT, "method": block, "train": train}
    return {
        "version": 1,
        "name": f"method-quality-{name}",
        "seed": 0,
        "device": "cpu",
        "data": {
            "kind": "imagefolder",
            "root": str(data_root),
            "image_size": 32,
            "augment": "cifar",
            "val_fraction": 0.1 if base == "fusion_ratio" else 0.0,
        },
        "stages": stages,
    }


def teacher_yaml(data_root: Path, epochs: int, batch_size: int, eval_every: int = EVAL_EVERY) -> dict[str, Any]:
    """A run with only the shared teacher: resnet20 trained with CE on the subset (seed 0)."""
    raw = stages_yaml("kd", data_root, epochs, batch_size, epochs, eval_every)
    raw["name"] = "method-quality-teacher"
    raw["stages"] = {"teacher": raw["stages"]["teacher"]}
    return raw


def make_subset(archive: Path, dest: Path, per_class: int, test_per_class: int | None) -> Path:
    """An imagefolder of the first ``per_class`` train files of each class (sorted by name) and the test split (all
    of it, or the first ``test_per_class`` of each class), copied byte for byte from ``archive``."""
    done = dest / ".complete"
    if done.is_file():
        return dest
    counts: dict[tuple[str, str], int] = {}
    chosen: set[str] = set()
    with tarfile.open(archive) as tar:  # pass 1: the names (one decompression of the archive)
        names = sorted(m.name for m in tar.getmembers() if m.isfile())
    for name in names:
        parts = Path(name).parts
        split_at = next((i for i, p in enumerate(parts) if p in ("train", "test")), None)
        if split_at is None or len(parts) != split_at + 3:
            continue
        split, label = parts[split_at], parts[split_at + 1]
        limit = per_class if split == "train" else test_per_class
        if limit is None or counts.get((split, label), 0) < limit:
            counts[(split, label)] = counts.get((split, label), 0) + 1
            chosen.add(name)
    with tarfile.open(archive, mode="r|*") as stream:  # pass 2: in archive order (a gzip stream cannot seek back)
        for member in stream:
            if member.name not in chosen:
                continue
            split_at = next(i for i, p in enumerate(Path(member.name).parts) if p in ("train", "test"))
            out = dest.joinpath(*Path(member.name).parts[split_at:])
            out.parent.mkdir(parents=True, exist_ok=True)
            source = stream.extractfile(member)
            assert source is not None
            out.write_bytes(source.read())
    done.write_text("ok\n")
    return dest


def _write(raw: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def _pct(values: list[float | None]) -> list[float]:
    return [100.0 * v for v in values if v is not None]


def summarize(
    rows: list[dict[str, Any]],
    teacher_top1: float | None,
    variants: dict[str, tuple[str, dict[str, Any]]] | None = None,
) -> list[dict[str, Any]]:
    """One entry per method (then per variant: name -> (method, overrides)): mean ± std (%) of the best-epoch and
    last-epoch test top-1, every seed's, the times."""
    out = []
    variants = variants or {}
    for name in (*METHODS, *variants):
        base, overrides = variants.get(name, (name, {}))
        mine = [r for r in rows if r["recipe"] == f"{name}.yaml"]
        if not mine:
            continue
        ok = [r for r in mine if "error" not in r]
        best_fractions, last_fractions = [r.get("top1_best") for r in ok], [r.get("top1_last_test") for r in ok]
        entry: dict[str, Any] = {
            "method": name,
            **({"variant_of": base, "overrides": overrides} if name in variants else {}),
            "deployed": STUDENT,
            "seeds": [r["seed"] for r in ok],
            "failed": {r["seed"]: r["error"] for r in mine if "error" in r},
            "best": kd_table.mean_std(best_fractions),
            "last": kd_table.mean_std(last_fractions),
            "best_per_seed": _pct(best_fractions),
            "last_per_seed": _pct(last_fractions),
            "best_epoch_per_seed": [r.get("best_epoch") for r in ok],
            "best_split": ok[0].get("eval_split") if ok else None,  # "val" for fusion_ratio (it holds 10 % out)
            "wall_seconds_per_run": [round(r["seconds"], 1) for r in mine],
            # the distill stage's own time: the same when a later call finds the run done and reuses it
            "stage_seconds_per_run": [round(r.get("distill_train_seconds") or r["seconds"], 1) for r in ok],
        }
        if base in JOINT:  # the jointly trained resnet20 and its own baseline, the independently trained teacher
            entry["joint_teacher_last"] = kd_table.mean_std([r.get("teacher_top1_last_test") for r in ok])
            entry["joint_teacher_baseline"] = teacher_top1
        out.append(entry)
    by_name = {e["method"]: e for e in out}
    ce, kd = by_name.get("ce", {}).get("last"), by_name.get("kd", {}).get("last")
    for e in out:
        if e["last"] is None:
            continue
        e["gain_over_ce"] = e["last"][0] - ce[0] if ce else None
        e["gap_to_kd"] = e["last"][0] - kd[0] if kd else None
        if e.get("variant_of", e["method"]) in (*JOINT, "ffsd"):
            e["meets_target"] = e["gain_over_ce"] is not None and e["gain_over_ce"] >= 0.0
        elif e["method"] != "ce":
            e["meets_target"] = e["gap_to_kd"] is not None and e["gap_to_kd"] >= -0.5
    return out


def _minutes(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds / 60:.1f}"


def _fmt(value: tuple[float, float] | None, n: int) -> str:
    if value is None:
        return "—"
    return f"{value[0]:.2f} ± {value[1]:.2f}" if n > 1 else f"{value[0]:.2f}"


def markdown(summary: list[dict[str, Any]], meta: dict[str, Any], env: dict[str, Any]) -> str:
    lines = [
        "# Method quality on CIFAR-10 (CPU protocol)",
        "",
        f"- {meta['per_class']} train images per class ({meta['train_images']} in all), evaluated on "
        f"{meta['test_images']} test images; teacher {TEACHER} ({meta['teacher_epochs']} epochs, seed 0, test top-1 "
        f"{meta['teacher_top1']}), students {STUDENT}, {meta['epochs']} epochs, batch {meta['batch_size']}, "
        f"SGD 0.05 cosine, wd 5e-4, test evaluation every {meta.get('eval_every')} epochs; seeds "
        + ", ".join(map(str, meta["seeds"]))
        + ".",
        f"- date {env.get('date')}, {env.get('cpu_count')} CPUs, torch {env.get('torch')}, timm {env.get('timm')}, "
        f"commit `{env.get('commit')}`; "
        + (
            f"{meta['jobs']} runs at a time, each pinned to its own CPU share with one thread per CPU"
            if meta.get("jobs", 1) > 1
            else f"one run at a time with {env.get('torch_threads')} threads"
        )
        + f"; teacher {_minutes(meta.get('teacher_seconds'))} min, whole benchmark "
        f"{_minutes(meta.get('total_seconds'))} min wall (teacher included only when trained by this call).",
        f"- `{meta['command']}`",
        "- last: test top-1 (%) after the final epoch (the number to compare); best: the best per-epoch test top-1 "
        "(optimistic: chosen on the test split; on the held-out split where marked val). ± is the standard "
        "deviation over seeds. Target: every method's mean ≥ KD's − 0.5; online methods' deployed network ≥ its CE "
        "baseline (the ce row).",
        "",
        "| method | last (test) | best | per seed (last) | vs CE | vs KD | target | distill min per run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in summary:
        n = len(e["seeds"])
        label = f"`{e['method']}`"
        if "variant_of" in e:
            label += f" ({e['variant_of']}: " + ", ".join(f"{k}={v}" for k, v in e["overrides"].items()) + ")"
        seeds = ", ".join(f"{v:.2f}" for v in e["last_per_seed"]) or "—"
        if e["failed"]:
            seeds += f" (failed seeds: {', '.join(map(str, e['failed']))})"
        gain = "—" if e.get("gain_over_ce") is None or e["method"] == "ce" else f"{e['gain_over_ce']:+.2f}"
        gap = "—" if e.get("gap_to_kd") is None or e["method"] in ("ce", "kd") else f"{e['gap_to_kd']:+.2f}"
        met = e.get("meets_target")
        target = "—" if met is None else "met" if met else "**missed**"
        minutes = statistics.fmean(e["stage_seconds_per_run"]) / 60 if e["stage_seconds_per_run"] else None
        best = _fmt(e["best"], n) + (" (val)" if e.get("best_split") == "val" else "")
        lines.append(
            f"| {label} | {_fmt(e['last'], n)} | {best} | {seeds} | {gain} | {gap} | {target} | {minutes:.1f} |"
            if minutes is not None
            else f"| {label} | — | — | — | — | — | — | — |"
        )
    joint = [e for e in summary if e["method"] in JOINT and e.get("joint_teacher_last")]
    if joint:
        lines += [
            "",
            "Jointly trained resnet20 networks (online methods) against the independently trained teacher:",
            "",
        ]
        lines += [
            f"- `{e['method']}`: {_fmt(e['joint_teacher_last'], len(e['seeds']))} vs {e['joint_teacher_baseline']}"
            for e in joint
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        type=parse_variant,
        metavar="NAME=METHOD[:k=v,...]",
        help="an extra row: METHOD with these params (repeatable), e.g. dpk_kd09=dpk:ce_weight=0.1,kd_weight=0.9",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--per-class", type=int, default=250, help="train images per class")
    parser.add_argument("--test-per-class", type=int, default=None, help="test images per class (default: all)")
    parser.add_argument("--epochs", type=int, default=20, help="student epochs")
    parser.add_argument("--teacher-epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=EVAL_EVERY, help="epochs between test evaluations")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the CIFAR-10 JPEG archive (imagefolder)")
    parser.add_argument("--work", type=Path, default=None, help="keep data subset and run folders here")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at once, each pinned to its own CPUs (on 2 cores, --jobs 2 runs two single-thread runs side by "
        "side: about the throughput of one 2-thread run, without thread oversubscription); the teacher is trained "
        "first, alone",
    )
    parser.add_argument(
        "--results-dir", type=Path, default=None, help="write the results here (default benchmarks/results)"
    )
    parser.add_argument("--name", default=None, help="results name (default method_quality_cpu[_smoke])")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the flow; numbers mean nothing")
    args = parser.parse_args(argv)
    if args.smoke:
        args.per_class, args.test_per_class, args.epochs, args.teacher_epochs, args.eval_every = 8, 4, 1, 1, 1
    if not args.data.is_file():
        print(f"error: {args.data} does not exist (the CIFAR-10 JPEG archive; --data names another)", file=sys.stderr)
        return 2
    name = args.name or ("method_quality_cpu_smoke" if args.smoke else "method_quality_cpu")
    command = shlex.join(["python", "benchmarks/method_quality.py", *(argv if argv is not None else sys.argv[1:])])
    with tempfile.TemporaryDirectory(prefix="kdpipe-method-quality-") as tmp:
        work = (args.work or Path(tmp)).absolute()
        t0 = time.perf_counter()
        data = make_subset(args.data, work / f"cifar10-{args.per_class}pc", args.per_class, args.test_per_class)
        counts = {s: sum(1 for _ in (data / s).rglob("*.jpg")) for s in ("train", "test")}
        teacher_cfg = _write(
            teacher_yaml(data, args.teacher_epochs, args.batch_size, args.eval_every), work / "configs" / "teacher.yaml"
        )
        teacher_dir = work / f"teacher-{TEACHER}-{args.per_class}pc-{args.teacher_epochs}ep-s0"
        teacher_weights = teacher_dir / "teacher" / "model.safetensors"
        if not teacher_weights.is_file():
            cmd = kd_table.kdpipe_command(teacher_cfg, teacher_dir, ["seed=0"], quiet=True)
            print(f"$ {shlex.join(cmd)}", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, cwd=REPO, check=False)
            if proc.returncode != 0:
                print(f"error: training the teacher failed (exit {proc.returncode})", file=sys.stderr)
                return 1
        teacher_result = json.loads((teacher_dir / "teacher" / "result.json").read_text(encoding="utf-8"))
        teacher_seconds = teacher_result.get("seconds")  # the stage's own time, also when trained by an earlier call
        teacher_top1 = teacher_result["metrics"]["top1"]
        variants = {name: (method, overrides) for name, method, overrides in args.variant}
        rows_to_run = [(m, m, {}) for m in args.methods] + [(n, m, o) for n, (m, o) in variants.items()]
        configs = [
            _write(
                stages_yaml(n, data, args.epochs, args.batch_size, args.teacher_epochs, args.eval_every, m, o),
                work / "configs" / f"{n}.yaml",
            )
            for n, m, o in rows_to_run
        ]
        cost = {n: COST.get(m, 1.0) for n, m, _ in rows_to_run}
        options = kd_table.Options(
            seeds=args.seeds, teacher_checkpoints={TEACHER: teacher_weights}, quiet=True, extra=(), jobs=args.jobs
        )
        if args.jobs > 1:
            tasks = [(c, seed) for seed in args.seeds for c in configs]
            rows = kd_table.run_parallel(tasks, options, work / "runs", order=lambda t: cost[t[0].stem])
        else:
            rows = kd_table.run_table(configs, options, work / "runs")
    teacher_pct = round(100.0 * teacher_top1, 2) if teacher_top1 is not None else None
    summary = summarize(rows, teacher_pct, variants)
    meta = {
        "per_class": args.per_class,
        "train_images": counts["train"],
        "test_images": counts["test"],
        "epochs": args.epochs,
        "teacher_epochs": args.teacher_epochs,
        "batch_size": args.batch_size,
        "jobs": args.jobs,
        "total_seconds": round(time.perf_counter() - t0, 1),
        "eval_every": args.eval_every,
        "seeds": args.seeds,
        "teacher_top1": teacher_pct,
        "teacher_seconds": round(teacher_seconds, 1) if teacher_seconds is not None else None,
        "command": command,
        "smoke": args.smoke,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    path = write_result(name, {"protocol": meta, "summary": summary, "runs": rows}, args.results_dir)
    path.with_suffix(".md").write_text(markdown(summary, meta, environment()), encoding="utf-8")
    print(path.with_suffix(".md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
