"""Faster R-CNN training (Appendix A): approximate joint training as a task of the training loop, and
:func:`train_detector`, the whole run of either training scheme (joint, or 4-step alternating:
:mod:`detres.engine.tasks.alternating`) with its final test."""

from __future__ import annotations

import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch

from detres.config.load import Config
from detres.data.build import build_detection_dataset, dataset_class_names
from detres.data.validate import check_detection_sets
from detres.engine.amp import SCALER_KEY, check_amp_dtype, scaler_state_into
from detres.engine.det_test import test_detector
from detres.engine.distributed import distributed_run_guard, is_main_process, start_distributed_run
from detres.engine.hooks import EvalHook, default_hooks, progress_bar
from detres.engine.logging import JsonLinesLogger, read_json_lines
from detres.engine.lr_schedule import LRSchedule
from detres.engine.optimizer import build_step_solver
from detres.engine.plots import plot_curves
from detres.engine.tasks.alternating import alternating_plan, train_alternating
from detres.engine.tasks.detection_run import DetectionRun, detection_sgd_step, detector_metadata
from detres.engine.train_loop import Trainer, TrainTask
from detres.evaluation.coco_backend import coco_classes
from detres.models.build import build_detector
from detres.utils.atomic import write_json_atomic

__all__ = ["LOSS_KEYS", "TRAINING_SCHEMES", "JointDetectionTask", "train_detector"]

LOSS_KEYS = ("loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box_reg")
TRAINING_SCHEMES = ("joint", "alternating")


class JointDetectionTask(TrainTask):
    """Approximate joint training (py-faster-rcnn end2end): one SGD step on the sum of the RPN's and Fast R-CNN's
    4 losses."""

    def __init__(
        self,
        run: DetectionRun,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
    ) -> None:
        self.run, self.model, self.optimizer = run, model, optimizer

    def batches(self, start_iter: int) -> Iterator[Any]:
        return iter(self.run.loader(start_iter))

    def step(self, trainer: Trainer, batch: dict[str, Any]) -> dict[str, float]:
        run = self.run
        with run.amp.autocast():
            losses = trainer.train_model(
                batch["images"].to(run.device), batch["targets"], image_sizes=batch["image_sizes"]
            )
        return detection_sgd_step(losses, self.optimizer, run.amp, iteration=trainer.global_iter)

    def checkpoint_payload(self, trainer: Trainer) -> dict[str, Any]:
        payload = self.run.payload(self.model, trainer.global_iter)
        payload["optimizer"] = self.optimizer.state_dict()
        return scaler_state_into(payload, self.run.amp)


def train_detector(
    cfg: Config, *, resume: bool | str = False, resume_from: str | Path | None = None, allow_model_change: bool = False
) -> dict[str, Any]:
    """Train on ``data.train_*``, evaluate periodically and at the end on ``data.val_*``; returns metrics.

    Writes ``config.yaml``, ``metrics.jsonl`` (losses every ``log_period``, AP at each evaluation),
    ``last.pt`` (every ``checkpoint_period``), ``model_final.pt``, ``metrics.json``, the curve PNGs
    and ``test/`` (see :func:`detres.engine.det_test.test_detector`) under ``cfg.output_dir``. An existing
    ``last.pt`` is never overwritten unless ``resume``: False, True or "auto" (continue last.pt if any, else
    start); ``resume_from``: an older kept checkpoint; see :func:`detres.engine.run.setup.start_run`. Holds
    ``output_dir``'s run lock; SIGINT / SIGTERM save ``last.pt`` and stop (TrainingInterrupted).

    ``solver.training_scheme``: "joint" (default; approximate joint training, one loss over RPN and
    Fast R-CNN) or "alternating" (Ren et al.'s 4-step training, :mod:`detres.engine.tasks.alternating`,
    which also writes ``step1_rpn.pt`` .. ``step4_fast_rcnn.pt``). SGD uses the weight / bias
    parameter groups of :mod:`detres.engine.optimizer`; the LR schedule scales every group's LR.

    Resuming restores the weights, the optimizer state (momentum buffers) and the iteration from
    ``last.pt``; the LR schedule is a function of the iteration, and the batch stream is seeded and
    skips to the same batch, and every random draw (scale choice, flip, RPN / RoI sampling) of an image
    is seeded by (seed, iteration, image), so on one device and thread count a resumed run repeats the
    uninterrupted run's losses bit for bit. A checkpoint of the other training scheme is refused.
    """
    with distributed_run_guard(cfg):  # torchrun: rank 0 holds the lock
        return _train_detector(cfg, resume=resume, resume_from=resume_from, allow_model_change=allow_model_change)


def _check_same_classes(train_set, val_set) -> None:
    if dataset_class_names(train_set) != dataset_class_names(val_set):
        raise ValueError(
            f"the training and validation sets list different classes: "
            f"{dataset_class_names(train_set)} vs {dataset_class_names(val_set)}"
        )


def _start(cfg: Config, **resume: Any) -> tuple[DetectionRun, dict | None]:
    """The run's folder, data, log and checkpoints: (run, resumed state or None)."""
    scheme = cfg.solver.training_scheme
    if scheme not in TRAINING_SCHEMES:
        raise ValueError(f"solver.training_scheme must be one of {list(TRAINING_SCHEMES)}, got {scheme!r}")
    check_amp_dtype(cfg.solver.amp_dtype)  # before any output is written
    if scheme == "alternating":
        alternating_plan(cfg.solver)  # bad per-step options fail before any work
    coco_classes(cfg.test.coco_backend)  # an unknown or uninstalled COCO backend fails now, not at the first evaluation
    start = start_distributed_run(cfg, **resume)
    out, last_path, state = start.out, start.last_path, start.state

    train_set = build_detection_dataset(cfg, "train", train=True)
    val_set = build_detection_dataset(cfg, "val", train=False, class_names=dataset_class_names(train_set))
    _check_same_classes(train_set, val_set)
    check_detection_sets(train_set, val_set, cfg, out)  # image files, boxes, unseen classes; skipped_samples.json
    if len(train_set) == 0:
        raise ValueError(f"{cfg.data.train_ann}: the training set has no images")
    if state is not None and state.get("scheme", "joint") != scheme:
        raise ValueError(
            f"{last_path} was written by solver.training_scheme={state.get('scheme', 'joint')!r}; "
            f"the config asks for {scheme!r}"
        )
    start_iter = int(state["iter"]) if state is not None else 0
    logger = JsonLinesLogger(out / "metrics.jsonl", resume_from_iter=start_iter if state is not None else None)
    meta = detector_metadata(train_set)
    run = DetectionRun(
        cfg,
        out,
        last_path,
        start.device,
        train_set,
        val_set,
        meta,
        logger,
        checkpoints=start.checkpoints,
        model_changed=start.model_changed,
    )
    if state is not None:
        run.amp.load_state_dict(state.get(SCALER_KEY))  # absent in fp32 / older checkpoints: a fresh scaler
    return run, state


def _train_detector(cfg: Config, **resume: Any) -> dict[str, Any]:
    run, state = _start(cfg, **resume)
    with run.checkpoints.stop_on_divergence():  # a NaN / Inf: stop naming the last good checkpoint
        if cfg.solver.training_scheme == "joint":
            model, iteration = _train_joint(run, state)
        else:
            model, iteration = train_alternating(run, state)
    train_time = time.time() - run.started
    out = run.out
    run.save_file(out / "model_final.pt", run.payload(model, iteration), iteration)
    metrics = test_detector(model, run.val_set, run.meta, cfg, out_dir=out / "test", device=run.device)
    if not is_main_process():
        return metrics  # the other ranks only helped with the sharded test pass
    metrics.update(iterations=iteration, train_time_s=round(train_time, 1))
    run.logger.log(
        iter=iteration,
        AP=metrics["coco"]["summary"]["AP"],
        AP50=metrics["coco"]["summary"]["AP50"],
        voc_mAP=metrics["voc"]["mAP"],
    )
    write_json_atomic(out / "metrics.json", metrics)
    records = read_json_lines(out / "metrics.jsonl")
    plot_curves(
        records,
        out / "loss_curves.png",
        series=[("loss", "total"), *((k, k) for k in LOSS_KEYS)],
        title="Faster R-CNN training losses",
        ylabel="loss",
    )
    plot_curves(
        records,
        out / "val_curves.png",
        series=[("AP", "COCO AP"), ("AP50", "COCO AP50"), ("voc_mAP", "VOC mAP")],
        title="validation",
        ylabel="AP",
        percent=True,
    )
    return metrics


def _train_joint(run: DetectionRun, state: dict | None) -> tuple[torch.nn.Module, int]:
    """Approximate joint training on the loop; returns (model, iterations)."""
    # resumed: the weights come from the checkpoint, not from the backbone file model.weights names
    num_classes = len(run.meta["class_names"])
    model = build_detector(
        run.cfg.model, input_cfg=run.cfg.input, num_classes=num_classes, load_weights=state is None
    ).to(run.device)
    solver = run.cfg.solver
    optimizer, schedule, start_iter = build_step_solver(model, solver, state, run.last_path)
    task = JointDetectionTask(run, model, optimizer)
    with progress_bar("train_det", total=solver.max_iter, initial=start_iter) as progress:
        trainer = Trainer(
            task,
            max_iter=solver.max_iter,
            start_iter=start_iter,
            checkpoints=run.checkpoints,
            device=run.device,
            started=run.started,
            hooks=_hooks(run, model, optimizer, schedule, progress),
        )
        iteration = trainer.run()
    return model, iteration


def _hooks(run: DetectionRun, model: torch.nn.Module, optimizer, schedule: LRSchedule, progress) -> list:
    solver = run.cfg.solver
    evaluation = EvalHook(partial(run.evaluate, model), run.logger, period=solver.eval_period, at_end=False)
    return default_hooks(
        schedule,
        optimizer,
        run.logger,
        log_period=solver.log_period,
        checkpoint_period=solver.checkpoint_period,
        progress=progress,
        eval_hook=evaluation,
    )
