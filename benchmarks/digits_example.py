"""Wall time of the embedded default, ``kdpipe run examples/digits.yaml``, as a new user runs it.

Targets (issue: foundation): the whole run in at most 180 s on the 2-core CI machine; an unchanged second run
skips every stage in under 10 s. Method: a fresh run directory, the CLI in a subprocess (imports included), timed
with a monotonic clock; then the same command again. Accuracy figures are read from the run's results.

    python benchmarks/digits_example.py [--repeats N]
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
TARGET_FULL_S = 180.0
TARGET_RERUN_S = 10.0


def timed(cmd: list[str], cwd: Path) -> float:
    t0 = time.monotonic()
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)
    return time.monotonic() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1, help="fresh full runs to time (default 1)")
    args = parser.parse_args()
    full, rerun = [], []
    metrics: dict[str, dict] = {}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(tmp) / "run"
            cmd = [sys.executable, "-m", "kdpipe", "run", str(REPO / "examples" / "digits.yaml"), "--out", str(run_dir)]
            full.append(timed(cmd, REPO))
            rerun.append(timed(cmd, REPO))
            for stage in ("teacher", "distill"):
                metrics[stage] = json.loads((run_dir / stage / "result.json").read_text())["metrics"]
    result = {
        "method": "subprocess wall time of `kdpipe run examples/digits.yaml` into a fresh --out dir, then again",
        "repeats": args.repeats,
        "full_run_s": {"median": statistics.median(full), "all": full},
        "rerun_s": {"median": statistics.median(rerun), "all": rerun},
        "targets": {"full_run_s_max": TARGET_FULL_S, "rerun_s_max": TARGET_RERUN_S},
        "met": statistics.median(full) <= TARGET_FULL_S and statistics.median(rerun) < TARGET_RERUN_S,
        "teacher": {k: metrics["teacher"][k] for k in ("top1", "params")},
        "student": {k: metrics["distill"][k] for k in ("top1", "params", "compression")},
    }
    path = write_result("digits_example", result)
    print(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
