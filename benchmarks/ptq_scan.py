"""Where does post-training quantization hurt a student? onnxruntime's int8 settings scanned on finished runs.

For each finished ``benchmarks/qad.py`` student run (``--runs``; its fp32 ONNX at ``onnx/model.onnx`` and its data
config), quantize the fp32 graph with kdpipe's ``quantize_int8`` under each setting (calibration images, per-tensor
or per-channel weights, reduced range or 8-bit weights, calibration method, uint8 or int8 activations) and measure
test top-1 and top-1 agreement with fp32 on the full test split with onnxruntime. Issue 19 asks for a case where PTQ
loses at least one point; this says which settings come closest on a given student, in about a minute per run.

Writes benchmarks/results/ptq_scan_cpu.json and .md (device, versions, commit).

    python benchmarks/ptq_scan.py --runs /work/qadbench/s0 /work/qadbench/s1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from _common import environment, write_result

SETTINGS: list[dict[str, Any]] = [
    {"n": 512, "per_channel": False, "reduce_range": True, "method": "minmax", "activations": "uint8"},
    {"n": 128, "per_channel": False, "reduce_range": True, "method": "minmax", "activations": "uint8"},
    {"n": 32, "per_channel": False, "reduce_range": True, "method": "minmax", "activations": "uint8"},
    {"n": 512, "per_channel": False, "reduce_range": False, "method": "minmax", "activations": "uint8"},
    {"n": 512, "per_channel": True, "reduce_range": True, "method": "minmax", "activations": "uint8"},
    {"n": 512, "per_channel": False, "reduce_range": True, "method": "minmax", "activations": "int8"},
    {"n": 512, "per_channel": False, "reduce_range": False, "method": "minmax", "activations": "int8"},
    {"n": 512, "per_channel": True, "reduce_range": False, "method": "minmax", "activations": "int8"},
    {"n": 512, "per_channel": False, "reduce_range": True, "method": "percentile", "activations": "uint8"},
    {"n": 512, "per_channel": False, "reduce_range": True, "method": "entropy", "activations": "uint8"},
]


def label(s: dict[str, Any]) -> str:
    weights = ("per-channel" if s["per_channel"] else "per-tensor") + (" 7-bit" if s["reduce_range"] else " 8-bit")
    return f"{s['n']} images, {weights} weights, {s['method']}, {s['activations']} activations"


def scan(run: Path) -> dict[str, Any]:
    import kdpipe.stages  # noqa: F401  (registers the stage types)
    from kdpipe.config import DataConfig
    from kdpipe.data import normalize
    from kdpipe.data.splits import create_splits
    from kdpipe.exports import quantize_int8
    from kdpipe.exports.formats import onnx_runner
    from kdpipe.stages.export import calibration_images

    raw = yaml.safe_load((run / "resolved.yaml").read_text())
    seed = int(raw["seed"])
    splits = create_splits(DataConfig.model_validate(raw["data"]), seed=seed, base_dir=run)
    test = normalize(splits.test.load(torch.arange(len(splits.test))), splits.mean, splits.std).numpy()
    labels = splits.test.labels.numpy()

    def predict(path: Path) -> np.ndarray:
        session = onnx_runner(path, True, 256)
        return np.concatenate([np.argmax(session(test[i : i + 1000]), 1) for i in range(0, len(test), 1000)])

    fp32_path = run / "onnx" / "model.onnx"
    reference = predict(fp32_path)
    fp32_top1 = float((reference == labels).mean())
    rows = []
    with tempfile.TemporaryDirectory(prefix="kdpipe-ptq-scan-") as tmp:
        for setting in SETTINGS:
            out = Path(tmp) / "int8.onnx"
            quantize_int8(
                fp32_path,
                out,
                calibration_images(splits, setting["n"], seed),
                per_channel=setting["per_channel"],
                reduce_range=setting["reduce_range"],
                method=setting["method"],
                activation_type=setting["activations"],
            )
            pred = predict(out)
            top1 = float((pred == labels).mean())
            rows.append(
                {**setting, "top1": top1, "drop": fp32_top1 - top1, "agreement": float((pred == reference).mean())}
            )
            print(f"{run.name}: {label(setting)}: top-1 {top1:.4f} (drop {fp32_top1 - top1:+.4f})", flush=True)
    return {"run": str(run), "seed": seed, "fp32_top1": fp32_top1, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="finished benchmarks/qad.py student runs")
    p.add_argument("--name", default="ptq_scan_cpu")
    args = p.parse_args(argv)
    runs = [scan(run.absolute()) for run in args.runs]
    path = write_result(args.name, {"runs": runs})
    env = environment()
    described = [f"`{r['run']}` (seed {r['seed']}, fp32 {100 * r['fp32_top1']:.2f} %)" for r in runs]
    lines = [
        "# Post-training quantization settings scanned (CPU, onnxruntime)",
        "",
        f"- Runs: {', '.join(described)}; full test split.",
        f"- {env.get('date')}, {env.get('device')}, onnxruntime {env.get('onnxruntime')}, "
        f"commit `{env.get('commit')}`.",
        f"- `python benchmarks/ptq_scan.py --runs {' '.join(r['run'] for r in runs)}`",
        "",
        "| setting | " + " | ".join(f"seed {r['seed']}: drop (points) / agreement" for r in runs) + " |",
        "|---|" + "---|" * len(runs),
    ]
    for i, setting in enumerate(SETTINGS):
        cells = [f"{100 * r['rows'][i]['drop']:.2f} / {r['rows'][i]['agreement']:.3f}" for r in runs]
        lines.append(f"| {label(setting)} | " + " | ".join(cells) + " |")
    worst = max((100 * r["rows"][i]["drop"], label(SETTINGS[i])) for r in runs for i in range(len(SETTINGS)))
    lines += ["", f"Largest drop: {worst[0]:.2f} points ({worst[1]})."]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(path.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
