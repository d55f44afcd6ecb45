"""Does CPU bf16 training cost accuracy? The embedded default's teacher and student trained in fp32 and in bf16.

examples/digits.yaml's teacher (wrn_16_2) and distill (resnet8, KD) stages, unchanged but for ``precision`` (both
stages) and the seed, over ``--seeds``; every run through the CLI. bf16 means bf16 autocast on a CPU that computes it
natively (AMX / AVX-512 BF16); on a CPU without it both rows train in fp32, which the result records (``trained``).
The claim to check: the bf16 mean is within the seed-to-seed spread of the fp32 mean. Two readings are recorded: the
difference of the means against the larger seed std of the two (a strict rule), and against two standard errors of
that difference (Welch: 2 * sqrt(s_fp32^2 / n + s_bf16^2 / n)), the usual test of whether two means are told apart.

Writes benchmarks/results/precision_accuracy_cpu.json and .md (device, versions, commit).

    python benchmarks/precision_accuracy.py [--seeds 0 1 2 3 4] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from _common import RESULTS, write_result

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "digits.yaml"


def recipe(work: Path) -> Path:
    """examples/digits.yaml with only its teacher and distill stages."""
    raw = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    raw["stages"] = {k: raw["stages"][k] for k in ("teacher", "distill")}
    path = work / "digits-train.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def run(cfg: Path, out: Path, precision: str, seed: int) -> dict[str, Any]:
    sets = [f"seed={seed}", f"stages.teacher.precision={precision}", f"stages.distill.precision={precision}"]
    command = [sys.executable, "-m", "kdpipe", "-q", "run", str(cfg), "--out", str(out), *(f"--set={s}" for s in sets)]
    subprocess.run(command, cwd=REPO, check=True)
    row: dict[str, Any] = {"seed": seed, "precision": precision}
    for stage in ("teacher", "distill"):
        result = json.loads((out / stage / "result.json").read_text())
        row[f"{stage}_top1"] = result["metrics"]["top1"]
        row[f"{stage}_trained"] = result["info"].get("precision")
        row[f"{stage}_train_seconds"] = result["info"].get("train_seconds")
    return row


def _ms(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def test_images(cfg: Path) -> int:
    """Size of the recipe's test split (what one image is worth in points)."""
    import kdpipe.stages  # noqa: F401  (registers the stage types the config names)
    from kdpipe.config import load_config
    from kdpipe.data.splits import create_splits

    loaded = load_config(cfg)
    return len(create_splits(loaded.config.data, seed=0, base_dir=cfg.parent).test)


def within_two_se(summary: dict[str, Any], n: int) -> dict[str, bool]:
    """Whether bf16's mean is within two standard errors (Welch) of fp32's, per stage."""
    out = {}
    for stage in ("teacher", "distill"):
        a, b = summary["fp32"][stage], summary["bf16"][stage]
        se = (a["std"] ** 2 / n + b["std"] ** 2 / n) ** 0.5
        out[stage] = abs(b["mean"] - a["mean"]) <= 2 * se + 1e-9
    return out


def write_markdown(path: Path, payload: dict[str, Any]) -> None:
    env, seeds, summary, within = (payload[k] for k in ("environment", "seeds", "summary", "bf16_within_seed_spread"))
    n = payload.get("test_images")
    lines = [
        "# CPU training precision and accuracy (digits)",
        "",
        f"- examples/digits.yaml's teacher (wrn_16_2) and student (resnet8, KD), seeds {seeds}; test top-1 (%)"
        + (f" on {n} test images (one image = {100 / n:.2f} points)." if n else "."),
        f"- {env.get('date')}, {env.get('device')}, {env.get('cpu_count')} CPUs, torch {env.get('torch')}, commit "
        f"`{env.get('commit')}`.",
        "- `python benchmarks/precision_accuracy.py`",
        "",
        "| precision asked | trained in | teacher top-1 | student top-1 | student train s (mean) |",
        "|---|---|---:|---:|---:|",
    ]
    for precision in ("fp32", "bf16"):
        s = summary[precision]
        lines.append(
            f"| {precision} | {', '.join(s['trained'])} | {s['teacher']['mean']:.2f} ± {s['teacher']['std']:.2f} | "
            f"{s['distill']['mean']:.2f} ± {s['distill']['std']:.2f} | {s['distill_train_seconds_mean']:.1f} |"
        )
    lines += [
        "",
        f"bf16 mean within the larger seed std of the two: teacher {within['teacher']}, student {within['distill']}.",
    ]
    if "bf16_within_two_standard_errors" in payload:
        se = payload["bf16_within_two_standard_errors"]
        diff = {k: summary["bf16"][k]["mean"] - summary["fp32"][k]["mean"] for k in ("teacher", "distill")}
        lines.append(
            f"bf16 - fp32 means: teacher {diff['teacher']:+.2f}, student {diff['distill']:+.2f} points; within two "
            f"standard errors of the difference (Welch): teacher {se['teacher']}, student {se['distill']}."
        )
    if n:
        lines.append(
            "Digits is nearly saturated at this size (most runs miss one or two test images): this shows that bf16 "
            "costs no more than about one test image here, not that it is free on a harder task."
        )
    path.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--work", type=Path, default=Path("/tmp/kdpipe-precision-accuracy"))
    p.add_argument("--name", default="precision_accuracy_cpu")
    p.add_argument("--report-only", action="store_true", help="rewrite the .md from the existing .json")
    args = p.parse_args(argv)
    if args.report_only:
        path = RESULTS / f"{args.name}.json"
        payload = json.loads(path.read_text())
        args.work.mkdir(parents=True, exist_ok=True)
        payload["bf16_within_two_standard_errors"] = within_two_se(payload["summary"], len(payload["seeds"]))
        payload.setdefault("test_images", test_images(recipe(args.work.absolute())))
        path.write_text(json.dumps(payload, indent=2) + "\n")
        write_markdown(path, payload)
        print(path.with_suffix(".md").read_text())
        return 0
    work = args.work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    cfg = recipe(work)
    rows = [
        run(cfg, work / f"{precision}-s{seed}", precision, seed)
        for seed in args.seeds
        for precision in ("fp32", "bf16")
    ]
    summary: dict[str, Any] = {}
    for precision in ("fp32", "bf16"):
        mine = [r for r in rows if r["precision"] == precision]
        summary[precision] = {
            stage: dict(zip(("mean", "std"), _ms([100 * r[f"{stage}_top1"] for r in mine]), strict=True))
            for stage in ("teacher", "distill")
        }
        summary[precision]["trained"] = sorted({r["distill_trained"] for r in mine})
        summary[precision]["distill_train_seconds_mean"] = statistics.fmean(r["distill_train_seconds"] for r in mine)
    within = {
        stage: abs(summary["bf16"][stage]["mean"] - summary["fp32"][stage]["mean"])
        <= max(summary["fp32"][stage]["std"], summary["bf16"][stage]["std"])
        for stage in ("teacher", "distill")
    }
    payload = {
        "example": "examples/digits.yaml (teacher + distill)",
        "seeds": args.seeds,
        "rows": rows,
        "summary": summary,
        "bf16_within_seed_spread": within,
    }
    payload["bf16_within_two_standard_errors"] = within_two_se(summary, len(args.seeds))
    payload["test_images"] = test_images(cfg)
    path = write_result(args.name, payload)
    write_markdown(path, payload)
    print(path.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
