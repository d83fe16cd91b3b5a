"""The hooks of the training loop (:mod:`detres.engine.train_loop`): LR schedule, logging, checkpoint, evaluation,
stop signals. Each "every N iterations" rule is written here once, counted in the loop's own iterations and always
due at the loop's last one (evaluation: see :class:`EvalHook`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm

from detres.engine.distributed import is_main_process, mean_over_ranks
from detres.engine.logging import JsonLinesLogger
from detres.engine.lr_schedule import LRSchedule
from detres.engine.optimizer import set_lr
from detres.engine.run.setup import stop_if_signalled
from detres.engine.train_loop import HookBase

__all__ = [
    "CheckpointHook",
    "EvalHook",
    "LRScheduleHook",
    "LoggingHook",
    "SignalHook",
    "default_hooks",
    "every",
    "progress_bar",
]


def every(period: int, iteration: int, last: int) -> bool:
    """Due after ``iteration`` iterations of a loop of ``last``: every ``period``-th one, and the last one."""
    return iteration % period == 0 or iteration == last


def progress_bar(desc: str, *, total: int, initial: int) -> tqdm:
    """The run's tqdm bar (rank 0 only shows it)."""
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, disable=not is_main_process())


class LRScheduleHook(HookBase):
    """Before each step: the schedule's LR for the iteration, x each parameter group's ``lr_factor``.

    ``plateau_metric``: the evaluation record field (an error, lower is better) the schedule observes after each
    evaluation (plateau drops, ResNet Sec. 3.4); the record then also says whether it dropped the LR
    (``lr_dropped``). None: the schedule ignores evaluations (fixed steps)."""

    def __init__(
        self, schedule: LRSchedule, optimizer: torch.optim.Optimizer, *, plateau_metric: str | None = None
    ) -> None:
        self.schedule, self.optimizer, self.plateau_metric = schedule, optimizer, plateau_metric

    def before_step(self) -> None:
        self.trainer.lr = self.schedule.lr_at(self.trainer.iter)
        set_lr(self.optimizer, self.trainer.lr)

    def after_eval(self, record: dict[str, Any]) -> None:
        if self.plateau_metric is not None:
            error = record[self.plateau_metric]
            record["lr_dropped"] = self.schedule.observe_validation(error, iteration=self.trainer.global_iter)


class LoggingHook(HookBase):
    """Every ``period`` iterations (and at the last): the logged values averaged over the steps since the previous
    line and over the ranks (a collective: every rank comes here), written by ``logger`` (metrics.jsonl and
    TensorBoard; rank 0) as the task's record; the tqdm ``progress`` bar advances every step."""

    def __init__(self, logger: JsonLinesLogger, *, period: int, progress: tqdm | None = None) -> None:
        self.logger, self.period, self.progress = logger, int(period), progress

    def after_step(self) -> None:
        trainer = self.trainer
        if self.progress is not None:
            self.progress.update(1)
        if not every(self.period, trainer.iter, trainer.max_iter):
            return
        means = mean_over_ranks(trainer.window.flush())  # the global batch's values
        self.logger.log(**trainer.task.train_record(trainer, means))
        if self.progress is not None:
            self.progress.set_postfix(loss=f"{means['loss']:.3f}", lr=f"{trainer.lr:.2g}")


class CheckpointHook(HookBase):
    """Every ``period`` iterations (and at the last): ``last.pt`` and its kept copy (:class:`CheckpointManager`).

    ``eval_hook``: a resumable evaluation (:class:`EvalHook` with ``resumable``) due at the same iteration runs after
    this save; the checkpoint records it as ``pending_eval`` so that a resumed run evaluates first."""

    def __init__(self, *, period: int, eval_hook: EvalHook | None = None) -> None:
        self.period, self.eval_hook = int(period), eval_hook

    def after_step(self) -> None:
        trainer = self.trainer
        if not every(self.period, trainer.iter, trainer.max_iter):
            return
        flags = {}
        if self.eval_hook is not None and self.eval_hook.resumable:
            flags["pending_eval"] = self.eval_hook.due()
        trainer.save_last(**flags)


class EvalHook(HookBase):
    """Every ``period`` iterations: ``evaluate(global_iter)`` -> the fields of a metrics.jsonl record (or {} on a
    rank that does not score), passed to the other hooks (:meth:`HookBase.after_eval`), logged, then the task's
    modules are put back in their training modes.

    ``at_end``: also after the loop's last iteration (else only before it: the caller tests the final model
    itself); ``period`` <= 0 then means only at the end. ``resumable``: a checkpoint saved just before a due
    evaluation says so (``pending_eval``), and a run resumed from such a checkpoint (``resume_pending``) evaluates
    before its first step, so a failed evaluation is repeated and the LR schedule sees what an uninterrupted run
    saw."""

    def __init__(
        self,
        evaluate: Callable[[int], dict[str, Any]],
        logger: JsonLinesLogger,
        *,
        period: int,
        at_end: bool,
        resumable: bool = False,
        resume_pending: bool = False,
    ) -> None:
        self.evaluate, self.logger = evaluate, logger
        self.period, self.at_end = int(period), at_end
        self.resumable, self.resume_pending = resumable, resume_pending

    def due(self) -> bool:
        iteration, last = self.trainer.iter, self.trainer.max_iter
        if iteration == last:
            return self.at_end
        return self.period > 0 and iteration % self.period == 0

    def run_evaluation(self) -> None:
        trainer = self.trainer
        record = dict(self.evaluate(trainer.global_iter))
        trainer.after_eval(record)
        if record:
            self.logger.log(iter=trainer.global_iter, **record)
        trainer.task.train_mode()

    def before_train(self) -> None:
        if self.resumable and self.resume_pending:
            self.run_evaluation()  # the validation that followed the resumed checkpoint (it may have failed)

    def after_step(self) -> None:
        if self.due():
            self.run_evaluation()


class SignalHook(HookBase):
    """After each step: when SIGINT / SIGTERM came (on any rank), save ``last.pt`` and stop
    (:class:`~detres.engine.run.setup.TrainingInterrupted`)."""

    def after_step(self) -> None:
        stop_if_signalled(self.trainer.global_iter, self.trainer.save_last)


def default_hooks(
    schedule: LRSchedule,
    optimizer: torch.optim.Optimizer,
    logger: JsonLinesLogger,
    *,
    log_period: int,
    checkpoint_period: int,
    progress: tqdm | None,
    eval_hook: EvalHook | None = None,
    plateau_metric: str | None = None,
) -> list[HookBase]:
    """The hooks of a training loop, in the order they run after a step: log, checkpoint, evaluate, stop signal."""
    hooks: list[HookBase] = [
        LRScheduleHook(schedule, optimizer, plateau_metric=plateau_metric),
        LoggingHook(logger, period=log_period, progress=progress),
        CheckpointHook(period=checkpoint_period, eval_hook=eval_hook),
    ]
    if eval_hook is not None:
        hooks.append(eval_hook)
    hooks.append(SignalHook())
    return hooks
