"""Run recipe files (examples/recipes/*.yaml) and put their top-1 next to the published number each one targets.

Every recipe runs, once per seed, as a user runs it: ``python -m kdpipe run RECIPE --out WORK/<recipe>-s<seed>
--set seed=<seed> ...`` (under torchrun with ``--nproc``), on the GPU where there is one. Per run it records, from the
run directory: the distilled (deployed) network's best per-epoch top-1 (on the test split when the recipe sets
``data.val_fraction: 0``, as the papers report; on the held-out validation split otherwise), its test top-1 after
the last epoch, the teacher's test top-1, and the times. Several seeds give mean ± std. The published number is the
recipe's ``# target:`` header line (``# teacher-target:`` for the teacher).

A teacher stage that trains is trained once per (teacher config, data, seed): later recipes with the same teacher
take its weights through ``--set stages.teacher.weights={checkpoint: ...}``; ``--teacher-checkpoint MODEL=PATH``
gives one instead of training it at all.

Writes ``benchmarks/results/<name>.json`` (with device, versions, commit) and ``<name>.md``. ``--smoke`` runs
every recipe for 1 epoch on a 2% subset: a CPU check that the whole flow works, whose numbers mean nothing
(``kd_table_smoke.*``).

    python benchmarks/kd_table.py examples/recipes/kd_resnet32x4_resnet8x4.yaml [...] [--seeds 0 1 2]
        [--epochs N] [--subset F] [--work DIR] [--smoke] [--device D] [--precision P] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import queue
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from _common import RESULTS, SHARED_DATA, write_result

REPO = Path(__file__).resolve().parents[1]
IMAGEFOLDER_COPIES = {"cifar10": "cifar10-jpg.tar.gz", "cifar100": "cifar100-jpg.tar.gz"}
"""The recipes name the official CIFAR (kind cifar10/cifar100, downloaded by torchvision); where these ImageFolder
copies sit in --data-dir (default: ../shared/data beside the checkout, where it exists) the runs use them."""
SMOKE_EPOCHS = 1
SMOKE_SUBSET = 0.02

# ---------------------------------------------------------------------------------------------------------------------
# Recipe headers: "# target: 76.32 +- 0.10 (what, source)" and "# teacher-target: ..."
# ---------------------------------------------------------------------------------------------------------------------

_TARGET = re.compile(
    r"^#\s*(?P<key>target|teacher-target):\s*(?:(?P<none>none)|(?P<value>\d+(?:\.\d+)?)"
    r"(?:\s*(?:\+-|±)\s*(?P<std>\d+(?:\.\d+)?))?)\s*(?:\((?P<what>.*)\))?\s*$"
)


@dataclass(frozen=True)
class Target:
    """A published top-1 (%) a recipe aims at; ``value`` None when the recipe says ``none``."""

    value: float | None
    std: float | None
    what: str


def read_targets(path: Path) -> dict[str, Target]:
    """The ``target`` and ``teacher-target`` lines of a recipe's leading comment block (either may be absent)."""
    found: dict[str, Target] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            if line.strip():
                break  # the header ends at the first line of YAML
            continue
        match = _TARGET.match(line.strip())
        if match:
            value = None if match["none"] else float(match["value"])
            std = float(match["std"]) if match["std"] else None
            found[match["key"]] = Target(value, std, (match["what"] or "").strip())
    return found


# ---------------------------------------------------------------------------------------------------------------------
# Overrides: seed, epochs (with the step milestones scaled), subset, data folder, teacher weights
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Options:
    seeds: list[int]
    epochs: int | None = None
    subset: float | None = None
    data_dir: Path | None = None
    device: str | None = None
    precision: str | None = None
    extra: tuple[str, ...] = ()
    teacher_checkpoints: dict[str, Path] | None = None
    nproc: int = 1
    quiet: bool = False
    jobs: int = 1
    """Runs at once, each pinned to its own share of the CPUs with that many threads (CPU only; see run_parallel)."""


def scale_milestones(milestones: Sequence[int], old_epochs: int, new_epochs: int) -> list[int]:
    """Step-schedule milestones of an ``old_epochs`` run mapped onto ``new_epochs`` (same fractions of the run);
    those that fall on epoch 0 or past the end are dropped."""
    scaled = {round(m * new_epochs / old_epochs) for m in milestones}
    return sorted(m for m in scaled if 0 < m < new_epochs)


def _train_blocks(raw: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(key path, train mapping) of every stage that trains: a teacher's weights.train and a distill stage's train."""
    out = []
    for name, stage in (raw.get("stages") or {}).items():
        if not isinstance(stage, dict):
            continue
        weights = stage.get("weights")
        if isinstance(weights, dict) and isinstance(weights.get("train"), dict):
            out.append((f"stages.{name}.weights.train", weights["train"]))
        if isinstance(stage.get("train"), dict):
            out.append((f"stages.{name}.train", stage["train"]))
    return out


def overrides_for(raw: dict[str, Any], seed: int, options: Options) -> list[str]:
    """The ``--set`` assignments that turn a recipe into this benchmark's run of it (the teacher source aside)."""
    sets = [f"seed={seed}"]
    if options.device:
        sets.append(f"device={options.device}")
    if options.subset:
        sets.append(f"data.subset={options.subset}")
    kind = (raw.get("data") or {}).get("kind")
    if options.data_dir is not None and kind in IMAGEFOLDER_COPIES:
        archive = (options.data_dir / IMAGEFOLDER_COPIES[kind]).absolute()
        sets += ["data.kind=imagefolder", f"data.root={archive}", "data.download=false"]
    for key, train in _train_blocks(raw):
        if options.epochs is None:
            continue
        sets.append(f"{key}.epochs={options.epochs}")
        schedule = train.get("schedule") or {}
        if schedule.get("name") == "step" and schedule.get("milestones"):
            scaled = scale_milestones(schedule["milestones"], int(train["epochs"]), options.epochs)
            sets.append(f"{key}.schedule.milestones=[{', '.join(map(str, scaled))}]")
    if options.precision:
        for name, stage in (raw.get("stages") or {}).items():
            if isinstance(stage, dict) and stage.get("type") in ("teacher", "distill"):
                sets.append(f"stages.{name}.precision={options.precision}")
    return [*sets, *options.extra]


def _teacher_stage(raw: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    for name, stage in (raw.get("stages") or {}).items():
        if isinstance(stage, dict) and stage.get("type") == "teacher" and isinstance(stage.get("weights"), dict):
            return name, stage
    return None


def teacher_key(raw: dict[str, Any], sets: list[str]) -> str | None:
    """What determines a trained teacher's weights: its stage config, the data, the seed and the device, after
    ``sets``. None when the recipe trains no teacher (online methods, ce, ffsd, or given weights)."""
    from kdpipe.config import apply_override

    resolved = copy.deepcopy(raw)
    for assignment in sets:
        apply_override(resolved, assignment)
    found = _teacher_stage(resolved)
    if found is None or "train" not in found[1]["weights"]:
        return None
    facts = {k: resolved.get(k) for k in ("seed", "device", "data")} | {"teacher": found[1]}
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------------
# Running one recipe and reading its run directory
# ---------------------------------------------------------------------------------------------------------------------


def kdpipe_command(recipe: Path, run_dir: Path, sets: list[str], nproc: int = 1, quiet: bool = False) -> list[str]:
    """``python -m kdpipe run ...`` (or the same under torchrun with ``nproc`` processes)."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    flags = ["-q"] if quiet else []
    return [*launcher, "-m", "kdpipe", *flags, "run", str(recipe), "--out", str(run_dir), *(f"--set={s}" for s in sets)]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def collect(run_dir: Path) -> dict[str, Any]:
    """The numbers of one finished run: the deployed network's best-epoch and last-epoch top-1 (fractions), the
    teacher's, the split the per-epoch evaluation used, epochs and training times."""
    resolved = yaml.safe_load((run_dir / "resolved.yaml").read_text(encoding="utf-8"))
    stages = resolved["stages"]
    distill_name = next(n for n, s in stages.items() if s["type"] == "distill")
    result = _read_json(run_dir / distill_name / "result.json")
    metrics, info = result["metrics"], result["info"]
    history: list[dict[str, float]] = info.get("history", [])
    row: dict[str, Any] = {
        "student": stages[distill_name]["student"],
        "method": stages[distill_name]["method"]["name"],
        "epochs": stages[distill_name]["train"]["epochs"],
        "eval_split": "test" if float(resolved["data"].get("val_fraction", 0.0)) == 0.0 else "val",
        "top1_best": metrics.get("best_eval_top1"),
        "best_epoch": metrics.get("best_epoch"),
        "top1_last_test": metrics["top1"],
        "params": metrics.get("params"),
        "distill_train_seconds": info.get("train_seconds"),
        "stopped_early": info.get("stopped_early"),  # the epoch (1-based) early stopping ended the run, or None
    }
    networks = metrics.get("networks") or {}
    if "teacher" in networks:  # an online method trained the teacher stage's network too
        row["teacher"] = networks["teacher"]["model"]
        row["teacher_top1_last_test"] = networks["teacher"]["top1"]
        row["teacher_top1_best"] = max(
            (h["eval_top1_teacher"] for h in history if "eval_top1_teacher" in h), default=None
        )
    teacher_name = next((n for n, s in stages.items() if s["type"] == "teacher"), None)
    if teacher_name is not None and "teacher" not in networks:
        teacher = _read_json(run_dir / teacher_name / "result.json")
        row["teacher"] = stages[teacher_name]["model"]
        if teacher:
            row["teacher_top1_last_test"] = teacher["metrics"]["top1"]
            row["teacher_top1_best"] = teacher["info"].get("best_eval_top1")
            row["teacher_train_seconds"] = teacher["info"].get("train_seconds")
    if networks:
        row["networks"] = networks
    stats = {
        k: v
        for k, v in (history[-1] if history else {}).items()
        if k.split("_")[0] in ("alpha", "pi", "swap", "expert")
    }
    if stats:
        row["last_epoch_method_stats"] = stats
    return row


def run_recipe(
    recipe: Path,
    seed: int,
    work: Path,
    options: Options,
    teachers: dict[str, Path],
    cpus: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Run one recipe with one seed through the CLI and return its row (an ``error`` row if kdpipe failed).
    ``teachers`` maps teacher keys to trained weights; this run's teacher is added to it. ``cpus``: pin the run to
    these CPUs (``taskset``) with as many torch/OpenMP threads."""
    raw = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    sets = overrides_for(raw, seed, options)
    key = teacher_key(raw, sets)
    found = _teacher_stage(raw)
    given = (options.teacher_checkpoints or {}).get(str(found[1].get("model"))) if found else None
    teacher_from = given.absolute() if given is not None else teachers.get(key) if key is not None else None
    if found is not None and teacher_from is not None:
        sets.append(f"stages.{found[0]}.weights={{checkpoint: {teacher_from}}}")
    run_dir = work / f"{recipe.stem}-s{seed}"
    command = kdpipe_command(recipe, run_dir, sets, options.nproc, options.quiet)
    env = None
    if cpus is not None:
        command = ["taskset", "--cpu-list", ",".join(map(str, cpus)), *command]
        env = {**os.environ, "OMP_NUM_THREADS": str(len(cpus))}
    print(f"$ {shlex.join(command)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, capture_output=options.quiet, text=True, check=False, env=env)
    seconds = time.perf_counter() - t0
    row: dict[str, Any] = {"recipe": recipe.name, "seed": seed, "seconds": seconds, "overrides": sets}
    if teacher_from is not None:
        row["teacher_weights"] = str(teacher_from)
    if cpus is not None:
        row["cpus"] = list(cpus)
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-3:] if options.quiet else []
        row["error"] = f"kdpipe exited with {proc.returncode}" + (f": {' / '.join(tail)}" if tail else "")
        return row
    row.update(collect(run_dir))
    if key is not None and teacher_from is None and found is not None:
        teachers[key] = (run_dir / found[0] / "model.safetensors").absolute()
    return row


# ---------------------------------------------------------------------------------------------------------------------
# Summary over seeds and the Markdown table
# ---------------------------------------------------------------------------------------------------------------------


def mean_std(values: Sequence[float | None]) -> tuple[float, float] | None:
    """Mean and sample standard deviation (0 for one value) of the values that are not None, in %."""
    kept = [100.0 * v for v in values if v is not None and not math.isnan(v)]
    if not kept:
        return None
    return statistics.fmean(kept), statistics.stdev(kept) if len(kept) > 1 else 0.0


def summarize(recipe: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One recipe's seeds: mean ± std of each top-1 (%), the published targets, the times."""
    targets = read_targets(recipe)
    ok = [r for r in rows if "error" not in r]
    first = ok[0] if ok else {}
    summary: dict[str, Any] = {
        "recipe": recipe.name,
        "method": first.get("method"),
        "teacher": first.get("teacher"),
        "student": first.get("student"),
        "epochs": first.get("epochs"),
        "eval_split": first.get("eval_split"),
        "seeds": [r["seed"] for r in ok],
        "failed_seeds": [r["seed"] for r in rows if "error" in r],
        "top1_best": mean_std([r.get("top1_best") for r in ok]),
        "top1_last_test": mean_std([r.get("top1_last_test") for r in ok]),
        "teacher_top1_last_test": mean_std([r.get("teacher_top1_last_test") for r in ok]),
        "target": asdict(targets["target"]) if "target" in targets else None,
        "teacher_target": asdict(targets["teacher-target"]) if "teacher-target" in targets else None,
        "minutes_wall": statistics.fmean(r["seconds"] for r in rows) / 60 if rows else None,
        "minutes_distill": _mean_minutes([r.get("distill_train_seconds") for r in ok]),
        "stopped_early": [r.get("stopped_early") for r in ok],
    }
    return summary


def _mean_minutes(seconds: Sequence[float | None]) -> float | None:
    kept = [s for s in seconds if s is not None]
    return statistics.fmean(kept) / 60 if kept else None


def _pm(value: tuple[float, float] | None, n: int) -> str:
    if value is None:
        return "—"
    return f"{value[0]:.2f} ± {value[1]:.2f}" if n > 1 else f"{value[0]:.2f}"


def _published(target: dict[str, Any] | None) -> str:
    if not target or target.get("value") is None:
        return "—"
    return f"{target['value']:.2f}" + (f" ± {target['std']:.2f}" if target.get("std") is not None else "")


def markdown(summaries: list[dict[str, Any]], env: dict[str, Any], smoke: bool, command: str) -> str:
    """The results page: what was run where, then one row per recipe next to its published number."""
    device = env.get("gpu") or f"CPU ({env.get('cpu_count')} cores, {env.get('torch_threads')} torch threads)"
    lines = ["# KD recipes: measured top-1 (%) next to the published numbers", ""]
    if smoke:
        lines += [
            f"**CPU flow check (`--smoke`: {SMOKE_EPOCHS} epoch on a {SMOKE_SUBSET:.0%} subset). These numbers are "
            "meaningless as accuracy; they only show that every recipe runs end to end.**",
            "",
        ]
    lines += [
        f"- date {env.get('date')}, device {device}, torch {env.get('torch')}, timm {env.get('timm')}, "
        f"commit `{env.get('commit')}`",
        f"- `{command}`",
        "- best: the best per-epoch evaluation, on the test split when the recipe trains on the whole train split "
        "(`data.val_fraction: 0`, the papers' reporting), on the held-out validation split otherwise (marked val); "
        "last: test top-1 after the final epoch; published: the recipe's `# target:` line; ± is the std over seeds.",
        "",
        "| recipe | teacher -> student | seeds | epochs | best | last (test) | published | best − published "
        "| teacher (test) / published | distill min | wall min |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        n = len(s["seeds"])
        pair = f"{s['teacher']} -> {s['student']}" if s.get("teacher") else str(s.get("student") or "?")
        seeds = ", ".join(map(str, s["seeds"])) or "—"
        if s["failed_seeds"]:
            seeds += f" (failed: {', '.join(map(str, s['failed_seeds']))})"
        best = _pm(s["top1_best"], n) + (" (val)" if s.get("eval_split") == "val" and s["top1_best"] else "")
        target = s.get("target") or {}
        delta = "—"
        if s["top1_best"] is not None and target.get("value") is not None:
            delta = f"{s['top1_best'][0] - target['value']:+.2f}"
        teacher = _pm(s["teacher_top1_last_test"], n) if s.get("teacher") else "—"
        if s.get("teacher_target"):
            teacher += f" / {_published(s['teacher_target'])}"
        minutes = [f"{m:.1f}" if m is not None else "—" for m in (s["minutes_distill"], s["minutes_wall"])]
        epochs = str(s.get("epochs") or "—")
        stopped = [e for e in s.get("stopped_early") or [] if e is not None]
        if stopped:  # early stopping ended these seeds' runs before the configured epochs
            epochs += f" (stopped early: {', '.join(map(str, stopped))})"
        lines.append(
            f"| `{s['recipe']}` | {pair} | {seeds} | {epochs} | {best} | "
            f"{_pm(s['top1_last_test'], n)} | {_published(s.get('target'))} | {delta} | {teacher} | "
            f"{minutes[0]} | {minutes[1]} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def _teacher_checkpoint(text: str) -> tuple[str, Path]:
    model, sep, path = text.partition("=")
    if not sep or not model or not path:
        raise argparse.ArgumentTypeError(f"expected MODEL=PATH, e.g. resnet32x4=teachers/r32x4.pth; got {text!r}")
    return model, Path(path)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("recipes", nargs="+", type=Path, help="stages.yaml files, e.g. examples/recipes/*.yaml")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=None, help="override every stage's epochs (steps scaled)")
    parser.add_argument("--subset", type=float, default=None, help="data.subset: share of train/test kept")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=SHARED_DATA if SHARED_DATA.is_dir() else None,
        help="folder holding cifar10-jpg.tar.gz / cifar100-jpg.tar.gz (ImageFolder copies) to run the recipes on "
        "instead of downloading CIFAR (default: ../shared/data where it exists)",
    )
    parser.add_argument("--device", default=None, help="override the recipes' device (auto: cuda when present)")
    parser.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"], help="GPU training precision")
    parser.add_argument("--teacher-checkpoint", action="append", type=_teacher_checkpoint, default=[], metavar="M=P")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE", help="more --set")
    parser.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun; one per GPU)")
    parser.add_argument("--work", type=Path, default=None, help="keep run folders here (default: a temp folder)")
    parser.add_argument("--name", default=None, help="results file name (default: kd_table, kd_table_smoke)")
    parser.add_argument("--quiet", action="store_true", help="hide kdpipe's progress output")
    parser.add_argument("--smoke", action="store_true", help="1 epoch on a 2%% subset: checks the flow, not accuracy")
    return parser


def cpu_slots(jobs: int) -> list[list[int]]:
    """The CPUs this process may use, split into ``jobs`` disjoint slots of equal size (the remainder unused)."""
    available = (
        sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    )
    if jobs > len(available):
        raise ValueError(f"--jobs {jobs} is more than the {len(available)} CPUs available")
    size = len(available) // jobs
    return [available[i * size : (i + 1) * size] for i in range(jobs)]


def run_parallel(
    tasks: Sequence[tuple[Path, int]], options: Options, work: Path, order: Callable[[tuple[Path, int]], float]
) -> list[dict[str, Any]]:
    """Run (recipe, seed) tasks ``options.jobs`` at a time, each pinned to its own CPU slot with one thread per CPU
    of the slot, longest first by ``order`` (an estimate of the run's cost) so the slots finish together. Runs must
    not depend on each other (give teachers as ``teacher_checkpoints``). Rows come back in ``tasks`` order.

    On a small CPU this gives about the throughput of one run at a time with every thread (measured on 2 cores,
    resnet8, batch 64: 151 ms per step for each of two pinned runs, 72-106 ms for one 2-thread run), and pinned
    single-thread runs cannot oversubscribe the cores, which slowed 2-thread runs several-fold beside other work."""
    slots: queue.SimpleQueue[list[int]] = queue.SimpleQueue()
    for slot in cpu_slots(options.jobs):
        slots.put(slot)

    def one(task: tuple[Path, int]) -> dict[str, Any]:
        cpus = slots.get()
        try:
            return run_recipe(task[0], task[1], work, options, {}, cpus)
        finally:
            slots.put(cpus)

    ranked = sorted(range(len(tasks)), key=lambda i: -order(tasks[i]))
    rows: dict[int, dict[str, Any]] = {}
    with ThreadPoolExecutor(max_workers=options.jobs) as pool:
        futures = {pool.submit(one, tasks[i]): i for i in ranked}
        for future in as_completed(futures):
            row = future.result()
            print(json.dumps({k: v for k, v in row.items() if k not in ("networks", "overrides")}), flush=True)
            rows[futures[future]] = row
    return [rows[i] for i in range(len(tasks))]


def run_table(recipes: list[Path], options: Options, work: Path) -> list[dict[str, Any]]:
    """Every recipe for every seed (seed-major, so a teacher trained for one recipe serves the next ones)."""
    teachers: dict[str, Path] = {}
    rows = []
    for seed in options.seeds:
        for recipe in recipes:
            row = run_recipe(recipe, seed, work, options, teachers)
            print(json.dumps({k: v for k, v in row.items() if k not in ("networks", "overrides")}), flush=True)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.smoke:
        args.epochs = args.epochs or SMOKE_EPOCHS
        args.subset = args.subset or SMOKE_SUBSET
    recipes = [r.absolute() for r in args.recipes]
    missing = [str(r) for r in recipes if not r.is_file()]
    if missing:
        print(f"error: no such recipe: {', '.join(missing)}", file=sys.stderr)
        return 2
    options = Options(
        seeds=args.seeds,
        epochs=args.epochs,
        subset=args.subset,
        data_dir=args.data_dir,
        device=args.device,
        precision=args.precision,
        extra=tuple(args.extra),
        teacher_checkpoints=dict(args.teacher_checkpoint),
        nproc=args.nproc,
        quiet=args.quiet,
    )
    with tempfile.TemporaryDirectory(prefix="kdpipe-kd-table-") as tmp:
        work = (args.work or Path(tmp)).absolute()
        work.mkdir(parents=True, exist_ok=True)
        rows = run_table(recipes, options, work)
    summaries = [summarize(r, [row for row in rows if row["recipe"] == r.name]) for r in recipes]
    name = args.name or ("kd_table_smoke" if args.smoke else "kd_table")
    shown = [os.path.relpath(r, REPO) if r.is_relative_to(REPO) else str(r) for r in recipes]
    command = shlex.join(["python", "benchmarks/kd_table.py", *shown, *_flags(argv)])
    payload = {
        "smoke": bool(args.smoke),
        "note": "CPU flow check: 1 epoch on a 2% subset; the numbers are meaningless as accuracy" if args.smoke else "",
        "command": command,
        "seeds": args.seeds,
        "epochs_override": args.epochs,
        "subset": args.subset,
        "summaries": summaries,
        "rows": rows,
    }
    path = write_result(name, payload)
    env = json.loads(path.read_text(encoding="utf-8"))["environment"]
    table = markdown(summaries, env, bool(args.smoke), command)
    (RESULTS / f"{name}.md").write_text(table, encoding="utf-8")
    print(table)
    print(f"wrote {path} and {RESULTS / f'{name}.md'}")
    return 1 if any("error" in r for r in rows) else 0


def _flags(argv: list[str] | None) -> list[str]:
    """The options of the command line, without the recipe paths (already shown relative to the repository)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return [a for a in args if a.startswith("-") or not a.endswith((".yaml", ".yml"))]


if __name__ == "__main__":
    sys.exit(main())
