"""Every KD method of kdpipe on real CIFAR-100, one recipe each: a thin wrapper over kd_table.py.

Each method runs the recipe file of ``examples/recipes/`` that reproduces its spec's protocol (the recipe's header
says which published number it targets and what kdpipe does differently), through the real pipeline:

- offline methods (ce, kd, dkd, fusion_ratio, dpk, iakd) on resnet32x4 -> resnet8x4: the CRD protocol (240 epochs,
  batch 64, SGD 0.05, x0.1 at 150/180/210, wd 5e-4); fusion_ratio with TGeo-KD's Table 7 settings (batch 128,
  lr 0.1) and a 10% validation split. A teacher is trained once per identical teacher config and reused, or given
  with --teacher-checkpoint.
- online pair (dml, switokd): wrn_16_2 teacher (lr 0.1) and mobilenetv2_x0_5_cifar student (lr 0.01) from scratch,
  SwitOKD's CIFAR-100 script (299 epochs, batch 128). Target: SwitOKD's student beats DML's (paper: 67.24 vs 66.23).
- ffsd: resnet32 leader with 2 common students (FFSD's code: nesterov SGD 0.1, wd 1e-4, 299 epochs, batch 128);
  ce_resnet32 is the vanilla resnet32 of the CRD table (71.14) beside it (FFSD README: leader 74.85).

These are GPU jobs (hours on a CPU). ``--smoke`` runs every recipe for one epoch on a 2% subset to check the whole
flow on a CPU; its numbers mean nothing and are written to methods_cifar_smoke.json/.md.

    python benchmarks/methods_cifar.py [--methods dml switokd] [--epochs N] [--seeds 0 1 2] [--smoke]
        [--teacher-checkpoint PATH] [--data-dir DIR] [--work DIR] [--device D] [--precision P]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import kd_table

RECIPES_DIR = Path(__file__).resolve().parents[1] / "examples" / "recipes"
METHOD_RECIPES = {
    "ce": "ce_resnet8x4.yaml",
    "kd": "kd_resnet32x4_resnet8x4.yaml",
    "dkd": "dkd_resnet32x4_resnet8x4.yaml",
    "fusion_ratio": "fusion_ratio_resnet32x4_resnet8x4.yaml",
    "dpk": "dpk_resnet32x4_resnet8x4.yaml",
    "iakd": "iakd_resnet32x4_resnet8x4.yaml",
    "dml": "dml_wrn_16_2_mobilenetv2_x0_5_cifar.yaml",
    "switokd": "switokd_wrn_16_2_mobilenetv2_x0_5_cifar.yaml",
    "ffsd": "ffsd_resnet32.yaml",
    "ce_resnet32": "ce_resnet32.yaml",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        epilog="Every other option goes to kd_table.py: --seeds, --epochs, --subset, --smoke, --work, --data-dir, "
        "--device, --precision, --set, --nproc, --quiet, --name (see python benchmarks/kd_table.py --help).",
    )
    parser.add_argument("--methods", nargs="+", default=list(METHOD_RECIPES), choices=list(METHOD_RECIPES))
    parser.add_argument(
        "--teacher-checkpoint", type=Path, default=None, help="a trained resnet32x4 for the offline methods"
    )
    args, rest = parser.parse_known_args(argv)
    recipes = [str(RECIPES_DIR / METHOD_RECIPES[m]) for m in args.methods]
    forwarded = [*recipes, *rest]
    if args.teacher_checkpoint is not None:
        forwarded += ["--teacher-checkpoint", f"resnet32x4={args.teacher_checkpoint}"]
    if "--name" not in rest:
        forwarded += ["--name", "methods_cifar_smoke" if "--smoke" in rest else "methods_cifar"]
    return kd_table.main(forwarded, prog="methods_cifar.py")


if __name__ == "__main__":
    sys.exit(main())
