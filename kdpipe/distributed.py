"""Data-parallel training under ``torchrun``: the process group, and the few collectives kdpipe needs.

``torchrun --nproc-per-node N -m kdpipe run stages.yaml`` starts N copies of ``kdpipe run``; torchrun sets
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` and the rendezvous variables, and :func:`init_from_env` joins the group
(NCCL on CUDA, one GPU per local rank; gloo on CPU). Without those variables everything here is a no-op for a
world of one, so single-process code paths call the same functions.

How a run is split (see ``kdpipe.pipeline.runner`` and ``kdpipe.distill.trainer``):
- rank 0 owns the run directory: the lock, events, results, checkpoints and models; the other ranks write nothing;
- training stages (teacher, distill) run on every rank; each global batch (``train.batch_size``, the same number
  whatever N is) is split into N contiguous shards, one per rank, after the whole batch is augmented with the
  batch's own seed, so N processes see exactly the samples and crops one process would;
- gradients are averaged over ranks before every optimizer step (:func:`average_gradients`);
- every other stage (verify, export, benchmark, card, serve) runs on rank 0 while the others wait.

Why gradients are averaged here rather than by wrapping networks in ``DistributedDataParallel``: KD methods own
several networks and optimizers, and the online ones (DML, SwitOKD, FFSD) run several backward passes per step on
different networks, which DDP's reducer does not allow without ``no_sync`` bookkeeping per method. One flattened
``all_reduce`` per optimizer step is what DDP computes, for any method, at the price of DDP's overlap of
communication with the backward pass.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kdpipe.errors import ConfigError

log = logging.getLogger(__name__)

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank, number of processes, rank on this node, backend."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """The current process group, or a world of one when none was started."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(
        rank=dist.get_rank(),
        size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        backend=str(dist.get_backend()),
    )


def launched_by_torchrun() -> bool:
    """Started by torchrun (its ``TORCHELASTIC_RUN_ID``), with any number of processes, or in a multi-process job
    another launcher describes with ``WORLD_SIZE``. A one-process torchrun job joins its process group too (NCCL on a
    GPU), so the collective backend a cluster job will use is the one a one-GPU run checks."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str = "auto", *, timeout_s: float = 1800.0) -> World:
    """Join the process group torchrun describes in the environment (no-op for a single process).

    ``device`` is the run's ``device`` setting: "cpu" forces gloo; "auto"/"cuda" use NCCL with one GPU per local rank
    when CUDA is available. Refuses a job with more local ranks than GPUs, which would put two ranks on one GPU.
    """
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return world()
    missing = [name for name in ENV_VARS if name not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE is set but {', '.join(missing)} is not: kdpipe joins a process group only as torchrun "
            "starts it",
            hint="launch with: torchrun --nproc-per-node N -m kdpipe run stages.yaml",
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}",
                hint="set --nproc-per-node to at most the number of GPUs",
            )
        torch.cuda.set_device(local_rank)
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    current = world()
    log.info("joined %s process group: rank %d of %d", backend, current.rank, current.size)
    return current


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world().enabled:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (picklable objects; small ones: plans, flags)."""
    if not world().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _comm_device(tensor: torch.Tensor) -> torch.device:
    """Where a collective's buffer must live: NCCL reduces CUDA tensors (this rank's GPU), gloo CPU ones."""
    if world().backend == "nccl":
        return tensor.device if tensor.is_cuda else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of ``values`` over ranks (a new tensor on ``values``' device)."""
    if not world().enabled:
        return values.clone()
    buffer = values.detach().to(_comm_device(values), copy=True)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.to(values.device)


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (e.g. a stop signal that reached one process first)."""
    if not world().enabled:
        return flag
    return bool(all_reduce_sum(torch.tensor([1.0 if flag else 0.0])).item() > 0)


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Replace every ``.grad`` of ``params`` by its mean over ranks: one all_reduce per dtype and device.

    A parameter that has no gradient on this rank contributes zeros, so ranks never disagree on what is reduced
    (a method that skips a network on one rank still takes part in the collective).
    """
    current = world()
    if not current.enabled:
        return
    groups: dict[tuple[torch.dtype, torch.device], list[nn.Parameter]] = {}
    for p in params:
        if p.requires_grad:
            groups.setdefault((p.dtype, p.device), []).append(p)
    for (_, device), members in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in members]).to(
            _comm_device(members[0])
        )
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat = flat.to(device).div_(current.size)
        offset = 0
        for p in members:
            n = p.numel()
            grad = flat[offset : offset + n].view_as(p)
            if p.grad is None:
                p.grad = grad.clone()
            else:
                p.grad.copy_(grad)
            offset += n


def broadcast_state(module: nn.Module, src: int = 0) -> None:
    """Copy every parameter and buffer of ``module`` from rank ``src`` (BatchNorm statistics, method state)."""
    if not world().enabled:
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            buffer = tensor.detach().to(_comm_device(tensor), copy=True)
            dist.broadcast(buffer, src=src)
            tensor.copy_(buffer.to(tensor.device))
