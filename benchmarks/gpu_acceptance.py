"""GPU acceptance (issue 21): every CUDA and TensorRT code path of kdpipe, run once, in one prepared command.

A GPU machine is lent rarely and for minutes, so this script is the whole check: one command that finishes inside
``--budget-s`` (default 480 s; parts that would start after it are recorded as skipped, "time budget"), and a
``--dry-run`` that runs the same code on CPU here, skipping only what needs CUDA, so the GPU run does not die on a
typo. Every part is timed and wrapped: it ends ok, failed (with the error), or skipped (with the reason), and the
parts after it run either way. The result is one JSON (``write_result`` of benchmarks/_common.py: environment,
versions, commit) and one Markdown file beside it. This file is the command line; the parts are in the package
benchmarks/acceptance/ (one module per part or pair of parts; its ``__init__`` lists them). Calibration and parity
images are drawn as kdpipe's export stage draws them (seeded random draws over the whole, class-sorted split).

Parts, in order, and what each records:

1. ``wheels``: with ``--wheels DIR``, ``pip install --no-index --no-deps --target <work>/site DIR/*.whl`` (no
   network, no resolver: the folder must hold every missing distribution), then that folder and the checkout's root go
   first on ``sys.path`` and on ``PYTHONPATH`` for every subprocess. kdpipe itself is used from the checkout that way,
   not installed: an install would need setuptools' build step and would write into the machine's environment, while
   ``python -m kdpipe`` works from ``PYTHONPATH`` alone. Records the wheels installed and which of torch,
   torchvision, timm, numpy, onnx, onnxruntime (and its execution providers), onnxslim, pydantic, tritonclient,
   modelopt, tensorrt and kdpipe import, with versions and where from. kdpipe not importing (pydantic missing) stops
   the run: every later part needs it.
2. ``environment``: ``describe_environment`` through ``_common.environment()`` (versions, CPU, GPU, commit) plus the
   CUDA facts (capability, memory, cuDNN, NCCL, bf16 support).
3. ``methods``: every registered KD method (``kdpipe.registry.METHODS``) x precision (GPU: bf16 and fp16; dry run:
   fp32 and bf16 on CPU, fp16 skipped) trains 3 steps through kdpipe's own ``Trainer.fit`` on a ``BatchLoader`` whose
   split is already on the device (a slice of the resident train split, augmentation on the device), with the
   ``MethodContext`` the distill stage builds (a validation split for fusion_ratio). Per cell: steps, the train loss
   and whether it is finite, eval top-1, seconds, peak CUDA memory.
4. ``throughput``: ``benchmarks/train_throughput.py`` as a subprocess: resnet32x4 -> resnet8x4, batch 512, bf16, kdpipe
   and the plain loop, images/s and ``max_memory_allocated`` against the 30,000 images/s target; then the same with
   ``--compile`` and with ``--compile --compile-mode reduce-overhead`` (CUDA graphs), each only while enough of the
   budget is left for the parts after it. Dry run: ``--smoke`` on CPU; the compiled variants and the target need
   CUDA (inductor's C++ build of four networks takes minutes on 2 cores and times nothing useful).
5. ``torchrun``: ``python -m torch.distributed.run --standalone --nproc-per-node N -m kdpipe run <tiny stages.yaml>``
   (teacher, distill, verify; N = the GPUs, at least 1; 2 gloo processes on the CPU dry run) and the run's
   summary.json and environment.json. kdpipe joins the process group of any torchrun job, a one-process one too, so
   on a one-GPU machine the run itself uses NCCL: the target is environment.json's ``distributed_backend`` ("nccl"
   on CUDA, "gloo" in the dry run) and ``world_size`` (N); the "joined <backend> process group" log line is recorded
   beside them. Then a process-group probe (this script under torchrun: ``init_process_group`` with that backend,
   an ``all_reduce``, which a one-process kdpipe run never issues, and kdpipe's own ``distributed.world()`` /
   ``all_reduce_sum``).
6. ``onnxruntime_cuda``: a student trained a few epochs (kdpipe's Trainer, CE) is exported with
   ``kdpipe.exports.export_onnx`` and run on onnxruntime's CUDAExecutionProvider against PyTorch (CPU, fp32, as the
   export stage compares) on real test images: ``measure_parity`` (max |diff|, agreement, top-1) against the onnx
   format's default gates, and ``run_benchmark`` (onnxruntime backend on CUDA). Skipped, with the reason, where the
   provider is absent (the machine's onnxruntime is the CPU build unless onnxruntime-gpu wheels are carried); the
   dry run runs the same code on CPUExecutionProvider as a stand-in and records it.
7. ``tensorrt``: the fp16 graph (``convert_fp16``), the int8 QDQ graph (``quantize_int8(activation_type="int8")``)
   and, when nvidia-modelopt imports, a ``qad`` stage's ``model.qdq.onnx`` (ModelOpt's signed QDQ graph, the one an
   export stage builds TensorRT engines from; ``kdpipe run`` of teacher, distill and qad) are checked with
   ``check_onnx_for_tensorrt``; where tensorrt imports and CUDA is there, each becomes an engine with
   ``build_engine`` (stamp ``<engine>.plan.json`` checked), is parity-checked on test images (fp16/int8 against
   PyTorch with the gates the export stage gives an engine of that precision, ``TensorRTFormat.parity_defaults``:
   fp16's for fp16, onnx-int8's for int8; the qad engine against onnxruntime running its own graph), benchmarked
   with ``run_benchmark`` (backend "tensorrt"; a target checks that every batch inside the engine's profile was timed
   with CUDA events, ``timer == "cuda-events"``, as DESIGN.md §6 asks) and once through ``kdpipe bench
   <engine>.plan``. Skipped with the reason otherwise; the graphs, the checks and a ``kdpipe bench`` of the int8
   graph still run as the stand-in.
8. ``gpu_tests``: ``pytest -m "gpu or tensorrt" --require-gpu`` (tests/conftest.py: a gpu/tensorrt test that cannot
   run fails with the reason instead of being skipped); without tensorrt the tensorrt-marked tests are deselected
   and said so. Counts and every failure and skip with its reason come from the JUnit XML. Dry run: the same
   selection without the switch (everything skips on CPU).

``--dry-run`` forces the CPU (``CUDA_VISIBLE_DEVICES=""`` for this process and its subprocesses), small networks
(resnet20 -> resnet8) and tiny sizes, and scikit-learn's digits unless ``--data`` names CIFAR (then a 2% subset);
about a minute on 2 cores (one thread, ``--threads``). Without ``--dry-run`` a machine without CUDA is refused (after
the wheels part, which must come before torch is imported).

On the lent GPU machine (Python 3.12, torch 2.11 with CUDA, timm, onnx, onnxruntime CPU build; no pydantic, onnxslim,
tritonclient, nvidia-modelopt or tensorrt; no network). Prepare here, in the checkout (``.whl/`` and ``data/`` are
git-ignored; one call carries at most 64 MiB, so one CIFAR archive, not both)::

    mkdir -p data && cp ../shared/data/cifar10-jpg.tar.gz data/
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \\
        pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.8.0 typing-inspection==0.4.5 \\
        typing-extensions==4.16.0 onnxslim==0.1.98 tritonclient==2.73.0 python-rapidjson==1.25 \\
        nvidia-modelopt==0.47.0 omegaconf==2.4.0 pulp==3.3.2
    du -sh .whl data   # about 23 MB of wheels (16 of them pulp's) and 20 MB of CIFAR-10: under the 64 MiB

(the machine has the other dependencies: colorama, ml-dtypes and sympy for onnxslim, grpcio for tritonclient, ninja,
nvidia-ml-py, regex and scipy for nvidia-modelopt; tensorrt and onnxruntime-gpu are hundreds of MB and stay behind,
so the TensorRT and onnxruntime-CUDA parts record why they were skipped), then one device call with
``carry: [".whl", "data"]`` and ``timeout_s: 600``::

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_acceptance.py --data data --wheels .whl \\
        --out $OUT/gpu_acceptance_cuda.json 2>&1 | tee $OUT/gpu_acceptance.log

(add ``--parts methods,torchrun`` to rerun a selection). Here: ``python benchmarks/gpu_acceptance.py --dry-run``
writes benchmarks/results/gpu_acceptance_dryrun.json and .md; ``--dry-run --data ../shared/data`` rehearses on CIFAR.
Exit code: 0 when no part failed and no measured target was missed, 4 when only targets were missed, 1 when a part
failed, 2 for bad arguments or no CUDA without ``--dry-run``. The default budget fits one lease: the compiled
throughput runs only start while ``--reserve-s`` (200 s) is left for the parts after them; a second call with
``--parts throughput --budget-s 400`` measures what the first skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

from _common import RESULTS
from acceptance.context import Acceptance
from acceptance.core import PARTS, REPO
from acceptance.parts import run_part
from acceptance.report import all_targets, write_reports
from acceptance.torchrun import probe_process_group


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="digits | a CIFAR .tar.gz or ImageFolder folder | a folder holding them")
    parser.add_argument("--wheels", type=Path, help="folder of .whl files to install (no index, no deps) first")
    parser.add_argument("--out", type=Path, help="the JSON (the .md goes beside it); default benchmarks/results/")
    parser.add_argument("--budget-s", type=float, default=480.0, help="no part starts after this (default 480)")
    parser.add_argument(
        "--reserve-s",
        type=float,
        default=200.0,
        help="budget the compiled throughput runs leave for the parts after them (default 200)",
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU only, tiny sizes; skips what needs CUDA")
    parser.add_argument("--parts", help=f"comma-separated among {', '.join(PARTS[2:])} (wheels, environment always)")
    parser.add_argument("--teacher", help="teacher model (default resnet32x4 on GPU, resnet20 in a dry run)")
    parser.add_argument("--student", help="student model (default resnet8x4 on GPU, resnet8 in a dry run)")
    parser.add_argument("--work", type=Path, help="keep the work folder here (default: a temporary one, removed)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of a dry run, here and in its subprocesses (default 1: predictable on a shared machine)",
    )
    parser.add_argument("--probe-process-group", choices=["nccl", "gloo"], help=argparse.SUPPRESS)
    parser.add_argument("--probe-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.parts:
        args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
        unknown = [p for p in args.parts if p not in PARTS]
        if unknown:
            parser.error(f"--parts: unknown {', '.join(unknown)}; choose among {', '.join(PARTS)}")
    if args.budget_s <= 0:
        parser.error("--budget-s must be > 0")
    if args.wheels is not None and not args.wheels.is_dir():
        parser.error(f"--wheels {args.wheels}: not a folder")
    if args.threads is None:
        args.threads = 1
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.out is None:
        args.out = RESULTS / f"gpu_acceptance_{'dryrun' if args.dry_run else 'cuda'}.json"
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.probe_process_group:
        return probe_process_group(args.probe_process_group, args.probe_out)
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported: this process sees no GPU either
    with contextlib.ExitStack() as stack:
        if args.work is not None:
            args.work.mkdir(parents=True, exist_ok=True)
            work = args.work.resolve()
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kdpipe-acceptance-")))
        acc = Acceptance(args, work)
        print(f"kdpipe GPU acceptance{' (dry run)' if acc.dry_run else ''}: data {acc.data.label}, work {work}")
        # The wheels first, before anything imports torch: a carried typing_extensions must be the one loaded.
        run_part(acc, PARTS[0])
        import torch

        if args.dry_run:
            torch.set_num_threads(args.threads)
        elif not torch.cuda.is_available():
            print("no CUDA device here: run with --dry-run on a CPU machine", file=sys.stderr)
            return 2
        for name in PARTS[1:]:
            run_part(acc, name)
        json_path, md_path = write_reports(acc, [str(Path(__file__).relative_to(REPO)), *argv])
    print(md_path.read_text(encoding="utf-8").split("\n## ", 1)[0])
    print(f"wrote {json_path} and {md_path}")
    if any(r.status == "failed" for r in acc.records.values()):
        return 1
    if any(t["met"] is False for t in all_targets(acc.records).values()):
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
