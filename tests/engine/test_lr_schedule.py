"""Tests for the warm-up / step / plateau learning-rate schedule."""
from __future__ import annotations

import pytest
import torch

from detres.engine.lr_schedule import LRSchedule


def _opt():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


def test_plateau_divides_by_ten_after_patience():
    sched = LRSchedule(_opt(), base_lr=0.1, mode="plateau", patience=2, threshold=0.01)
    errors = [0.9, 0.8, 0.795, 0.80, 0.7, 0.71, 0.705]
    drops = [sched.observe_validation(e) for e in errors]
    # 0.795 is not 0.01 better than 0.8 (bad 1), 0.80 (bad 2 -> drop), 0.7 improves, 0.71, 0.705 -> drop
    assert drops == [False, False, False, True, False, False, True]
    assert sched.apply(100) == pytest.approx(0.001)


def test_step_schedule_and_warmup():
    opt = _opt()
    sched = LRSchedule(opt, base_lr=0.1, mode="step", steps=[10, 20], warmup_iters=3, warmup_lr=0.01)
    lrs = [sched.apply(i) for i in (0, 2, 3, 9, 10, 19, 20, 1000)]
    assert lrs == pytest.approx([0.01, 0.01, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.001)
    sched.observe_validation(0.5)
    sched.observe_validation(0.6)
    sched.observe_validation(0.7)
    assert sched.lr_at(5) == pytest.approx(0.1)  # plateaus never change a step schedule


def test_state_dict_round_trip_and_min_lr():
    a = LRSchedule(_opt(), base_lr=0.1, patience=1, min_lr=0.005)
    for e in (0.5, 0.6, 0.7):
        a.observe_validation(e)
    b = LRSchedule(_opt(), base_lr=0.1, patience=1, min_lr=0.005)
    b.load_state_dict(a.state_dict())
    assert b.lr_at(0) == a.lr_at(0) == pytest.approx(0.005)
    with pytest.raises(ValueError, match="lr_schedule"):
        LRSchedule(_opt(), base_lr=0.1, mode="cosine")
