"""Tests for the warm-up / step / plateau learning-rate schedule."""

from __future__ import annotations

import pytest
import torch

from detres.engine.lr_schedule import LRSchedule, epochs_to_iters


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


def test_plateau_cannot_drop_before_the_minimum_even_when_the_error_stalls():
    # Validation every 1000 iterations, patience 2, at least 5000 iterations since the start / last drop.
    sched = LRSchedule(_opt(), base_lr=0.1, mode="plateau", patience=2, threshold=0.01, min_iters_between_drops=5000)
    lrs = {}
    drops = []
    for it in range(1000, 13001, 1000):
        if sched.observe_validation(0.5, iteration=it):  # stalled from the first evaluation on
            drops.append(it)
        lrs[it] = sched.apply(it)
    # Without the minimum: drops at 3000, 5000, 7000, ... (2 bad evaluations each). With it: the stall
    # keeps counting and the drop comes at the first evaluation 5000 iterations past the start / last drop.
    assert drops == [5000, 10000]
    assert [lrs[it] for it in (4000, 5000, 9000, 10000, 13000)] == pytest.approx([0.1, 0.01, 0.01, 0.001, 0.001])
    assert sched.last_drop_iter == 10000
    free = LRSchedule(_opt(), base_lr=0.1, mode="plateau", patience=2, threshold=0.01)
    assert [it for it in range(1000, 8001, 1000) if free.observe_validation(0.5, iteration=it)] == [3000, 5000, 7000]


def test_plateau_minimum_counts_from_the_last_drop_and_improvements_still_reset():
    sched = LRSchedule(_opt(), base_lr=0.1, patience=2, threshold=0.01, min_iters_between_drops=3000)
    errors = {1000: 0.9, 2000: 0.9, 3000: 0.9, 4000: 0.9, 5000: 0.8, 6000: 0.8, 7000: 0.8, 8000: 0.8}
    drops = [it for it, e in errors.items() if sched.observe_validation(e, iteration=it)]
    # 2000, 3000 bad -> 3000 - 0 >= 3000: drop; 5000 improves; 6000, 7000 bad but 7000 - 3000 >= 3000: drop.
    assert drops == [3000, 7000]
    no_min = LRSchedule(_opt(), base_lr=0.1, patience=2, threshold=0.01)
    assert [it for it, e in errors.items() if no_min.observe_validation(e, iteration=it)] == [3000, 7000]
    # Minimum 4500: the stall at 3000/4000 is blocked, then 5000 improves (0.8 < 0.9 - 0.01) and
    # resets it, so there is no drop at 5000; the next stall drops at 7000.
    blocked = LRSchedule(_opt(), base_lr=0.1, patience=2, threshold=0.01, min_iters_between_drops=4500)
    assert [it for it, e in errors.items() if blocked.observe_validation(e, iteration=it)] == [7000]


def test_plateau_minimum_survives_resume_and_needs_the_iteration():
    a = LRSchedule(_opt(), base_lr=0.1, patience=1, min_iters_between_drops=2000)
    assert [a.observe_validation(0.5, iteration=it) for it in (1000, 2000, 3000)] == [False, True, False]
    b = LRSchedule(_opt(), base_lr=0.1, patience=1, min_iters_between_drops=2000)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict() and b.last_drop_iter == 2000
    assert [b.observe_validation(0.5, iteration=it) for it in (3500, 4000)] == [False, True]
    old_state = {k: v for k, v in a.state_dict().items() if k != "last_drop_iter"}  # a checkpoint from before
    b.load_state_dict(old_state)
    assert b.last_drop_iter == 0
    with pytest.raises(ValueError, match="iteration="):
        b.observe_validation(0.5)
    with pytest.raises(ValueError, match="min_iters_between_drops"):
        LRSchedule(_opt(), base_lr=0.1, min_iters_between_drops=-1)
    step = LRSchedule(_opt(), base_lr=0.1, mode="step", steps=[5], min_iters_between_drops=100)
    assert step.observe_validation(0.5) is False  # fixed steps ignore validations and need no iteration


def test_epochs_to_iters_and_the_imagenet_configs(repo_root):
    from detres.config.load import load_config

    assert epochs_to_iters(10, 1_281_167, 256) == 50_040  # 5,004 iterations per epoch
    assert epochs_to_iters(0.5, 30, 4) == 4 and epochs_to_iters(0, 30, 4) == 0
    with pytest.raises(ValueError):
        epochs_to_iters(-1, 30, 4)
    for name in ("resnet50_imagenet.yaml", "resnet101_imagenet.yaml"):
        cfg = load_config(repo_root / "configs" / "cls" / name)
        solver = cfg.solver
        assert solver.lr_schedule == "plateau" and solver.plateau_min_epochs == 10
        assert 4000 <= solver.eval_period <= 5004  # about once per epoch
        sched = LRSchedule(
            _opt(),
            base_lr=solver.base_lr,
            mode=solver.lr_schedule,
            patience=solver.plateau_patience,
            threshold=solver.plateau_threshold,
            min_iters_between_drops=epochs_to_iters(solver.plateau_min_epochs, 1_281_167, solver.batch_size),
        )
        evals = range(solver.eval_period, 200_001, solver.eval_period)
        drops = [it for it in evals if sched.observe_validation(0.6, iteration=it)]  # the error never moves
        # Not before 10 epochs (50,040 iterations) after the start, nor within 10 epochs of a drop.
        assert drops[0] >= 50_040 and drops[0] - 50_040 < solver.eval_period
        assert all(b - a >= 50_040 for a, b in zip(drops, drops[1:])) and len(drops) == 3
