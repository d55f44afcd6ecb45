"""A CPU rehearsal of examples/sweep_cifar10.yaml: the student sweep on real CIFAR-10, shortened to fit a 2-core CPU.

The example as written (a ResNet-56 teacher, 4 students x 2 KD methods x 3 precisions, 200 epochs each) is a GPU
job. This runs the same stages.yaml through the CLI with only the data and the schedules shortened: the first
``--per-class`` training images of each class of ../shared/data/cifar10-jpg.tar.gz (by file name; default 500, 5,000
images, 10 % of them held out), the full 10,000-image test split, ``--teacher-epochs`` and ``--epochs``. Every
candidate is distilled, gated, exported, parity-checked and benchmarked on onnxruntime (2 threads), and the budget
picks the deployed one, exactly as in the example.

Writes the sweep's report to ``benchmarks/results/sweep_cifar10_cpu.json``, ``.md`` and ``.png`` (the Pareto plot)
with device, versions, commit and the overrides used.

    python benchmarks/sweep_cifar.py [--per-class 500] [--teacher-epochs 40] [--epochs 20] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import RESULTS, SHARED_DATA, environment, write_result
from method_quality import make_subset

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "sweep_cifar10.yaml"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=SHARED_DATA / "cifar10-jpg.tar.gz")
    p.add_argument("--per-class", type=int, default=500)
    p.add_argument("--teacher-epochs", type=int, default=40)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--work", type=Path, default=Path("/tmp/kdpipe-sweep-cifar"))
    p.add_argument("--name", default="sweep_cifar10_cpu")
    args = p.parse_args(argv)
    if not args.data.exists():
        print(f"{args.data} is absent (the CIFAR-10 archive ships beside the checkout)", file=sys.stderr)
        return 2
    subset = make_subset(args.data, args.work / f"cifar10-{args.per_class}", args.per_class, None)
    warmup = max(1, round(20 * args.epochs / 200))  # DKD's 20 of 200 epochs, scaled
    sets = [
        f"data.root={subset}",
        f"stages.teacher.weights.train.epochs={args.teacher_epochs}",
        f"stages.sweep.train.epochs={args.epochs}",
        f"stages.sweep.methods.1.warmup_epochs={warmup}",
    ]
    run_dir = args.work / "run"
    command = [sys.executable, "-m", "kdpipe", "run", str(EXAMPLE), "--out", str(run_dir)]
    command += [f"--set={s}" for s in sets]
    print("$", " ".join(command), file=sys.stderr, flush=True)
    t0 = time.time()
    code = subprocess.run(command, cwd=REPO, check=False).returncode
    seconds = time.time() - t0
    sweep = run_dir / "sweep"
    if not (sweep / "report.json").is_file():
        print(f"kdpipe exited with {code} before the sweep's report", file=sys.stderr)
        return 1
    report = json.loads((sweep / "report.json").read_text())
    teacher = json.loads((run_dir / "teacher" / "result.json").read_text())["metrics"]
    payload = {
        "example": "examples/sweep_cifar10.yaml",
        "protocol": {
            "data": f"CIFAR-10 JPEG copy, first {args.per_class} training images per class (10 % held out), full "
            "10,000-image test split",
            "teacher_epochs": args.teacher_epochs,
            "epochs": args.epochs,
            "overrides": sets,
            "command": "python benchmarks/sweep_cifar.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        },
        "teacher_top1": teacher["top1"],
        "exit_code": code,
        "wall_seconds": seconds,
        **report,
    }
    path = write_result(args.name, payload)
    env = environment()
    header = (
        f"# Student sweep on CIFAR-10 (CPU rehearsal of `examples/sweep_cifar10.yaml`)\n\n"
        f"- {payload['protocol']['data']}; teacher resnet56 ({args.teacher_epochs} epochs, test top-1 "
        f"{teacher['top1']:.2%}); each candidate distilled for {args.epochs} epochs; seed 0.\n"
        f"- {env.get('date')}, {env.get('device')}, {env.get('cpu_count')} CPUs, torch {env.get('torch')}, "
        f"onnxruntime {env.get('onnxruntime')}, commit `{env.get('commit')}`; {seconds / 60:.0f} min wall; kdpipe "
        f"exit code {code}.\n- `{payload['protocol']['command']}`\n- Selected: `{report['selected']}`.\n\n"
    )
    path.with_suffix(".md").write_text(header + (sweep / "report.md").read_text(), encoding="utf-8")
    if (sweep / "pareto.png").is_file():
        shutil.copyfile(sweep / "pareto.png", RESULTS / f"{args.name}.png")
    print(path.with_suffix(".md").read_text())
    return 0 if code == 0 else code


if __name__ == "__main__":
    sys.exit(main())
