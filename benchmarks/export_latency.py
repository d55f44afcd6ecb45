"""CPU latency of the digits student as ONNX (fp32, int8 QDQ) against eager PyTorch, and the accuracy cost of int8.

Targets (issue: export + benchmark), on the 2-core CI machine with 2 threads:
- onnxruntime fp32 p50 at batch 1 <= 0.7x torch eager p50 at batch 1;
- onnxruntime int8 p50 at batch 64 <= 0.7x onnxruntime fp32 p50 at batch 64;
- top-1 on the digits test split: fp32 ONNX minus int8 ONNX <= 0.01.

Method: the student of ``kdpipe run examples/digits.yaml`` (a resnet8 on 1x16x16; trained here in a subprocess
unless --student names its model.safetensors) is exported with ``kdpipe.exports.export_onnx`` (dynamic batch) and
quantized with ``kdpipe.exports.quantize_int8`` (static QDQ, per channel) on 512 train images. Latency comes from
``kdpipe.bench.run_benchmark``: 10 warm-up calls, then timed calls for at least 30 iterations and --min-time seconds
per cell, percentiles of per-call perf_counter_ns times; every backend uses --threads CPU threads. The whole
measurement is repeated --repeats times, the order of the backends reversed every other repeat; each ratio is taken
within a repeat (cells minutes apart never share a ratio) and the median over repeats is compared with the target,
so a burst of load from another process moves one repeat, not the verdict. The load average is recorded too.

    python benchmarks/export_latency.py [--student runs/digits-kd/distill/model.safetensors] [--repeats 7]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from _common import write_result

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "digits.yaml"
CALIBRATION_IMAGES = 512
TARGET_ORT_VS_TORCH_B1 = 0.7
TARGET_INT8_VS_FP32_B64 = 0.7
TARGET_TOP1_DROP = 0.01


def train_student(work: Path) -> Path:
    """Run the digits example once, as a user would, and return its student's weight file."""
    run_dir = work / "run"
    cmd = [sys.executable, "-m", "kdpipe", "run", str(CONFIG), "--out", str(run_dir)]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    return run_dir / "distill" / "model.safetensors"


def load_student(path: Path) -> tuple[torch.nn.Module, dict[str, str]]:
    from kdpipe.models.factory import create_model, load_weights, read_weights_metadata

    meta = read_weights_metadata(path)
    model = create_model(meta["arch"], num_classes=int(meta["num_classes"]), in_chans=int(meta["in_chans"]))
    load_weights(model, path)
    return model.eval(), meta


def load_splits() -> Any:
    """The digits splits exactly as the example run builds them (same data config and seed)."""
    from kdpipe.config import DataConfig
    from kdpipe.data import create_splits

    raw = yaml.safe_load(CONFIG.read_text())
    return create_splits(DataConfig.model_validate(raw["data"]), seed=int(raw["seed"]), base_dir=CONFIG.parent)


def export_student(
    model: torch.nn.Module,
    splits: Any,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    calibration: torch.Tensor,
    work: Path,
) -> tuple[Path, Path]:
    """fp32 ONNX with a dynamic batch, and its static-QDQ int8 quantization calibrated on ``calibration``."""
    from kdpipe.exports import Preprocessing, export_onnx, quantize_int8

    pre = Preprocessing(
        mean=mean,
        std=std,
        image_size=splits.image_size,
        in_chans=splits.in_chans,
        channel_order="L",
        classes=tuple(splits.classes),
    )
    fp32_path = work / "student.fp32.onnx"
    export_onnx(model, fp32_path, preprocessing=pre, dynamic_batch=True)
    int8_path = Path(quantize_int8(fp32_path, work / "student.int8.onnx", calibration, per_channel=True))
    return fp32_path, int8_path


def onnx_top1(path: Path, images: torch.Tensor, labels: torch.Tensor, threads: int) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = np.concatenate([session.run(None, {name: chunk.numpy()})[0] for chunk in images.split(256)])
    return float((logits.argmax(1) == labels.numpy()).mean())


@torch.inference_mode()
def torch_top1(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    logits = torch.cat([model(chunk) for chunk in images.split(256)])
    return float((logits.argmax(1) == labels).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", type=Path, help="model.safetensors of a digits run (default: train one)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for every backend (default 2)")
    parser.add_argument("--repeats", type=int, default=7, help="full measurements, order alternating (default 7)")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds per cell at least (default 1)")
    args = parser.parse_args()

    from kdpipe.bench import BenchTarget, markdown_table, run_benchmark
    from kdpipe.data import normalize

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        student_path = args.student or train_student(work)
        model, meta = load_student(student_path)
        splits = load_splits()
        mean = tuple(float(v) for v in meta["mean"].split(","))
        std = tuple(float(v) for v in meta["std"].split(","))
        calibration = normalize(splits.train.images[:CALIBRATION_IMAGES], mean, std)
        fp32_path, int8_path = export_student(model, splits, mean, std, calibration, work)

        test_images, test_labels = normalize(splits.test.images, mean, std), splits.test.labels
        top1 = {
            "torch": torch_top1(model, test_images, test_labels),
            "onnx_fp32": onnx_top1(fp32_path, test_images, test_labels, args.threads),
            "onnx_int8": onnx_top1(int8_path, test_images, test_labels, args.threads),
        }

        targets = [
            BenchTarget("student", "torch", student_path, module=model),
            BenchTarget("student fp32", "onnxruntime", fp32_path),
            BenchTarget("student int8", "onnxruntime", int8_path),
        ]
        shape = (splits.in_chans, splits.image_size, splits.image_size)
        load_before = os.getloadavg()
        repeats = [
            run_benchmark(
                targets if r % 2 == 0 else targets[::-1],
                [1, 64],
                shape,
                threads=args.threads,
                min_time_s=args.min_time,
                device="cpu",
            )
            for r in range(args.repeats)
        ]
        load_after = os.getloadavg()
        sizes = {"onnx_fp32_bytes": fp32_path.stat().st_size, "onnx_int8_bytes": int8_path.stat().st_size}

    errors = [c for cells in repeats for c in cells if c.error]
    if errors:
        raise SystemExit(f"benchmark cells failed: {[(c.model, c.backend, c.batch_size, c.error) for c in errors]}")

    def p50(cells: list[Any], model_label: str, batch: int) -> float:
        (cell,) = [c for c in cells if c.model == model_label and c.batch_size == batch]
        return float(cell.p50_ms)

    def median_p50(model_label: str, batch: int) -> float:
        return statistics.median(p50(cells, model_label, batch) for cells in repeats)

    per_repeat = {
        "ort_fp32_vs_torch_p50_batch1": [p50(c, "student fp32", 1) / p50(c, "student", 1) for c in repeats],
        "int8_vs_fp32_p50_batch64": [p50(c, "student int8", 64) / p50(c, "student fp32", 64) for c in repeats],
    }
    ratios = {name: statistics.median(values) for name, values in per_repeat.items()}
    ratios["top1_drop_int8"] = top1["onnx_fp32"] - top1["onnx_int8"]
    met = {
        "ort_fp32_vs_torch_batch1": ratios["ort_fp32_vs_torch_p50_batch1"] <= TARGET_ORT_VS_TORCH_B1,
        "int8_vs_fp32_batch64": ratios["int8_vs_fp32_p50_batch64"] <= TARGET_INT8_VS_FP32_B64,
        "top1_drop": ratios["top1_drop_int8"] <= TARGET_TOP1_DROP,
    }
    result = {
        "method": __doc__.split("Method: ", 1)[1].split("\n\n", 1)[0].replace("\n", " "),
        "threads": args.threads,
        "repeats": args.repeats,
        "min_time_s": args.min_time,
        "calibration_images": CALIBRATION_IMAGES,
        "load_average_1_5_15": {"before": load_before, "after": load_after},
        "student": {"arch": meta["arch"], "input_shape": list(shape), **sizes},
        "p50_ms_median": {
            f"{label} batch {b}": median_p50(label, b)
            for label in ("student", "student fp32", "student int8")
            for b in (1, 64)
        },
        "top1": top1,
        "ratios": ratios,
        "ratios_per_repeat": per_repeat,
        "targets": {
            "ort_fp32_vs_torch_p50_batch1_max": TARGET_ORT_VS_TORCH_B1,
            "int8_vs_fp32_p50_batch64_max": TARGET_INT8_VS_FP32_B64,
            "top1_drop_max": TARGET_TOP1_DROP,
        },
        "met": met,
        "all_met": all(met.values()),
        "cells": [[dataclasses.asdict(c) for c in cells] for cells in repeats],
    }
    path = write_result("export_latency", result)
    print(markdown_table(repeats[-1]))
    print(json.dumps({k: result[k] for k in ("p50_ms_median", "top1", "ratios", "met")}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
