"""Iteration-based learning-rate schedule: warm-up, then fixed steps or divide-by-10 on a plateau.

torch's ReduceLROnPlateau does not compose with warm-up and fixed steps in one resumable object,
so this small schedule keeps the three rules together and exposes a ``state_dict`` for resume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def epochs_to_iters(epochs: float, num_images: int, batch_size: int) -> int:
    """Iterations that ``epochs`` passes over ``num_images`` take at ``batch_size`` (rounded up).

    An epoch is ``num_images // batch_size`` iterations, as the trainer's sampler draws them
    (the last incomplete batch is dropped); e.g. 10 epochs of ImageNet's 1,281,167 images at
    batch 256 are 50,040 iterations.
    """
    if epochs < 0:
        raise ValueError(f"epochs: expected a non-negative number, got {epochs!r}")
    if batch_size < 1 or num_images < batch_size:
        raise ValueError(f"need at least one batch: {num_images} images at batch size {batch_size}")
    return math.ceil(epochs * (num_images // batch_size))


class LRSchedule:
    """lr(iter) = base_lr * gamma ** drops, where drops come from ``steps`` or validation plateaus.

    ``mode="step"``: the LR is multiplied by ``gamma`` at each iteration in ``steps`` (validation
    results are ignored). ``mode="plateau"`` (ResNet paper Sec. 3.4, "divided by 10 when the error
    plateaus"): after each validation, if the error has not improved on the best by more than
    ``threshold`` for ``patience`` consecutive validations, the LR is multiplied by ``gamma`` once,
    but never sooner than ``min_iters_between_drops`` iterations after the start or the previous
    drop. A stall seen earlier keeps counting, so the drop comes at the first validation past that
    minimum that still shows no improvement. This keeps a noisy or briefly flat validation curve
    from cutting the LR long before the paper's drops (about 30 and 60 epochs on ImageNet).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        base_lr: float,
        mode: str = "plateau",
        steps: Sequence[int] = (),
        gamma: float = 0.1,
        patience: int = 2,
        threshold: float = 0.001,
        min_lr: float = 0.0,
        warmup_iters: int = 0,
        warmup_lr: float = 0.01,
        min_iters_between_drops: int = 0,
    ) -> None:
        if mode not in ("plateau", "step"):
            raise ValueError(f"lr_schedule must be 'plateau' or 'step', got {mode!r}")
        if int(patience) < 1:
            raise ValueError(f"plateau patience must be >= 1 validation, got {patience!r}")
        if int(min_iters_between_drops) != min_iters_between_drops or min_iters_between_drops < 0:
            raise ValueError(
                f"min_iters_between_drops: expected a non-negative integer, got {min_iters_between_drops!r}"
            )
        self.optimizer = optimizer
        self.base_lr = base_lr
        self.mode = mode
        self.steps = sorted(int(s) for s in steps)
        self.gamma = gamma
        self.patience = int(patience)
        self.threshold = threshold
        self.min_lr = min_lr
        self.warmup_iters = warmup_iters
        self.warmup_lr = warmup_lr
        self.min_iters_between_drops = int(min_iters_between_drops)
        self.plateau_drops = 0
        self.best_error = float("inf")
        self.bad_evals = 0
        self.last_drop_iter = 0  # iteration of the last plateau drop (0 = the start of training)

    def lr_at(self, iteration: int) -> float:
        if iteration < self.warmup_iters:
            return self.warmup_lr
        drops = sum(iteration >= s for s in self.steps) if self.mode == "step" else self.plateau_drops
        return max(self.base_lr * self.gamma**drops, self.min_lr)

    def apply(self, iteration: int) -> float:
        """Set the optimizer's LR for ``iteration`` (call before each step); returns it."""
        lr = self.lr_at(iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def observe_validation(self, error: float, iteration: int | None = None) -> bool:
        """Feed a validation error measured after ``iteration`` iterations; returns True when this
        observation drops the LR (plateau mode). ``iteration`` is required when
        ``min_iters_between_drops`` is set."""
        if self.mode == "plateau" and self.min_iters_between_drops and iteration is None:
            raise ValueError("observe_validation: pass iteration= when min_iters_between_drops is set")
        if error < self.best_error - self.threshold:
            self.best_error = error
            self.bad_evals = 0
            return False
        self.bad_evals += 1
        if self.mode != "plateau" or self.bad_evals < self.patience:
            return False
        if self.min_iters_between_drops and iteration - self.last_drop_iter < self.min_iters_between_drops:
            return False  # too soon after the start / the last drop: keep counting the stall
        self.plateau_drops += 1
        self.bad_evals = 0
        if iteration is not None:
            self.last_drop_iter = int(iteration)
        return True

    def state_dict(self) -> dict:
        return {
            "plateau_drops": self.plateau_drops,
            "best_error": self.best_error,
            "bad_evals": self.bad_evals,
            "last_drop_iter": self.last_drop_iter,
        }

    def load_state_dict(self, state: dict) -> None:
        self.plateau_drops = int(state["plateau_drops"])
        self.best_error = float(state["best_error"])
        self.bad_evals = int(state["bad_evals"])
        self.last_drop_iter = int(state.get("last_drop_iter", 0))  # absent in checkpoints before this field
