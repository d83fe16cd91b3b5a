"""Training the localizer (Appendix C): :func:`train_localizer` runs one of its two stages, the per-class RPN
(:mod:`detres.engine.tasks.localization_rpn`) or the R-CNN on its proposals
(:mod:`detres.engine.tasks.localization_rcnn`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from detres.config.load import Config
from detres.engine.amp import check_amp_dtype
from detres.engine.distributed import distributed_run_guard
from detres.engine.tasks.localization_rcnn import train_rcnn_stage
from detres.engine.tasks.localization_rpn import train_rpn_stage

__all__ = ["STAGES", "train_localizer"]

STAGES = ("rpn", "rcnn")


def train_localizer(
    cfg: Config,
    *,
    resume: bool | str = False,
    stage: str = "rpn",
    resume_from: str | Path | None = None,
    allow_model_change: bool = False,
) -> dict[str, Any]:
    """Train the per-class RPN on ``data`` and test it on the validation set; returns the test report.

    Writes ``config.yaml``, ``metrics.jsonl``, ``last.pt`` (every ``checkpoint_period``, atomic),
    ``model_final.pt``, ``loss_curves.png`` and ``test/`` (devkit prediction files, ``loc_test.json``) under
    ``output_dir``; ``resume`` continues ``last.pt`` (weights, momentum, iteration, the same batch stream).
    ``stage="rcnn"``: the R-CNN on a trained RPN's proposals (:func:`~detres.engine.tasks.localization_rcnn.
    train_rcnn_stage`; data-parallel under torchrun too: proposals sharded, region batches sliced).
    Holds ``output_dir``'s run lock; ``resume`` / ``resume_from`` / ``allow_model_change`` and the stop signals:
    :func:`detres.engine.run.setup.start_run`, :func:`detres.engine.run.setup.run_guard`.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    check_amp_dtype(cfg.solver.amp_dtype)  # before any output is written
    train_stage = train_rcnn_stage if stage == "rcnn" else train_rpn_stage
    with distributed_run_guard(cfg):  # torchrun: rank 0 holds the lock
        return train_stage(cfg, resume=resume, resume_from=resume_from, allow_model_change=allow_model_change)
