"""Training epoch time of kdpipe against torchdistill on one CPU KD workload (issue 21, item 1).

The workload: Hinton KD (T = 4, alpha 0.9) of a CIFAR ResNet-20 student from a CIFAR ResNet-56 teacher on the first
500 training images per class of the CIFAR-10 JPEG copy (../shared/data/cifar10-jpg.tar.gz, 5,000 images, by file
name), batch 128, SGD (lr 0.1, momentum 0.9, wd 5e-4), random 4-pixel-padded crop and horizontal flip, 2 CPU
threads. Epoch time = the training loop of one epoch (all steps, data loading included; no evaluation, no
checkpoint), median over the epochs after the first of each run.

- kdpipe: ``kdpipe run`` of a generated stages.yaml (a teacher stage from a checkpoint of a seeded resnet56, a distill
  stage), the epoch times read from the distill stage's history (``train_seconds``). Rows for ``precision: fp32`` and
  ``precision: bf16`` (bf16 autocast where the CPU computes bf16 natively; fp32 elsewhere, and the row says so).
- torchdistill: its library (``pip install torchdistill``, in its own virtualenv with the same torch) driven by
  ``_torchdistill_driver.py`` from a generated torchdistill YAML: torchvision's ImageFolder over the same extracted
  images and transforms, its own resnet56/resnet20 and KDLoss, its DistillationBox's forward/backward, each epoch's
  loop timed with perf_counter. Its DataLoader gets ``--td-workers`` worker processes (0 and 2 by default: the
  faster is the reference). torchdistill trains in fp32 on CPU (it has no CPU autocast).

Runs alternate (kdpipe fp32, torchdistill, kdpipe bf16, ...) for ``--rounds`` rounds, so a slow spell of the shared
machine falls on all of them. Writes benchmarks/results/vs_torchdistill_cpu.json and .md with device, versions and
commit. Target: kdpipe's epoch <= 0.65x torchdistill's.

    python benchmarks/vs_torchdistill.py --td-python /path/to/venv/bin/python [--epochs 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from _common import SHARED_DATA, environment, write_result
from method_quality import make_subset

REPO = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).resolve().parent / "_torchdistill_driver.py"
TARGET_RATIO = 0.65
MEAN, STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]


def _threads_env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def teacher_checkpoint(work: Path) -> Path:
    """A seeded resnet56 (kdpipe's CIFAR net, 10 classes) saved as kdpipe weights: the frozen teacher. Its values do
    not change the step's cost."""
    import torch

    import kdpipe.models  # noqa: F401  (registers resnet56 with timm)
    from kdpipe.models.factory import create_model
    from kdpipe.models.weights import save_weights

    path = work / "resnet56-seed0.safetensors"
    if not path.is_file():
        torch.manual_seed(0)
        save_weights(create_model("resnet56", num_classes=10), path, metadata={"arch": "resnet56"})
    return path


def kdpipe_yaml(data: Path, teacher: Path, epochs: int, precision: str) -> dict[str, Any]:
    train = {
        "epochs": epochs,
        "batch_size": 128,
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "schedule": {"name": "constant"},
        "eval_every": 1000,
    }
    return {
        "version": 1,
        "name": "vs-torchdistill",
        "seed": 0,
        "device": "cpu",
        "data": {
            "kind": "imagefolder",
            "root": str(data),
            "image_size": 32,
            "augment": "cifar",
            "normalize": {"mean": MEAN, "std": STD},
        },
        "stages": {
            "teacher": {"type": "teacher", "model": "resnet56", "weights": {"checkpoint": str(teacher)}},
            "distill": {
                "type": "distill",
                "student": "resnet20",
                "method": {"name": "kd", "temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9},
                "train": train,
                "precision": precision,
            },
        },
    }


def run_kdpipe(work: Path, data: Path, teacher: Path, epochs: int, precision: str, threads: int, tag: str) -> dict:
    cfg = work / f"kdpipe-{precision}.yaml"
    cfg.write_text(yaml.safe_dump(kdpipe_yaml(data, teacher, epochs, precision), sort_keys=False))
    out = work / f"kdpipe-{tag}"
    command = [sys.executable, "-m", "kdpipe", "-q", "run", str(cfg), "--out", str(out), "--force"]
    subprocess.run(command, cwd=REPO, env=_threads_env(threads), check=True)
    info = json.loads((out / "distill" / "result.json").read_text())["info"]
    return {
        "epoch_seconds": [row["train_seconds"] for row in info["history"]],
        "precision": info["precision"],
        "precision_note": info.get("precision_note", ""),
    }


def torchdistill_yaml(data: Path, epochs: int, workers: int, ckpt: Path) -> str:
    """A torchdistill config (its own YAML tags) for the same workload."""
    normalize = f"""                - !import_call
                  key: 'torchvision.transforms.Normalize'
                  init:
                    kwargs: {{mean: {MEAN}, std: {STD}}}"""
    return f"""datasets:
  &train cifar10/train: !import_call
    key: 'torchvision.datasets.ImageFolder'
    init:
      kwargs:
        root: '{data / "train"}'
        transform: !import_call
          key: 'torchvision.transforms.Compose'
          init:
            kwargs:
              transforms:
                - !import_call
                  key: 'torchvision.transforms.RandomCrop'
                  init:
                    kwargs: {{size: 32, padding: 4}}
                - !import_call
                  key: 'torchvision.transforms.RandomHorizontalFlip'
                  init:
                    kwargs: {{p: 0.5}}
                - !import_call
                  key: 'torchvision.transforms.ToTensor'
                  init:
{normalize}
models:
  teacher_model:
    key: 'resnet56'
    kwargs: {{num_classes: 10, pretrained: False}}
  student_model:
    key: 'resnet20'
    kwargs: {{num_classes: 10, pretrained: False}}
    dst_ckpt: '{ckpt}'
train:
  log_freq: 1000
  num_epochs: {epochs}
  train_data_loader:
    dataset_id: *train
    sampler:
      class_or_func: !import_get
        key: 'torch.utils.data.RandomSampler'
      kwargs:
    kwargs: {{batch_size: 128, num_workers: {workers}, pin_memory: False, drop_last: False}}
  teacher:
    forward_proc: 'forward_batch_only'
    sequential: []
    requires_grad: False
    frozen_modules: []
  student:
    forward_proc: 'forward_batch_only'
    adaptations:
    sequential: []
    requires_grad: True
    frozen_modules: []
  optimizer:
    key: 'SGD'
    kwargs: {{lr: 0.1, momentum: 0.9, weight_decay: 0.0005}}
  scheduler:
    key: 'MultiStepLR'
    kwargs: {{milestones: [1000], gamma: 0.1}}
  criterion:
    key: 'WeightedSumLoss'
    kwargs:
      sub_terms:
        kd:
          criterion:
            key: 'KDLoss'
            kwargs:
              student_module_path: '.'
              student_module_io: 'output'
              teacher_module_path: '.'
              teacher_module_io: 'output'
              temperature: 4.0
              alpha: 0.9
              reduction: 'batchmean'
          weight: 1.0
"""


def run_torchdistill(td_python: Path, work: Path, data: Path, epochs: int, workers: int, threads: int) -> dict:
    cfg = work / f"torchdistill-w{workers}.yaml"
    cfg.write_text(torchdistill_yaml(data, epochs, workers, work / "td-student.pt"))
    out = work / f"torchdistill-w{workers}.json"
    command = [str(td_python), str(DRIVER), "--config", str(cfg), "--threads", str(threads), "--out", str(out)]
    subprocess.run(command, cwd=work, env=_threads_env(threads), check=True)
    return json.loads(out.read_text())


def _steady(seconds: list[float]) -> float:
    """Median epoch time after the first epoch of a run (its warm-up: allocator, oneDNN primitive caches)."""
    return statistics.median(seconds[1:] if len(seconds) > 1 else seconds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--td-python", type=Path, required=True, help="python of a virtualenv with torchdistill installed")
    p.add_argument("--data", type=Path, default=SHARED_DATA / "cifar10-jpg.tar.gz")
    p.add_argument("--per-class", type=int, default=500)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--td-workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--work", type=Path, default=Path("/tmp/kdpipe-vs-torchdistill"))
    p.add_argument("--name", default="vs_torchdistill_cpu")
    args = p.parse_args(argv)
    work = args.work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    data = make_subset(args.data, work / f"cifar10-{args.per_class}", args.per_class, 10)
    teacher = teacher_checkpoint(work)
    runs: dict[str, list[dict[str, Any]]] = {}
    for r in range(args.rounds):
        for precision in ("fp32", "bf16"):
            runs.setdefault(f"kdpipe {precision}", []).append(
                run_kdpipe(work, data, teacher, args.epochs, precision, args.threads, f"{precision}-{r}")
            )
            for workers in args.td_workers:
                runs.setdefault(f"torchdistill workers={workers}", []).append(
                    run_torchdistill(args.td_python, work, data, args.epochs, workers, args.threads)
                )
    steady = {name: statistics.median(_steady(r["epoch_seconds"]) for r in rs) for name, rs in runs.items()}
    reference_name = min((n for n in steady if n.startswith("torchdistill")), key=lambda n: steady[n])
    reference = steady[reference_name]
    rows = {
        name: {
            "epoch_seconds_median": value,
            "ratio_to_torchdistill": value / reference,
            "runs": runs[name],
        }
        for name, value in steady.items()
    }
    best_kdpipe = min((n for n in steady if n.startswith("kdpipe")), key=lambda n: steady[n])
    payload = {
        "method": __doc__.split("\n\n")[1],
        "protocol": {
            "per_class": args.per_class,
            "epochs_per_run": args.epochs,
            "rounds": args.rounds,
            "threads": args.threads,
            "torchdistill_workers": args.td_workers,
        },
        "torchdistill_version": json.loads((work / f"torchdistill-w{args.td_workers[0]}.json").read_text())["version"],
        "reference": reference_name,
        "rows": rows,
        "target_ratio": TARGET_RATIO,
        "met": {
            name: row["ratio_to_torchdistill"] <= TARGET_RATIO
            for name, row in rows.items()
            if name.startswith("kdpipe")
        },
        "best_kdpipe": best_kdpipe,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = write_result(args.name, payload)
    env = environment()
    lines = [
        "# kdpipe vs torchdistill: CPU epoch time of one KD workload",
        "",
        f"- resnet56 -> resnet20, Hinton KD, CIFAR-10 JPEG, {args.per_class * 10} training images, batch 128, SGD, "
        f"{args.threads} threads; {args.epochs} epochs per run, median after the first, {args.rounds} alternating "
        "rounds.",
        f"- {env.get('date')}, {env.get('device')} ({env.get('cpu_count')} CPUs), torch {env.get('torch')}, "
        f"torchdistill {payload['torchdistill_version']}, commit `{env.get('commit')}`.",
        f"- reference: {reference_name}. Target: kdpipe <= {TARGET_RATIO}x.",
        "",
        "| run | epoch (s), median | x torchdistill | every run's steady epoch (s) |",
        "|---|---:|---:|---|",
    ]
    for name, row in rows.items():
        each = ", ".join(f"{_steady(r['epoch_seconds']):.1f}" for r in row["runs"])
        note = f" (trained in {row['runs'][0]['precision']})" if name.startswith("kdpipe") else ""
        median, ratio = row["epoch_seconds_median"], row["ratio_to_torchdistill"]
        lines.append(f"| {name}{note} | {median:.1f} | {ratio:.2f} | {each} |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(path.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
