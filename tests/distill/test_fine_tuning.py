"""Fine-tuning settings for pretrained networks: a backbone lr scale, timm's layer-wise lr decay and a frozen
backbone for the first epochs, on the real digits data through kdpipe's Trainer."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from kdpipe.config import TrainConfig
from kdpipe.distill.methods import create_method
from kdpipe.distill.methods.ce import CEParams
from kdpipe.distill.trainer import Trainer, classifier_parameters, fine_tuning_groups
from kdpipe.models.factory import create_model
from tests.distill.conftest import DigitsRun, loaders


def _config(**fields: object) -> TrainConfig:
    return TrainConfig.model_validate({"epochs": 1, "lr": 0.1, "schedule": {"name": "constant"}, **fields})


def _trainer(model: nn.Module, digits: DigitsRun, tmp_path: Path, **fields: object) -> Trainer:
    train, test = loaders(digits.splits, 64)
    method = create_method(CEParams(), model, None)
    return Trainer(
        method,
        _config(**fields),
        train_batches=train,
        eval_batches=test,
        num_classes=10,
        device=torch.device("cpu"),
        checkpoint_path=tmp_path / "last.pt",
        fingerprint="fine-tuning",
    )


def _scales(optimizer: torch.optim.Optimizer) -> dict[int, float]:
    return {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}


def test_defaults_keep_one_group() -> None:
    model = create_model("resnet8", num_classes=10)
    params = list(model.parameters())
    assert fine_tuning_groups(params, model, _config()) == [{"params": params}]


def test_backbone_lr_scale_spares_the_head_and_the_method_s_modules(digits: DigitsRun, tmp_path: Path) -> None:
    model = digits.student()
    trainer = _trainer(model, digits, tmp_path, backbone_lr_scale=0.1)
    assert trainer.optimizer is not None
    lr = _scales(trainer.optimizer)
    head = {id(p) for p in classifier_parameters(model)}
    assert head and all(lr[i] == pytest.approx(0.1) for i in head)
    assert all(lr[id(p)] == pytest.approx(0.01) for p in model.parameters() if id(p) not in head)
    adapter = nn.Linear(4, 4)  # a method's extra module: full lr
    groups = fine_tuning_groups([*model.parameters(), *adapter.parameters()], model, _config(backbone_lr_scale=0.1))
    assert [g["lr_scale"] for g in groups if any(p is adapter.weight for p in g["params"])] == [1.0]


def test_layer_decay_is_timm_s(tmp_path: Path) -> None:
    model = timm.create_model("convnext_atto", num_classes=10)
    cfg = _config(optimizer="adamw", weight_decay=0.05, layer_decay=0.7, backbone_lr_scale=0.5)
    ours = {id(p): g for g in fine_tuning_groups(list(model.parameters()), model, cfg) for p in g["params"]}
    timm_groups = timm.optim.param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.7)
    head = {id(p) for p in classifier_parameters(model)}
    for group in timm_groups:
        for p in group["params"]:
            expected = group["lr_scale"] * (1.0 if id(p) in head else 0.5)
            assert ours[id(p)]["lr_scale"] == pytest.approx(expected)
            assert ours[id(p)]["weight_decay"] == group["weight_decay"]
    scales = sorted({round(g["lr_scale"], 6) for g in ours.values()})
    assert len(scales) > 3 and scales[-1] == 1.0  # the head at full lr, the stem decayed the most


def test_frozen_backbone_trains_only_the_head_then_everything(digits: DigitsRun, tmp_path: Path) -> None:
    model = digits.student()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    _trainer(model, digits, tmp_path / "a", epochs=1, freeze_backbone_epochs=1).fit()
    after = model.state_dict()
    assert not torch.equal(after["fc.weight"], start["fc.weight"])
    # conv and BN affine weights untouched (BN running statistics still follow the data, as in any frozen fine-tune)
    assert torch.equal(after["conv1.weight"], start["conv1.weight"])
    assert torch.equal(after["layer3.0.bn2.weight"], start["layer3.0.bn2.weight"])

    model = digits.student()
    _trainer(model, digits, tmp_path / "b", epochs=2, freeze_backbone_epochs=1).fit()
    assert not torch.equal(model.state_dict()["conv1.weight"], start["conv1.weight"])
    assert all(p.requires_grad for p in model.parameters())
