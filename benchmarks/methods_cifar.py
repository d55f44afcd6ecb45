"""Every KD method on real CIFAR-100 with the recipe its spec gives, through the real pipeline (kdpipe run).

Runs, per method, a stages.yaml (teacher stage + distill stage) on ``../shared/data/cifar100-jpg.tar.gz`` and
records each network's best and last-epoch top-1 (best over the per-epoch evaluations on the validation split; last =
the test split after the final epoch), the wall time and the seed. Recipes (shared/methods/*.md):

- offline methods (ce, kd, dkd, fusion_ratio, dpk, iakd): resnet32x4 -> resnet8x4, the CRD protocol (240 epochs,
  batch 64, SGD 0.05, x0.1 at 150/180/210, wd 5e-4); the teacher is trained once with the same protocol, or given
  with --teacher-checkpoint. fusion_ratio learns on the 10% validation split the pipeline always holds out.
- online pair (dml, switokd): wrn_16_2 teacher (lr 0.1) and mobilenetv2_x0_5_cifar student (lr 0.01) from scratch,
  SGD, x0.1 at 140/200/250, 299 epochs, batch 128, wd 5e-4 (SwitOKD's CIFAR-100 script). Target: SwitOKD's student
  beats DML's (paper: 67.24 vs 66.23).
- ffsd: resnet32 leader with 2 common students, SGD nesterov 0.1, wd 1e-4, x0.1 at 150/225, 300 epochs, batch 128;
  compared with ce on resnet32 under the same recipe (paper/README: leader about 74.8).

These are GPU jobs (hours on a CPU). ``--smoke`` runs every recipe for one epoch on a 2% subset to check the whole
flow on a CPU; its numbers mean nothing and are written to methods_cifar_smoke.json.

    python benchmarks/methods_cifar.py [--methods dml switokd] [--epochs N] [--seeds 0 1 2] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from _common import write_result

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "cifar100-jpg.tar.gz"

CRD = {
    "epochs": 240,
    "batch_size": 64,
    "lr": 0.05,
    "weight_decay": 5e-4,
    "schedule": {"name": "step", "milestones": [150, 180, 210]},
}
SWITOKD = {
    "epochs": 299,
    "batch_size": 128,
    "lr": 0.01,
    "weight_decay": 5e-4,
    "schedule": {"name": "step", "milestones": [140, 200, 250]},
}
FFSD = {
    "epochs": 300,
    "batch_size": 128,
    "lr": 0.1,
    "weight_decay": 1e-4,
    "nesterov": True,
    "schedule": {"name": "step", "milestones": [150, 225]},
}

OFFLINE = ("ce", "kd", "dkd", "fusion_ratio", "dpk", "iakd")
RECIPES: dict[str, dict[str, Any]] = {
    **{m: {"teacher": "resnet32x4", "student": "resnet8x4", "train": CRD, "method": {"name": m}} for m in OFFLINE},
    "dml": {
        "teacher": "wrn_16_2",
        "student": "mobilenetv2_x0_5_cifar",
        "train": SWITOKD,
        "online": True,
        "method": {"name": "dml", "teacher_lr": 0.1},
    },
    "switokd": {
        "teacher": "wrn_16_2",
        "student": "mobilenetv2_x0_5_cifar",
        "train": SWITOKD,
        "online": True,
        "method": {"name": "switokd", "teacher_lr": 0.1, "student_lr": 0.01},
    },
    "ffsd": {"student": "resnet32", "train": FFSD, "method": {"name": "ffsd"}},
    "ce_resnet32": {"student": "resnet32", "train": FFSD, "method": {"name": "ce"}},
}
PUBLISHED = {"dml": 66.23, "switokd": 67.24, "ffsd": 74.85, "kd": 73.33, "dkd": 76.32, "ce": 72.50}


def _train(recipe: dict[str, Any], epochs: int | None) -> dict[str, Any]:
    train = json.loads(json.dumps(recipe["train"]))
    if epochs is not None:
        train["epochs"] = epochs
        train["schedule"] = {"name": "cosine"}  # milestones of a 240-epoch run mean nothing in a short one
    return train


def pipeline(
    name: str, recipe: dict[str, Any], args: argparse.Namespace, seed: int, teacher_ckpt: Path | None
) -> dict[str, Any]:
    data: dict[str, Any] = {"kind": "imagefolder", "root": str(args.data), "augment": "cifar", "val_fraction": 0.1}
    if args.subset:
        data["subset"] = args.subset
    stages: dict[str, Any] = {}
    if "teacher" in recipe:
        if recipe.get("online"):
            weights = None  # trained jointly from its seeded random initialisation
        elif teacher_ckpt is not None:
            weights = {"checkpoint": str(teacher_ckpt)}
        else:
            weights = {"train": _train({"train": CRD}, args.epochs)}
        stages["teacher"] = {"type": "teacher", "model": recipe["teacher"], **({"weights": weights} if weights else {})}
    stages["distill"] = {
        "type": "distill",
        "student": recipe["student"],
        "method": recipe["method"],
        "train": _train(recipe, args.epochs),
        "precision": args.precision,
    }
    return {
        "version": 1,
        "name": f"bench-{name}-s{seed}",
        "seed": seed,
        "device": args.device,
        "data": data,
        "stages": stages,
    }


def run_one(name: str, config: dict[str, Any], work: Path) -> dict[str, Any]:
    from kdpipe.config import load_config
    from kdpipe.pipeline.runner import Runner

    path = work / f"{config['name']}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    t0 = time.perf_counter()
    Runner(load_config(path), work / config["name"]).run()
    seconds = time.perf_counter() - t0
    result = json.loads((work / config["name"] / "distill" / "result.json").read_text())
    metrics, info = result["metrics"], result["info"]
    history = info.get("history", [])
    row: dict[str, Any] = {
        "method": name,
        "seed": config["seed"],
        "student": config["stages"]["distill"]["student"],
        "teacher": config["stages"].get("teacher", {}).get("model"),
        "epochs": config["stages"]["distill"]["train"]["epochs"],
        "test_top1_last": metrics["top1"],
        "val_top1_best": metrics.get("best_eval_top1"),
        "best_epoch": metrics.get("best_epoch"),
        "seconds": seconds,
    }
    if "networks" in metrics:
        row["networks"] = metrics["networks"]
        for key in history[-1] if history else {}:
            if key.startswith("eval_top1_"):
                row[f"val_top1_best_{key.removeprefix('eval_top1_')}"] = max(h.get(key, 0.0) for h in history)
    method_stats = {
        k: v
        for k, v in (history[-1] if history else {}).items()
        if k.split("_")[0] in ("alpha", "pi", "swap", "expert")
    }
    if method_stats:
        row["last_epoch_method_stats"] = method_stats
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| method | teacher -> student | seed | epochs | test top-1 (last) | val top-1 (best) | published | minutes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        pair = f"{r['teacher']} -> {r['student']}" if r["teacher"] else r["student"]
        published = PUBLISHED.get(r["method"], "")
        lines.append(
            f"| {r['method']} | {pair} | {r['seed']} | {r['epochs']} | {100 * r['test_top1_last']:.2f} | "
            f"{100 * (r['val_top1_best'] or 0):.2f} | {published} | {r['seconds'] / 60:.1f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=None, help="override every recipe's epochs (cosine schedule)")
    parser.add_argument("--subset", type=float, default=None, help="data.subset share of train/test")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument(
        "--teacher-checkpoint", type=Path, default=None, help="a trained resnet32x4 for offline methods"
    )
    parser.add_argument("--work", type=Path, default=None, help="keep run folders here (default: a temp folder)")
    parser.add_argument("--smoke", action="store_true", help="1 epoch on a 2%% subset: checks the flow, not accuracy")
    args = parser.parse_args()
    if args.smoke:
        args.epochs, args.subset = args.epochs or 1, args.subset or 0.02
    if not args.data.exists():
        print(f"error: {args.data} not found (it ships in ../shared/data beside the checkout)", file=sys.stderr)
        return 2
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kdpipe-methods-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:
            teacher_ckpt = args.teacher_checkpoint
            for name in args.methods:
                recipe = RECIPES[name]
                row = run_one(name, pipeline(name, recipe, args, seed, teacher_ckpt), work)
                rows.append(row)
                print(json.dumps(row), flush=True)
                if teacher_ckpt is None and "teacher" in recipe and not recipe.get("online"):
                    # Later offline methods of this seed distil from the teacher this run trained.
                    teacher_ckpt = work / f"bench-{name}-s{seed}" / "teacher" / "model.safetensors"
    name = "methods_cifar_smoke" if args.smoke else "methods_cifar"
    payload = {
        "smoke": bool(args.smoke),
        "data": str(args.data),
        "subset": args.subset,
        "rows": rows,
        "published_top1": PUBLISHED,
        "table": markdown(rows),
    }
    path = write_result(name, payload)
    print(markdown(rows))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
