"""Which training speed options pay on this CPU? channels_last and torch.compile, in fp32 and in bf16, measured with
benchmarks/train_throughput.py (kdpipe's Trainer, KD resnet32x4 -> resnet8x4, 2 threads, synthetic CIFAR-100-sized
data: throughput does not depend on pixel values).

Each option set is one train_throughput.py process (``--batch-sizes``, default 128; ``--steps`` timed steps after
``--warmup`` untimed ones, which is where torch.compile compiles). A round runs every option set once, in an order that
rotates between rounds, so load from other processes spreads over all of them; each option's speed-up is its
kdpipe step time divided into the same precision's plain-option (NCHW, eager) step time of the same round, and the
median and range over ``--rounds`` rounds are reported. ``process_seconds`` includes the warm-up of the compiled
processes (what a run pays once per stage): each process compiles cold, in its own inductor cache folder.

The trainer's CPU defaults (kdpipe/distill/trainer.py: channels_last off on CPU; config ``train.performance``:
compile off) should be changed only where this measures a speed-up beyond the round-to-round range.

Writes benchmarks/results/train_options_cpu.json and .md (device, versions, commit).

    python benchmarks/cpu_train_options.py [--rounds 3] [--steps 5] [--batch-sizes 128] [--precisions fp32 bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import environment, write_result

HERE = Path(__file__).resolve().parent

OPTIONS: dict[str, list[str]] = {
    "eager NCHW": ["--no-channels-last"],
    "channels_last": ["--channels-last"],
    "compile": ["--no-channels-last", "--compile"],
    "compile + channels_last": ["--channels-last", "--compile"],
}
BASE = "eager NCHW"


def measure(precision: str, option: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    command = [
        sys.executable,
        str(HERE / "train_throughput.py"),
        "--device",
        "cpu",
        "--precision",
        precision,
        *OPTIONS[option],
        "--batch-sizes",
        *map(str, args.batch_sizes),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--repeats",
        "1",
        "--samples",
        str(args.samples),
        "--out",
        str(out),
    ]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kdpipe-inductor-") as cache:  # a cold compile, as a fresh run pays it
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    wall = time.perf_counter() - start
    raw = json.loads(out.read_text())
    cells = {
        r["batch_size"]: {"step_s": r["kdpipe"]["step_s_median"], "images_per_s": r["kdpipe"]["images_per_s"]}
        for r in raw["results"]
    }
    return {
        "precision": raw["precision"],
        "channels_last": raw["channels_last"],
        "compile": raw["compile"],
        "process_seconds": wall,
        "setup_and_warmup_seconds": raw.get("seconds"),
        "cells": cells,
        "load_average_1_5_15": raw.get("load_average_1_5_15"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--name", default="train_options_cpu")
    args = p.parse_args(argv)
    if BASE not in args.options:
        args.options.insert(0, BASE)
    order = [(precision, option) for precision in args.precisions for option in args.options]
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kdpipe-options-") as tmp:
        for r in range(args.rounds):
            shift = r % len(order)
            for precision, option in order[shift:] + order[:shift]:
                row = measure(precision, option, args, Path(tmp) / "out.json")
                runs.append({"round": r, "asked_precision": precision, "option": option, **row})
                cells = ", ".join(f"b{b}: {c['images_per_s']:.1f} img/s" for b, c in row["cells"].items())
                print(f"round {r} {precision:5s} {option:24s} {cells} ({row['process_seconds']:.0f} s)", flush=True)

    summary: dict[str, Any] = {}
    for precision in args.precisions:
        for option in args.options:
            for batch in args.batch_sizes:
                ratios, speeds = [], []
                for r in range(args.rounds):
                    (base,) = (
                        x for x in runs if x["round"] == r and x["asked_precision"] == precision and x["option"] == BASE
                    )
                    (mine,) = (
                        x
                        for x in runs
                        if x["round"] == r and x["asked_precision"] == precision and x["option"] == option
                    )
                    base_s, my_s = base["cells"][batch]["step_s"], mine["cells"][batch]["step_s"]
                    ratios.append(base_s / my_s)
                    speeds.append(mine["cells"][batch]["images_per_s"])
                mine_runs = [x for x in runs if x["asked_precision"] == precision and x["option"] == option]
                summary[f"{precision}/{option}/b{batch}"] = {
                    "precision": precision,
                    "trained": sorted({x["precision"] for x in mine_runs}),
                    "option": option,
                    "batch_size": batch,
                    "images_per_s_median": statistics.median(speeds),
                    "speedup_vs_eager_nchw_median": statistics.median(ratios),
                    "speedup_range": [min(ratios), max(ratios)],
                    "process_seconds_median": statistics.median(x["process_seconds"] for x in mine_runs),
                }
    payload = {
        "method": (
            f"benchmarks/cpu_train_options.py: one train_throughput.py process per option set and precision, "
            f"{args.warmup} warm-up + {args.steps} timed steps at batch {args.batch_sizes}, {args.samples} synthetic "
            f"samples, {args.rounds} rounds in rotating order; speed-up = eager NCHW step time / option step time of "
            "the same precision in the same round"
        ),
        "runs": runs,
        "summary": summary,
    }
    path = write_result(args.name, payload)
    env = environment()
    lines = [
        "# Training speed options on CPU (channels_last, torch.compile)",
        "",
        "- kdpipe's Trainer, KD resnet32x4 -> resnet8x4, 2 threads, synthetic 3x32x32 data, "
        f"batch {', '.join(map(str, args.batch_sizes))}; {args.warmup} warm-up + {args.steps} timed steps per "
        f"process, {args.rounds} rounds in rotating order.",
        f"- {env.get('date')}, {env.get('device')}, {env.get('cpu_count')} CPUs, torch {env.get('torch')}, commit "
        f"`{env.get('commit')}`.",
        "- `python benchmarks/cpu_train_options.py`",
        "",
        "| precision (trained) | option | batch | img/s | speed-up vs eager NCHW (range) | process s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for s in summary.values():
        lo, hi = s["speedup_range"]
        lines.append(
            f"| {s['precision']} ({', '.join(s['trained'])}) | {s['option']} | {s['batch_size']} | "
            f"{s['images_per_s_median']:.1f} | {s['speedup_vs_eager_nchw_median']:.2f}x ({lo:.2f}-{hi:.2f}) | "
            f"{s['process_seconds_median']:.0f} |"
        )
    path.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(path.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
