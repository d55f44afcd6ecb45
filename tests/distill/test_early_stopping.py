"""train.early_stopping: stop after `patience` evaluations without a gain, end with the best evaluation's weights,
resume to the same epoch and weights, and never decide on the test split."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from kdpipe.config import EarlyStoppingConfig, load_config
from kdpipe.distill import trainer as trainer_module
from kdpipe.distill.early_stopping import EarlyStopping
from kdpipe.distill.methods import create_method
from kdpipe.distill.methods.ce import CEParams
from kdpipe.distill.trainer import TrainResult
from kdpipe.errors import ConfigError, Interrupted
from kdpipe.pipeline.runner import preflight
from tests.conftest import TINY
from tests.distill.conftest import DigitsRun, fit, loaders

# The eval top-1 a run "sees" after each epoch: best after epoch 2, then 2 evaluations without a gain > 0.01.
SCRIPT = [0.50, 0.70, 0.705, 0.60, 0.90, 0.95]


def test_update_counts_evaluations_without_a_gain_and_restores_the_best() -> None:
    net = nn.Linear(2, 2)
    stopper = EarlyStopping(EarlyStoppingConfig(patience=2, min_delta=0.01), net)
    weights = []
    for epoch, top1 in enumerate(SCRIPT[:4], start=1):
        with torch.no_grad():
            net.weight.fill_(float(epoch))
        weights.append(net.weight.detach().clone())
        stop = stopper.update(top1, epoch)
        assert stop == (epoch == 4), epoch  # 0.705 is no gain over 0.70 with min_delta 0.01
    assert (stopper.best, stopper.best_epoch, stopper.stopped_epoch) == (0.70, 2, 4)
    assert stopper.finish() and torch.equal(net.weight, weights[1])

    restored = EarlyStopping(EarlyStoppingConfig(patience=2), nn.Linear(2, 2))
    restored.load_state_dict(stopper.state_dict())
    assert (restored.best, restored.best_epoch, restored.stopped_epoch) == (0.70, 2, 4)
    assert restored.finish() and torch.equal(restored.network.weight, weights[1])
    keep_last = EarlyStopping(EarlyStoppingConfig(patience=1, restore_best=False), net)
    keep_last.update(0.5, 1), keep_last.update(0.4, 2)
    assert not keep_last.finish()


def test_misses_before_start_epoch_do_not_count() -> None:
    """SCRIPT's misses after epochs 3 and 4 fall before start_epoch 4 (the last lr decay, say): only the miss after
    epoch 5 onwards counts, and a gain after the start resets the count as usual."""
    stopper = EarlyStopping(EarlyStoppingConfig(patience=2, min_delta=0.01, start_epoch=4), nn.Linear(2, 2))
    stops = [stopper.update(top1, epoch) for epoch, top1 in enumerate([0.50, 0.70, 0.60, 0.60, 0.65, 0.66], 1)]
    assert stops == [False] * 5 + [True] and stopper.stopped_epoch == 6 and stopper.best_epoch == 2
    counting = EarlyStopping(EarlyStoppingConfig(patience=2, min_delta=0.01), nn.Linear(2, 2))
    assert [counting.update(top1, epoch) for epoch, top1 in enumerate([0.50, 0.70, 0.60, 0.60], 1)][-1]


@pytest.fixture
def scripted_eval(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The trainer's evaluations are real, but report SCRIPT's top-1 in order; yields the call counter."""
    real = trainer_module.evaluate
    calls = [0]

    def scripted(model: nn.Module, batches: object, num_classes: int) -> object:
        ev = real(model, batches, num_classes)
        top1 = SCRIPT[calls[0]] if calls[0] < len(SCRIPT) else ev.top1
        calls[0] += 1
        return dataclasses.replace(ev, top1=top1)

    monkeypatch.setattr(trainer_module, "evaluate", scripted)
    yield calls


def _train(
    digits: DigitsRun, work: Path, *, early: dict[str, object] | None, stop_after_steps: int | None = None
) -> tuple[nn.Module, TrainResult]:
    student = digits.student(seed=0)
    method = create_method(CEParams(), student, None, digits.context())
    torch.manual_seed(0)
    result = fit(method, digits.splits, work, epochs=8, early_stopping=early, stop_after_steps=stop_after_steps)
    return student, result


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_digits_run_stops_and_keeps_the_best_epochs_weights(
    digits: DigitsRun, tmp_path: Path, scripted_eval: list[int]
) -> None:
    student, result = _train(digits, tmp_path / "early", early={"patience": 2, "min_delta": 0.01})
    assert result.stopped_early == 4 and len(result.history) == 4
    assert result.history[-1].get("early_stop") == 1.0

    # The same run cut by a signal at the end of epoch 2's training holds the weights of epoch 2.
    steps_per_epoch = len(loaders(digits.splits, 64)[0])
    at_epoch_2 = tmp_path / "reference"
    with pytest.raises(Interrupted):
        _train(digits, at_epoch_2, early=None, stop_after_steps=2 * steps_per_epoch)
    reference = digits.student(seed=0)
    state = torch.load(at_epoch_2 / "last.pt", weights_only=True)["method"]
    reference.load_state_dict({k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")})
    assert _same(student, reference), "early stopping did not restore epoch 2's weights"


def test_resumed_run_stops_at_the_same_epoch_with_the_same_weights(
    digits: DigitsRun, tmp_path: Path, scripted_eval: list[int]
) -> None:
    early = {"patience": 2, "min_delta": 0.01}
    whole, whole_result = _train(digits, tmp_path / "whole", early=early)
    scripted_eval[0] = 0
    steps_per_epoch = len(loaders(digits.splits, 64)[0])
    with pytest.raises(Interrupted):  # killed mid-epoch 3, after the best evaluation (epoch 2)
        _train(digits, tmp_path / "cut", early=early, stop_after_steps=2 * steps_per_epoch + 3)
    resumed, resumed_result = _train(digits, tmp_path / "cut", early=early)
    assert resumed_result.resumed_from == 2 and resumed_result.stopped_early == whole_result.stopped_early == 4
    assert _same(resumed, whole)
    # Killed after it stopped but before the stage finished: the rerun trains nothing and ends the same.
    again, again_result = _train(digits, tmp_path / "cut", early=early)
    assert again_result.stopped_early == 4 and again_result.resumed_from == 4 and _same(again, whole)


def test_early_stopping_on_the_test_split_is_refused(write_config) -> None:  # type: ignore[no-untyped-def]
    text = TINY.replace(
        "train: {epochs: 2, batch_size: 32, lr: 0.05}}", "train: {epochs: 2, early_stopping: {patience: 3}}}"
    )
    assert "early_stopping" in text  # TINY has data.val_fraction 0
    with pytest.raises(ConfigError) as info:
        preflight(load_config(write_config(text)))
    assert "stages.teacher.weights.train.early_stopping" in info.value.message
    assert "data.val_fraction" in (info.value.hint or "")
    ok = text.replace("val_fraction: 0.0", "val_fraction: 0.2")
    preflight(load_config(write_config(ok, name="ok.yaml")))
