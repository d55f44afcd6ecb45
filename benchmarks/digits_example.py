"""Wall time of the embedded default, ``kdpipe run examples/digits.yaml``, as a new user runs it.

Targets (issue: foundation): the whole run in at most 180 s on the 2-core CI machine; an unchanged second run
skips every stage in under 10 s. Method: a fresh run directory, the CLI in a subprocess (imports included), timed
with a monotonic clock; then the same command again. Accuracy figures are read from the run's results.

    python benchmarks/digits_example.py [--repeats N]
    python benchmarks/digits_example.py --example sweep_digits   # the sweep example (issue 20: under 10 minutes)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import write_result

REPO = Path(__file__).resolve().parents[1]
TARGET_FULL_S = {"digits": 180.0, "sweep_digits": 600.0}
TARGET_RERUN_S = 10.0


def timed(cmd: list[str], cwd: Path) -> float:
    t0 = time.monotonic()
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)
    return time.monotonic() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1, help="fresh full runs to time (default 1)")
    parser.add_argument("--example", choices=sorted(TARGET_FULL_S), default="digits", help="examples/<name>.yaml")
    args = parser.parse_args()
    target = TARGET_FULL_S[args.example]
    full, rerun = [], []
    metrics: dict[str, dict] = {}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(tmp) / "run"
            cmd = [
                sys.executable,
                "-m",
                "kdpipe",
                "run",
                str(REPO / "examples" / f"{args.example}.yaml"),
                "--out",
                str(run_dir),
            ]
            full.append(timed(cmd, REPO))
            rerun.append(timed(cmd, REPO))
            for stage in ("teacher", "distill", "sweep"):
                path = run_dir / stage / "result.json"
                if path.is_file():
                    doc = json.loads(path.read_text())
                    metrics[stage] = {**doc["metrics"], "summary": doc.get("summary", "")}
    result = {
        "example": f"examples/{args.example}.yaml",
        "method": f"subprocess wall time of `kdpipe run examples/{args.example}.yaml` into a fresh --out dir, twice",
        "repeats": args.repeats,
        "full_run_s": {"median": statistics.median(full), "all": full},
        "rerun_s": {"median": statistics.median(rerun), "all": rerun},
        "targets": {"full_run_s_max": target, "rerun_s_max": TARGET_RERUN_S},
        "met": statistics.median(full) <= target and statistics.median(rerun) < TARGET_RERUN_S,
        "teacher": {k: metrics["teacher"][k] for k in ("top1", "params")},
    }
    if "distill" in metrics:
        result["student"] = {k: metrics["distill"][k] for k in ("top1", "params", "compression")}
    if "sweep" in metrics:
        result["sweep"] = metrics["sweep"]
    path = write_result(f"{args.example}_example", result)
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
