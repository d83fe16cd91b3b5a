"""The one training loop: :class:`Trainer` runs a :class:`TrainTask`'s SGD steps and calls its hooks around them.

Every trainer of detres (classification, detection joint and 4-step alternating, the localizer's RPN and R-CNN
stages) is a task on this loop (:mod:`detres.engine.tasks`). A task says what is trained: the model, its batch
stream, one SGD step, what ``last.pt`` holds. The loop and its hooks (:mod:`detres.engine.hooks`) say when
things happen, for every task alike::

    task.train_mode(); before_train hooks (a resumed run's pending evaluation)
    while iter < max_iter:
        before_step hooks                 LR schedule: the step's learning rate
        task.step(next batch)             forward, finite-loss check (all ranks), backward, SGD step
        note the step's loss              (tells a good checkpoint from a blown-up one)
        iter += 1
        after_step hooks, in order:       logging (metrics.jsonl, TensorBoard, tqdm) -> checkpoint (last.pt)
                                          -> evaluation -> stop signal (save last.pt, then stop)
    after_train hooks

So a checkpoint due at an iteration is on disk before that iteration's evaluation (a failing validation set loses
no training), and a stop signal saves the state of the step just finished. A non-finite loss or state raises
:class:`~detres.engine.run.checkpoint.Diverged` inside the loop; the loop turns it into the one-line error naming the
last good checkpoint, after setting ``last.pt`` back to it (:meth:`CheckpointManager.stop_on_divergence`).

Exact resume: the loop starts at ``start_iter`` and asks the task for its batch stream from that batch (the streams
are seeded by iteration, :mod:`detres.engine.seeded_data`); the LR is a function of the iteration; the task
restores weights, momentum and scaler from the checkpoint. Data-parallel runs (torchrun): each ``run`` wraps what
trains in DistributedDataParallel (:func:`detres.engine.distributed.wrap_ddp`) and drops the wrapper when it returns;
every collective (the finite check, the logged means, the stop signal) is reached by every rank at the same step;
rank 0 alone writes files.

``iter`` counts the loop's own iterations; a run made of several loops (the 4 alternating steps) passes
``iteration_offset`` so that logs, checkpoints and errors carry the run's global iteration (``global_iter``).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from detres.data.worker_errors import readable
from detres.engine.amp import MixedPrecision
from detres.engine.distributed import is_main_process, wrap_ddp
from detres.engine.run.checkpoint import CheckpointManager, Diverged
from detres.utils.dist import finite_on_all_ranks

__all__ = ["HookBase", "LossWindow", "TrainTask", "Trainer", "sgd_update", "sgd_update_on_losses"]


class TrainTask:
    """What one training loop trains. Subclasses set ``model`` and ``optimizer`` and implement :meth:`batches`,
    :meth:`step` and :meth:`checkpoint_payload`; the other methods have the common defaults."""

    model: nn.Module
    optimizer: torch.optim.Optimizer

    def batches(self, start_iter: int) -> Iterator[Any]:
        """The endless (or long enough) training stream from batch ``start_iter``, exactly as an uninterrupted
        run would have read it. Created only when there is training left; one batch is read per step."""
        raise NotImplementedError

    def step(self, trainer: Trainer, batch: Any) -> dict[str, float]:
        """One SGD step on ``batch`` (:func:`sgd_update` does the common part); returns the values to log, the
        total loss first under ``"loss"``."""
        raise NotImplementedError

    def checkpoint_payload(self, trainer: Trainer) -> dict[str, Any]:
        """What ``last.pt`` holds after ``trainer.global_iter`` iterations (rank 0 only calls this)."""
        raise NotImplementedError

    def train_mode(self) -> None:
        """Put the modules in their training modes (at the start and after each evaluation)."""
        self.model.train()

    def train_record(self, trainer: Trainer, means: Mapping[str, float]) -> dict[str, Any]:
        """The metrics.jsonl record of a log line: ``means`` = the logged values averaged since the last one."""
        return {"iter": trainer.global_iter, "lr": trainer.lr, "time": trainer.elapsed(), **means}


class HookBase:
    """Called by :class:`Trainer` around the loop and every step; ``self.trainer`` is set when it is registered."""

    trainer: Trainer

    def before_train(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def after_train(self) -> None:
        pass

    def after_eval(self, record: dict[str, Any]) -> None:
        """An evaluation gave ``record`` (the fields its metrics.jsonl line will hold); a hook may add fields."""


class LossWindow:
    """The logged values of the steps since the last log line, averaged into one record."""

    def __init__(self, steps: Sequence[Mapping[str, float]] = ()) -> None:
        self.values: dict[str, list[float]] = {}
        for values in steps:
            self.add(values)

    def add(self, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self.values.setdefault(key, []).append(value)

    def rows(self, keys: Sequence[str]) -> list[list[float]]:
        """The window per step, as ``[value of keys[0], value of keys[1], ...]`` rows (for a checkpoint)."""
        return [list(row) for row in zip(*(self.values.get(key, []) for key in keys))]

    def flush(self) -> dict[str, float]:
        means = {k: sum(v) / len(v) for k, v in self.values.items() if v}
        self.values = {}
        return means


def sgd_update(
    total: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    amp: MixedPrecision,
    *,
    iteration: int,
    detail: Callable[[], str] | None = None,
) -> float:
    """The common end of an SGD step: refuse a non-finite ``total`` on any rank (:class:`Diverged`; ``detail()``
    is added to its message), then backward and step (scaled under float16 AMP); returns the loss."""
    loss = total.item()
    if not finite_on_all_ranks(loss):  # collective: no rank waits alone in the gradient all-reduce
        more = detail() if detail is not None else ""
        raise Diverged(f"iteration {iteration}: loss is {loss}{more}; lower solver.base_lr", failed_from=iteration)
    optimizer.zero_grad(set_to_none=True)
    amp.backward_and_step(total, optimizer)
    return loss


def sgd_update_on_losses(
    losses: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    amp: MixedPrecision,
    *,
    iteration: int,
    detail: Callable[[], str] | None = None,
) -> dict[str, float]:
    """:func:`sgd_update` on the sum of ``losses``; returns the values to log: the total as ``loss``, then each."""
    total = sum(losses.values())
    value = sgd_update(total, optimizer, amp, iteration=iteration, detail=detail)
    return {"loss": value, **{key: loss.item() for key, loss in losses.items()}}


class Trainer:
    """Runs ``task`` from ``start_iter`` to ``max_iter`` with ``hooks`` (in the order given; see the module doc).

    ``train_module``: what the training forward pass calls, wrapped in DDP under torchrun while :meth:`run` runs
    (the task reads it as ``trainer.train_model``); None = ``task.model``. ``checkpoints``: the run's ``last.pt``
    writer. ``started``: the run's start time (``time`` in the logs counts from it); None = now.
    """

    def __init__(
        self,
        task: TrainTask,
        *,
        max_iter: int,
        start_iter: int,
        checkpoints: CheckpointManager,
        device: torch.device,
        hooks: Sequence[HookBase] = (),
        train_module: nn.Module | None = None,
        find_unused_parameters: bool = False,
        iteration_offset: int = 0,
        window: LossWindow | None = None,
        started: float | None = None,
    ) -> None:
        self.task, self.max_iter, self.start_iter = task, int(max_iter), int(start_iter)
        self.iter = self.start_iter
        self.iteration_offset = int(iteration_offset)
        self.checkpoints, self.device = checkpoints, device
        self.lr: float = 0.0  # set by the LR schedule hook before each step
        self.window = window if window is not None else LossWindow()
        self.started = time.time() if started is None else started
        self.train_module = task.model if train_module is None else train_module
        self.find_unused_parameters = find_unused_parameters
        # run() wraps it in DDP for its steps (torchrun); task.model stays the plain module (state_dict, evaluation)
        self.train_model: nn.Module = self.train_module
        self.hooks: list[HookBase] = []
        for hook in hooks:
            hook.trainer = self
            self.hooks.append(hook)

    @property
    def global_iter(self) -> int:
        """The run's iteration count (``iter`` plus the iterations of the loops before this one)."""
        return self.iteration_offset + self.iter

    def elapsed(self) -> float:
        return time.time() - self.started

    def run(self) -> int:
        """Train to ``max_iter``; returns the iteration reached."""
        with self._data_parallel():
            self.task.train_mode()
            for hook in self.hooks:
                hook.before_train()
            # Read one batch per step and only when there is training left: never a batch past max_iter.
            batches = readable(self.task.batches(self.iter)) if self.iter < self.max_iter else iter(())
            with self.checkpoints.stop_on_divergence():  # a NaN / Inf: stop naming the last good checkpoint
                while self.iter < self.max_iter:
                    for hook in self.hooks:
                        hook.before_step()
                    values = self.task.step(self, next(batches))
                    self.checkpoints.note_loss(self.global_iter, values["loss"])
                    self.window.add(values)
                    self.iter += 1
                    for hook in self.hooks:
                        hook.after_step()
            for hook in self.hooks:
                hook.after_train()
        return self.iter

    @contextmanager
    def _data_parallel(self) -> Iterator[None]:
        """``train_model`` is the DDP wrapper (torchrun) while the loop runs; it is freed when the loop ends, also
        on an error. The wrapper's reducer holds the process group, and a group still held when it is destroyed at
        exit keeps its gloo worker threads running into interpreter shutdown, which aborts the process
        (``terminate called without an active exception``). DDP refers to itself, so dropping the reference is
        not enough: the collector frees it now, while the group is alive."""
        self.train_model = wrap_ddp(self.train_module, self.device, find_unused_parameters=self.find_unused_parameters)
        try:
            yield
        finally:
            wrapped = self.train_model is not self.train_module
            self.train_model = self.train_module
            if wrapped:
                gc.collect()

    def save_last(self, **flags: Any) -> Path:
        """Write ``last.pt`` (the task's payload, plus ``flags``) and its kept copy; never a non-finite state.
        Rank 0 alone writes under torchrun (the ranks' states are the same)."""
        if not is_main_process():
            return self.checkpoints.last_path
        payload = self.task.checkpoint_payload(self)
        payload.update(flags)
        return self.checkpoints.save(payload, self.global_iter)

    def after_eval(self, record: dict[str, Any]) -> None:
        for hook in self.hooks:
            hook.after_eval(record)
