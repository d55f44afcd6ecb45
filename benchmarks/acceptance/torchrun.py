"""Part 5: ``kdpipe run`` under torchrun, and a process-group probe.

torchrun starts one process per GPU (at least one; two gloo processes in the CPU dry run). kdpipe joins the process
group of any torchrun job, a one-process one included (``kdpipe.distributed.launched_by_torchrun``: torchrun's
``TORCHELASTIC_RUN_ID``), so on a one-GPU machine the run itself checks the NCCL backend a cluster job will use; the
run's environment.json records ``distributed_backend`` and ``world_size``, and that record is what the target
checks. The probe (this script again, under torchrun) then runs an ``all_reduce`` on the same backend, which a
one-process kdpipe run never does (its collectives are no-ops for a world of one), and asks
``kdpipe.distributed`` what it sees."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from .context import Acceptance
from .core import SCRIPT, PartRecord

_JOINED = re.compile(r"joined (\w+) process group: rank (\d+) of (\d+)")
"""kdpipe.distributed's log line when a rank joins its group."""


def _read_json(path: Path) -> Any:
    """The JSON at ``path``, or None when the run did not write it."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def part_torchrun(acc: Acceptance, rec: PartRecord) -> None:
    """``kdpipe run`` under torchrun: its summary and the process group its environment.json records; then the
    process-group probe with the backend kdpipe picks (NCCL on CUDA, gloo on CPU)."""
    import torch

    nproc = max(1, torch.cuda.device_count()) if acc.cuda else 2
    backend = "nccl" if acc.cuda else "gloo"
    config = acc.pipeline_config(
        "torchrun", acc.teacher_and_distill() + "  verify:\n    type: verify\n    min_top1: 0.0\n"
    )
    run_dir = config.parent / "run"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    threads = {} if acc.cuda else {"OMP_NUM_THREADS": "1"}  # two ranks share the CPU: one thread each
    command = acc.run(
        [*launcher, "-m", "kdpipe", "run", str(config), "--out", str(run_dir), "--json"],
        timeout=180,
        name="torchrun",
        env=threads,
    )
    rec.results["run"] = command.describe()
    summary = _read_json(run_dir / "summary.json")
    run_env = _read_json(run_dir / "environment.json") or {}
    joined = _JOINED.search(command.stdout + command.stderr)
    recorded = run_env.get("distributed_backend")
    rec.results.update(
        nproc_per_node=nproc,
        summary_status=summary["status"] if summary else None,
        exit_code=summary["exit_code"] if summary else command.rc,
        stages={s["name"]: s["status"] for s in summary["stages"]} if summary else {},
        world_size=run_env.get("world_size"),
        distributed_backend=recorded,
        run_device=run_env.get("device"),
        kdpipe_process_group=joined.group(1) if joined else None,  # from the log, beside the record
    )
    rec.target(
        "torchrun_run_ok",
        value=summary["status"] if summary else None,
        threshold="ok",
        rule="summary.json status ok, exit 0",
        met=summary is not None and summary["status"] == "ok" and command.rc == 0,
    )
    rec.target(
        "kdpipe_backend",
        value={"distributed_backend": recorded, "world_size": run_env.get("world_size")},
        threshold={"distributed_backend": backend, "world_size": nproc},
        rule=f"the run's environment.json: kdpipe joined a {backend} process group of {nproc} process(es)",
        met=recorded == backend and run_env.get("world_size") == nproc,
        why=None if run_env else "the run wrote no environment.json",
    )

    probe_out = acc.work / "probe.json"
    probe = acc.run(
        [*launcher, str(SCRIPT), "--probe-process-group", backend, "--probe-out", str(probe_out)],
        timeout=120,
        name="probe",
        env=threads,
    )
    result = _read_json(probe_out)
    rec.results["probe"] = {**probe.describe(), **(result or {"error": probe.tail()})}
    rec.target(
        f"{backend}_all_reduce",
        value=result.get("all_reduce_ok") if result else None,
        threshold=True,
        rule=f"init_process_group({backend!r}) and all_reduce over {nproc} rank(s) give the sum",
        met=bool(result and result["all_reduce_ok"] and result["backend"] == backend),
    )
    rec.summary = (
        f"kdpipe run {rec.results['summary_status']} on {nproc} rank(s) (environment.json distributed_backend: "
        f"{recorded or 'none'}); probe {backend}: {'ok' if result and result['all_reduce_ok'] else 'failed'}"
    )
    command.check("torchrun kdpipe run")
    probe.check("the process-group probe")


def probe_process_group(backend: str, out: Path) -> int:
    """Under torchrun: join a ``backend`` group, all_reduce, and ask kdpipe what it sees; rank 0 writes ``out``."""
    import torch
    import torch.distributed as dist

    from kdpipe import distributed

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=60))
    try:
        values = torch.full((4,), float(rank + 1), device=device)
        dist.all_reduce(values)
        expected = size * (size + 1) / 2
        ok = bool(torch.all(values == expected))
        world = distributed.world()
        summed = float(distributed.all_reduce_sum(torch.ones(1)).item())
        record = {
            "backend": str(dist.get_backend()),
            "world_size": size,
            "all_reduce_ok": ok,
            "all_reduce_value": float(values[0]),
            "expected": expected,
            "kdpipe_world": dataclasses.asdict(world),
            "kdpipe_all_reduce_sum": summed,
            "device": str(device),
        }
        if rank == 0:
            out.write_text(json.dumps(record, indent=2), encoding="utf-8")
    finally:
        dist.destroy_process_group()
    return 0 if ok else 1
