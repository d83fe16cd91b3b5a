"""Iteration-based learning-rate schedule: warm-up, then fixed steps or divide-by-10 on a plateau.

torch's ReduceLROnPlateau does not compose with warm-up and fixed steps in one resumable object,
so this small schedule keeps the three rules together and exposes a ``state_dict`` for resume.
"""
from __future__ import annotations

from typing import Sequence

import torch


class LRSchedule:
    """lr(iter) = base_lr * gamma ** drops, where drops come from ``steps`` or validation plateaus.

    Plateau rule (ResNet paper Sec. 3.4, "divided by 10 when the error plateaus"): after each
    validation, if the error has not improved on the best by more than ``threshold`` for
    ``patience`` consecutive validations, the LR is multiplied by ``gamma`` once.
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
    ) -> None:
        if mode not in ("plateau", "step"):
            raise ValueError(f"lr_schedule must be 'plateau' or 'step', got {mode!r}")
        self.optimizer = optimizer
        self.base_lr = base_lr
        self.mode = mode
        self.steps = sorted(int(s) for s in steps)
        self.gamma = gamma
        self.patience = patience
        self.threshold = threshold
        self.min_lr = min_lr
        self.warmup_iters = warmup_iters
        self.warmup_lr = warmup_lr
        self.plateau_drops = 0
        self.best_error = float("inf")
        self.bad_evals = 0

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

    def observe_validation(self, error: float) -> bool:
        """Feed a validation error; returns True when this observation drops the LR (plateau mode)."""
        if error < self.best_error - self.threshold:
            self.best_error = error
            self.bad_evals = 0
            return False
        self.bad_evals += 1
        if self.mode == "plateau" and self.bad_evals >= self.patience:
            self.plateau_drops += 1
            self.bad_evals = 0
            return True
        return False

    def state_dict(self) -> dict:
        return {"plateau_drops": self.plateau_drops, "best_error": self.best_error, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict) -> None:
        self.plateau_drops = int(state["plateau_drops"])
        self.best_error = float(state["best_error"])
        self.bad_evals = int(state["bad_evals"])
