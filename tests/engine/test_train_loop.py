"""Tests for the one training loop (detres.engine.train_loop) and its hooks (detres.engine.hooks) on a tiny task:
when each hook fires, a checkpoint written before its evaluation, a pending evaluation repeated on resume, divergence
rewinding last.pt to the last good state, a stop signal saving first, global iterations across several loops, the
data-parallel wrapper living only while the loop runs."""

from __future__ import annotations

import gc
import itertools
import os
import signal
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from detres.engine import train_loop
from detres.engine.amp import MixedPrecision
from detres.engine.hooks import EvalHook, LoggingHook, LRScheduleHook, default_hooks
from detres.engine.logging import JsonLinesLogger, read_json_lines
from detres.engine.lr_schedule import LRSchedule
from detres.engine.run.checkpoint import CheckpointManager, Diverged
from detres.engine.run.setup import TrainingInterrupted, run_guard
from detres.engine.train_loop import HookBase, LossWindow, Trainer, TrainTask, sgd_update
from detres.utils.torch_files import load_checkpoint


class TinyTask(TrainTask):
    """Least squares on a 2-input linear layer; the loss is made NaN at iteration ``nan_at``, a SIGTERM is sent to
    this process during iteration ``signal_at``."""

    def __init__(self, *, nan_at: int | None = None, signal_at: int | None = None) -> None:
        torch.manual_seed(0)
        self.model = nn.Linear(2, 1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.amp = MixedPrecision(enabled=False, device="cpu")
        self.nan_at, self.signal_at = nan_at, signal_at
        self.events: list[tuple[str, int]] = []

    def batches(self, start_iter: int):
        for i in itertools.count(start_iter):
            self.events.append(("batch", i))
            yield torch.ones(4, 2) * (1 + i % 3), torch.ones(4, 1)

    def step(self, trainer: Trainer, batch: Any) -> dict[str, float]:
        x, y = batch
        loss = ((trainer.train_model(x) - y) ** 2).mean()
        if trainer.global_iter == self.nan_at:
            loss = loss * float("nan")
        if trainer.global_iter == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        self.events.append(("step", trainer.global_iter))
        return {"loss": sgd_update(loss, self.optimizer, self.amp, iteration=trainer.global_iter)}

    def checkpoint_payload(self, trainer: Trainer) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "iter": trainer.global_iter,
        }


class Recorder(HookBase):
    def __init__(self, events: list) -> None:
        self.events = events

    def before_train(self) -> None:
        self.events.append(("before_train", self.trainer.iter))

    def before_step(self) -> None:
        self.events.append(("before_step", self.trainer.iter))

    def after_step(self) -> None:
        self.events.append(("after_step", self.trainer.iter))

    def after_train(self) -> None:
        self.events.append(("after_train", self.trainer.iter))


def _trainer(
    task: TinyTask,
    out: Path,
    *,
    max_iter: int,
    start_iter: int = 0,
    checkpoint_period: int = 2,
    log_period: int = 3,
    evaluate=None,
    eval_period: int = 3,
    at_end: bool = False,
    resumable: bool = False,
    resume_pending: bool = False,
    keep: int = 10,
    extra_hooks: tuple[HookBase, ...] = (),
    iteration_offset: int = 0,
    checkpoints: CheckpointManager | None = None,
    logger: JsonLinesLogger | None = None,
) -> Trainer:
    logger = logger or JsonLinesLogger(out / "metrics.jsonl", tensorboard=False, resume_from_iter=start_iter or None)
    schedule = LRSchedule(task.optimizer, base_lr=0.01, mode="step", steps=[4], gamma=0.5)
    eval_hook = None
    if evaluate is not None:
        eval_hook = EvalHook(
            evaluate, logger, period=eval_period, at_end=at_end, resumable=resumable, resume_pending=resume_pending
        )
    hooks = default_hooks(
        schedule,
        task.optimizer,
        logger,
        log_period=log_period,
        checkpoint_period=checkpoint_period,
        progress=None,
        eval_hook=eval_hook,
    )
    return Trainer(
        task,
        max_iter=max_iter,
        start_iter=start_iter,
        checkpoints=checkpoints or CheckpointManager(out, keep=keep),
        device=torch.device("cpu"),
        hooks=[*hooks, *extra_hooks],
        iteration_offset=iteration_offset,
    )


def test_hooks_fire_at_their_periods_and_the_last_iteration(tmp_path):
    task = TinyTask()
    evaluated: list[int] = []
    evaluate = lambda it: evaluated.append(it) or {"err": 0.5}  # noqa: E731
    trainer = _trainer(task, tmp_path, max_iter=7, evaluate=evaluate, extra_hooks=(Recorder(task.events),))
    assert trainer.run() == 7
    assert [r["iter"] for r in read_json_lines(tmp_path / "metrics.jsonl") if "loss" in r] == [3, 6, 7]
    assert [r["iter"] for r in read_json_lines(tmp_path / "metrics.jsonl") if "err" in r] == [3, 6]  # not at the end
    assert evaluated == [3, 6]
    assert list(trainer.checkpoints.kept()) == [2, 4, 6, 7]
    assert load_checkpoint(tmp_path / "last.pt")["iter"] == 7
    # one batch per step, fetched after the step's before_step hooks and never past max_iter
    steps = [e for e in task.events if e[0] in ("batch", "step", "before_step")]
    assert steps[:3] == [("before_step", 0), ("batch", 0), ("step", 0)]
    assert [e for e in task.events if e[0] == "batch"] == [("batch", i) for i in range(7)]
    assert task.events[0] == ("before_train", 0) and task.events[-1] == ("after_train", 7)


def test_the_lr_hook_sets_each_steps_lr_and_logs_it(tmp_path):
    task = TinyTask()
    _trainer(task, tmp_path, max_iter=6, log_period=1).run()
    lrs = {r["iter"]: r["lr"] for r in read_json_lines(tmp_path / "metrics.jsonl")}
    assert lrs == {1: 0.01, 2: 0.01, 3: 0.01, 4: 0.01, 5: 0.005, 6: 0.005}  # the step of iteration 4 runs at 0.005
    assert task.optimizer.param_groups[0]["lr"] == 0.005


def test_a_due_checkpoint_is_written_before_the_evaluation_and_a_failed_one_is_repeated_on_resume(tmp_path):
    seen: list[tuple[int, int, bool]] = []
    current: list[TinyTask] = []

    def evaluate(iteration: int) -> dict[str, float]:
        state = load_checkpoint(tmp_path / "last.pt")
        seen.append((iteration, state["iter"], state["pending_eval"]))
        current[-1].events.append(("eval", iteration))
        if iteration == 4 and len(seen) == 2:
            raise OSError("val/broken.png: cannot read")
        return {"err": 1.0 / iteration}

    current.append(TinyTask())
    with pytest.raises(OSError, match="broken.png"):
        _trainer(current[-1], tmp_path, max_iter=6, evaluate=evaluate, eval_period=2, at_end=True, resumable=True).run()
    assert seen == [(2, 2, True), (4, 4, True)]  # each evaluation found its iteration's checkpoint on disk
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["iter"] == 4 and state["pending_eval"] is True
    current.append(TinyTask())
    current[-1].model.load_state_dict(state["model"])
    current[-1].optimizer.load_state_dict(state["optimizer"])
    _trainer(
        current[-1],
        tmp_path,
        max_iter=6,
        start_iter=4,
        evaluate=evaluate,
        eval_period=2,
        at_end=True,
        resumable=True,
        resume_pending=True,
    ).run()
    assert seen[2:] == [(4, 4, True), (6, 6, True)]
    assert current[-1].events[:3] == [("eval", 4), ("batch", 4), ("step", 4)]  # the pending evaluation came first
    evals = [r for r in read_json_lines(tmp_path / "metrics.jsonl") if "err" in r]
    assert [r["iter"] for r in evals] == [2, 4, 6]  # the failed evaluation of iteration 4 is there once
    assert load_checkpoint(tmp_path / "last.pt")["pending_eval"] is True  # saved before the final evaluation


def test_the_plateau_schedule_observes_each_evaluation_and_the_record_says_whether_the_lr_dropped(tmp_path):
    task = TinyTask()
    logger = JsonLinesLogger(tmp_path / "metrics.jsonl", tensorboard=False)
    schedule = LRSchedule(task.optimizer, base_lr=0.01, mode="plateau", patience=1, threshold=0.0)
    errors = iter([0.5, 0.5, 0.4])
    hooks = [
        LRScheduleHook(schedule, task.optimizer, plateau_metric="err"),
        LoggingHook(logger, period=10),
        EvalHook(lambda it: {"err": next(errors)}, logger, period=1, at_end=True),
    ]
    Trainer(
        task,
        max_iter=3,
        start_iter=0,
        checkpoints=CheckpointManager(tmp_path, keep=0),
        device=torch.device("cpu"),
        hooks=hooks,
    ).run()
    evals = [r for r in read_json_lines(tmp_path / "metrics.jsonl") if "err" in r]
    assert [(r["iter"], r["lr_dropped"]) for r in evals] == [(1, False), (2, True), (3, False)]
    assert schedule.lr_at(3) == pytest.approx(0.001)


def test_a_diverged_step_rewinds_last_pt_to_the_last_good_state_and_names_it(tmp_path):
    task = TinyTask(nan_at=4)  # the step from the state of iteration 4 fails: that state is not good either
    with pytest.raises(Diverged) as caught:
        _trainer(task, tmp_path, max_iter=8, checkpoint_period=2).run()
    message = str(caught.value)
    assert message.startswith("iteration 4: loss is nan; training stopped; the last good checkpoint is ")
    assert message.count("training stopped") == 1
    assert load_checkpoint(tmp_path / "last.pt")["iter"] == 2
    assert (tmp_path / "checkpoints" / "diverged_iter_0000004.pt").is_file()
    assert list(CheckpointManager(tmp_path, keep=10).kept()) == [2]


def test_a_divergence_inside_nested_loops_is_reported_once(tmp_path):
    checkpoints = CheckpointManager(tmp_path, keep=10)
    logger = JsonLinesLogger(tmp_path / "metrics.jsonl", tensorboard=False)
    task = TinyTask(nan_at=5)
    with pytest.raises(Diverged) as caught, checkpoints.stop_on_divergence():  # a run of several loops
        _trainer(task, tmp_path, max_iter=3, checkpoints=checkpoints, logger=logger).run()
        _trainer(task, tmp_path, max_iter=3, iteration_offset=3, checkpoints=checkpoints, logger=logger).run()
    assert str(caught.value).count("training stopped") == 1 and str(caught.value).startswith("iteration 5:")
    assert checkpoints.last_iter == 3


def test_a_stop_signal_saves_last_pt_after_the_step_then_stops(tmp_path):
    task = TinyTask(signal_at=4)
    with pytest.raises(TrainingInterrupted) as caught, run_guard(tmp_path):
        _trainer(task, tmp_path, max_iter=10, checkpoint_period=100).run()
    assert caught.value.iteration == 5 and caught.value.exit_status == 128 + signal.SIGTERM
    assert load_checkpoint(tmp_path / "last.pt")["iter"] == 5  # the state after the signalled step
    assert ("batch", 5) not in task.events


def test_loops_with_an_offset_log_and_save_the_global_iteration(tmp_path):
    task = TinyTask()
    checkpoints = CheckpointManager(tmp_path, keep=10)
    logger = JsonLinesLogger(tmp_path / "metrics.jsonl", tensorboard=False)
    _trainer(task, tmp_path, max_iter=2, log_period=2, checkpoints=checkpoints, logger=logger).run()
    second = _trainer(
        task, tmp_path, max_iter=3, log_period=2, iteration_offset=2, checkpoints=checkpoints, logger=logger
    )
    assert second.run() == 3 and second.global_iter == 5
    assert [r["iter"] for r in read_json_lines(tmp_path / "metrics.jsonl")] == [2, 4, 5]
    assert list(checkpoints.kept()) == [2, 4, 5]  # the periods count each loop's own iterations


def test_the_loss_window_averages_and_round_trips_as_rows():
    window = LossWindow([{"loss": 1.0, "err": 0.5}, {"loss": 3.0, "err": 0.0}])
    assert window.rows(["loss", "err"]) == [[1.0, 0.5], [3.0, 0.0]]
    assert window.flush() == {"loss": 2.0, "err": 0.25} and window.flush() == {}


class _Wrapper(nn.Module):
    """Stands in for DistributedDataParallel in one process: it holds the process group (through its reducer) and
    refers to itself, so only the garbage collector frees it."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.itself = [self]

    def forward(self, *args: Any) -> Any:
        return self.module(*args)


@pytest.mark.parametrize("nan_at", [None, 2])
def test_the_data_parallel_wrapper_is_used_by_the_steps_and_released_when_run_returns(tmp_path, monkeypatch, nan_at):
    # A wrapper left to some later garbage collection (the trainer and its hooks refer to each other) could outlive
    # the process group's destruction at exit under torchrun; gloo's threads then aborted the process at shutdown.
    wrappers: list[weakref.ref] = []

    def wrap(module: nn.Module, device: torch.device, *, find_unused_parameters: bool = False) -> nn.Module:
        wrapper = _Wrapper(module)
        wrappers.append(weakref.ref(wrapper))
        return wrapper

    class Probe(HookBase):
        def after_step(self) -> None:
            used.append(isinstance(self.trainer.train_model, _Wrapper))

    used: list[bool] = []
    monkeypatch.setattr(train_loop, "wrap_ddp", wrap)
    task = TinyTask(nan_at=nan_at)
    trainer = _trainer(task, tmp_path, max_iter=4, extra_hooks=(Probe(),))
    gc.disable()  # freed by the loop itself, not by an automatic collection that may come at any time
    try:
        if nan_at is None:
            assert trainer.run() == 4
        else:
            with pytest.raises(Diverged):
                trainer.run()
    finally:
        gc.enable()
    assert used == [True] * (nan_at if nan_at is not None else 4)
    assert len(wrappers) == 1 and wrappers[0]() is None  # no wrapper left, though the trainer is alive
    assert trainer.train_model is task.model
