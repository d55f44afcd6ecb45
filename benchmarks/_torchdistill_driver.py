"""Times torchdistill's own KD training loop, epoch by epoch, for benchmarks/vs_torchdistill.py.

Runs in a virtualenv that has torchdistill (not kdpipe's). It builds everything through torchdistill's public API as
its image-classification example does: the YAML config (its tags instantiate the datasets), the models from its
registry, a DistillationBox, and per step ``forward_process`` then ``post_forward_process`` (backward, optimizer step)
with the loss read back as the example's logger does. Only the training loop of each epoch is timed.

    python _torchdistill_driver.py --config td.yaml --threads 2 --out times.json
"""

from __future__ import annotations

import argparse
import json
import time
from importlib.metadata import version

import torch
from torchdistill.common import yaml_util
from torchdistill.core.distillation import get_distillation_box
from torchdistill.models.registry import get_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = yaml_util.load_yaml_file(args.config)
    device = torch.device("cpu")
    models = config["models"]
    teacher = get_model(models["teacher_model"]["key"], None, **models["teacher_model"]["kwargs"]).to(device)
    student = get_model(models["student_model"]["key"], None, **models["student_model"]["kwargs"]).to(device)
    box = get_distillation_box(teacher, student, config["datasets"], config["train"], device, None, False, 1)
    times = []
    for epoch in range(box.num_epochs):
        box.pre_epoch_process(epoch=epoch)
        start = time.perf_counter()
        for sample_batch, targets, supp_dict in box.train_data_loader:
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss=loss)
            loss.item()  # the example logs every step's loss
        times.append(time.perf_counter() - start)
        box.post_epoch_process()
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump({"epoch_seconds": times, "version": version("torchdistill"), "torch": torch.__version__}, fh)


if __name__ == "__main__":
    main()
