"""Trains a BatchNorm-free net on digits with kdpipe's Trainer, as one process or as a rank of a torchrun job, and
saves the final weights (rank 0). ``test_ddp.py`` runs it both ways: with no BatchNorm, data parallelism must give
the single-process weights up to float summation order.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/pipeline/ddp_worker.py OUT.pt
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from kdpipe import distributed
from kdpipe.config import DataConfig, TrainConfig
from kdpipe.data import BatchLoader, create_splits
from kdpipe.distill.methods import create_method
from kdpipe.distill.methods.ce import CEParams
from kdpipe.distill.trainer import Trainer

GLOBAL_BATCH = 64


def train(out: Path, cache: Path) -> dict[str, torch.Tensor]:
    world = distributed.world()
    cfg = DataConfig.model_validate({"kind": "digits", "image_size": 8, "augment": "crop", "cache_dir": str(cache)})
    splits = create_splits(cfg, seed=0, base_dir=cache)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    common = {"mean": splits.mean, "std": splits.std}
    train_batches = BatchLoader(
        splits.train, batch_size=GLOBAL_BATCH, train=True, augment="crop", seed=0, rank=world.rank,
        world_size=world.size, **common,
    )  # fmt: skip
    eval_batches = BatchLoader(splits.val, batch_size=256, train=False, **common)
    trainer = Trainer(
        create_method(CEParams(), net, None),
        TrainConfig.model_validate({"epochs": 2, "batch_size": GLOBAL_BATCH, "lr": 0.1}),
        train_batches=train_batches,
        eval_batches=eval_batches,
        num_classes=10,
        device=torch.device("cpu"),
        checkpoint_path=out.with_suffix(".ckpt"),
        fingerprint="ddp-worker",
    )
    result = trainer.fit()
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    if world.is_main:
        torch.save({"state": state, "history": result.history}, out)
    return state


if __name__ == "__main__":
    distributed.init_from_env("cpu")
    try:
        target = Path(sys.argv[1])
        train(target, target.parent / "cache")
    finally:
        distributed.shutdown()
