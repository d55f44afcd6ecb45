"""EpochStats, the one accumulator of the methods' per-epoch statistics: sums stay on the device and in the
state_dict, so a run resumed mid-epoch reports that epoch as an uninterrupted run would."""

from __future__ import annotations

import torch

from kdpipe.distill.stats import EpochStats


def test_sums_survive_a_mid_epoch_resume_and_reset_at_the_next_epoch() -> None:
    stats = EpochStats({"steps": (), "per_pair": (2, 3)})
    stats.begin(4)
    stats.add("steps", 1.0)
    stats.add("per_pair", [[1.0, 0.0, 2.0], [0.0, 1.0, 0.5]])
    stats.add("per_pair", torch.ones(2, 3))
    stats.collect("alpha", torch.tensor([0.2, 0.4]))

    resumed = EpochStats({"steps": (), "per_pair": (2, 3)})
    resumed.load_state_dict(stats.state_dict())  # what a checkpoint taken mid-epoch carries
    resumed.begin(4)  # the same epoch: keep
    assert float(resumed.total("steps")) == 1.0
    assert resumed.total("per_pair").tolist() == [[2.0, 1.0, 3.0], [1.0, 2.0, 1.5]]
    assert resumed.total("per_pair").dtype == torch.float64
    assert resumed.collected("alpha") == []  # distributions are per process, not checkpointed
    assert set(stats.state_dict()) == {"sum_steps", "sum_per_pair", "epoch_of"}

    resumed.begin(5)  # a new epoch: zero
    assert float(resumed.total("steps")) == 0.0 and not resumed.total("per_pair").any()
