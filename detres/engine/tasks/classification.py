"""Classification pre-training (ResNet Sec. 3.4) as a task of the training loop: SGD on augmented crops, plateau LR
drops on the validation error, exact resume; the run ends with :func:`finalize_classifier` (precise BN)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader

from detres.config.load import Config
from detres.data.cls_pipeline import ClsDataStats, build_train_transform, build_val_dataset, compute_data_stats
from detres.data.datasets.imagefolder import ImageFolderDataset
from detres.data.validate import check_cls_sets
from detres.data.worker_errors import readable_worker_errors
from detres.engine.amp import (
    SCALER_KEY,
    MixedPrecision,
    check_amp_dtype,
    mixed_precision_from_config,
    scaler_state_into,
)
from detres.engine.distributed import distributed_run_guard, is_distributed, shard_batches, start_distributed_run
from detres.engine.hooks import EvalHook, default_hooks, progress_bar
from detres.engine.logging import JsonLinesLogger
from detres.engine.lr_schedule import LRSchedule, epochs_to_iters
from detres.engine.run.setup import load_model_state
from detres.engine.seeded_data import EpochBatchSampler, EpochSeededDataset
from detres.engine.sync_bn import convert_sync_batchnorm
from detres.engine.tasks.classification_final import evaluate_split, finalize_classifier
from detres.engine.train_loop import LossWindow, Trainer, TrainTask, sgd_update
from detres.models.backbones.weights import load_pretrained_backbone
from detres.models.build import build_classifier, classifier_kwargs_from_config

__all__ = ["ClassificationTask", "train_classifier"]


class ClassificationTask(TrainTask):
    """Cross-entropy SGD on the training folder's augmented crops, epoch by epoch (every draw seeded by
    (seed, epoch, image)); logs the loss and the training error of each batch."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: LRSchedule,
        amp: MixedPrecision,
        *,
        cfg: Config,
        train_set: ImageFolderDataset,
        val_set: Any,
        stats: ClsDataStats,
        model_args: dict[str, Any],
        device: torch.device,
    ) -> None:
        self.model, self.optimizer, self.schedule, self.amp = model, optimizer, schedule, amp
        self.cfg, self.train_set, self.val_set, self.stats = cfg, train_set, val_set, stats
        self.model_args, self.device = model_args, device
        self.iters_per_epoch = len(train_set) // cfg.solver.batch_size

    def batches(self, start_iter: int) -> Iterator[Any]:
        seeded = EpochSeededDataset(self.train_set, seed=self.cfg.seed)
        epoch, first_batch = divmod(start_iter, self.iters_per_epoch)
        while True:
            size, batch_size = len(self.train_set), self.cfg.solver.batch_size
            sampler = EpochBatchSampler(size, batch_size, seed=self.cfg.seed, epoch=epoch, start_batch=first_batch)
            loader = DataLoader(
                seeded, batch_sampler=shard_batches(sampler), num_workers=self.cfg.data.num_workers, pin_memory=False
            )
            yield from loader
            epoch, first_batch = epoch + 1, 0

    def step(self, trainer: Trainer, batch: Any) -> dict[str, float]:
        images, targets = batch[0].to(self.device), batch[1].to(self.device)
        with self.amp.autocast():
            logits = trainer.train_model(images)
            loss = F.cross_entropy(logits, targets)
        value = sgd_update(
            loss, self.optimizer, self.amp, iteration=trainer.global_iter, detail=lambda: f" (lr {trainer.lr})"
        )
        return {"loss": value, "train_err": (logits.argmax(1) != targets).float().mean().item()}

    def checkpoint_payload(self, trainer: Trainer) -> dict[str, Any]:
        payload = {
            "model": self.model.state_dict(),
            "model_args": self.model_args,
            "class_names": self.train_set.class_names,
            "data_stats": self.stats.to_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "iter": trainer.global_iter,
            "config": self.cfg.to_dict(),
            "bn_recomputed": False,
            # Per-iteration (loss, error) not yet averaged into a log line, so a resumed run logs the same values.
            "log_window": trainer.window.rows(["loss", "train_err"]),
            # Saved before this iteration's validation (so a failing evaluation loses no training): a resumed run
            # evaluates first, so the plateau schedule sees the same results as an uninterrupted run.
            "pending_eval": False,
        }
        return scaler_state_into(payload, self.amp)

    def train_record(self, trainer: Trainer, means: dict[str, float]) -> dict[str, Any]:
        epoch = (trainer.iter - 1) // self.iters_per_epoch  # the epoch of the step just made
        return {
            "iter": trainer.global_iter,
            "epoch": epoch,
            "lr": trainer.lr,
            "loss": means["loss"],
            "train_err": means["train_err"],
            "time": trainer.elapsed(),
        }

    def evaluate(self, iteration: int) -> dict[str, Any]:
        """The periodic validation (1-crop): the record fields of its metrics.jsonl line."""
        result = evaluate_split(self.model, self.val_set, self.cfg, self.stats, "1crop", self.device)
        return {"val_top1_err": result["top1_err"], "val_top5_err": result["top5_err"]}


def train_classifier(
    cfg: Config, *, resume: bool | str = False, resume_from: str | Path | None = None, allow_model_change: bool = False
) -> dict[str, Any]:
    """Train, evaluate (1-crop, 10-crop, multi-scale), recompute BN; returns the metrics it writes.

    Writes ``config.yaml``, ``metrics.jsonl`` (train and validation records), ``last.pt`` (for
    ``resume``), then ``model_final.pt``, ``metrics.json`` and ``curves.png``. ``resume=True``
    continues ``<output_dir>/last.pt`` exactly (same batches, augmentation and logged losses);
    without it an existing ``last.pt`` is never overwritten (FileExistsError). ``resume="auto"`` continues
    ``last.pt`` when there is one; ``resume_from`` continues an older kept checkpoint; changed ``model.*``
    options are refused on resume unless ``allow_model_change`` (:func:`detres.engine.run.setup.start_run`).
    An unreadable image raises ImageReadError naming the file, also when met in a loader worker.
    SIGINT / SIGTERM save ``last.pt`` after the current step and raise TrainingInterrupted; a non-finite loss or
    state stops training (FloatingPointError) with ``last.pt`` set to the last good checkpoint.
    """
    with distributed_run_guard(cfg), readable_worker_errors():  # torchrun: rank 0 holds the lock
        return _train_classifier(cfg, resume=resume, resume_from=resume_from, allow_model_change=allow_model_change)


def _plateau_min_iters(solver, num_train_images: int) -> int:
    """``solver.plateau_min_epochs`` in iterations (an epoch = num_train_images // batch_size)."""
    epochs = solver.get("plateau_min_epochs", 0.0) or 0.0
    if epochs < 0:
        raise ValueError(f"solver.plateau_min_epochs must be >= 0, got {epochs!r}")
    return epochs_to_iters(epochs, num_train_images, solver.batch_size)


def _build_model(cfg: Config, model_args: dict[str, Any], device: torch.device, *, fresh: bool) -> torch.nn.Module:
    model = build_classifier(**model_args)
    if cfg.bn_recompute.enabled and not any(
        isinstance(m, _BatchNorm) and m.running_mean is not None for m in model.modules()
    ):
        raise ValueError(f"model.arch={model_args['arch']} has no BatchNorm layers: set bn_recompute.enabled=false")
    if cfg.model.weights and fresh:
        load_pretrained_backbone(model, cfg.model.weights)
    if cfg.solver.get("sync_bn", False) and is_distributed():
        model = convert_sync_batchnorm(model, device)  # BN statistics over the global batch of all ranks
    return model.to(device)


def _train_classifier(
    cfg: Config, *, resume: bool | str, resume_from: str | Path | None, allow_model_change: bool
) -> dict[str, Any]:
    check_amp_dtype(cfg.solver.amp_dtype)  # before any output is written
    run = start_distributed_run(cfg, resume=resume, resume_from=resume_from, allow_model_change=allow_model_change)
    out, device, state = run.out, run.device, run.state

    train_set = ImageFolderDataset(cfg.data.train_dir)
    val_set = build_val_dataset(cfg, train_set.class_to_idx)
    check_cls_sets(train_set, val_set, cfg, out)  # every image header now, not at the first evaluation
    solver = cfg.solver
    if len(train_set) // solver.batch_size == 0:
        raise ValueError(
            f"{cfg.data.train_dir}: {len(train_set)} images, fewer than solver.batch_size={solver.batch_size}"
        )
    if state is not None:
        stats = ClsDataStats.from_dict(state["data_stats"])
    else:
        stats = compute_data_stats(train_set.paths, cfg)
    train_set.transform = build_train_transform(cfg, stats)

    model_args = classifier_kwargs_from_config(cfg.model, num_classes=len(train_set.class_names))
    model = _build_model(cfg, model_args, device, fresh=state is None)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=solver.base_lr, momentum=solver.momentum, weight_decay=solver.weight_decay
    )
    schedule = LRSchedule(
        optimizer,
        base_lr=solver.base_lr,
        mode=solver.lr_schedule,
        steps=solver.steps,
        gamma=solver.gamma,
        patience=solver.plateau_patience,
        threshold=solver.plateau_threshold,
        min_lr=solver.min_lr,
        warmup_iters=solver.warmup_iters,
        warmup_lr=solver.warmup_lr,
        min_iters_between_drops=_plateau_min_iters(solver, len(train_set)),
    )
    amp = mixed_precision_from_config(solver, device)
    window = LossWindow()
    if state is not None:
        load_model_state(model, state["model"], run.source)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        amp.load_state_dict(state.get(SCALER_KEY))  # absent in fp32 / older checkpoints: a fresh scaler
        window = LossWindow([{"loss": loss, "train_err": err} for loss, err in state.get("log_window", [])])
    task = ClassificationTask(
        model,
        optimizer,
        schedule,
        amp,
        cfg=cfg,
        train_set=train_set,
        val_set=val_set,
        stats=stats,
        model_args=model_args,
        device=device,
    )
    start_iter = run.start_iter
    logger = JsonLinesLogger(out / "metrics.jsonl", resume_from_iter=start_iter if state is not None else None)
    if state is None and getattr(val_set, "num_skipped", 0):
        logger.log(
            iter=0,
            val_images=len(val_set),
            val_skipped_unknown_class=val_set.num_skipped,
            val_skipped_classes=val_set.skipped_classes,
        )
    eval_hook = EvalHook(
        task.evaluate,
        logger,
        period=solver.eval_period,
        at_end=True,
        resumable=True,
        resume_pending=bool(state is not None and state.get("pending_eval")),
    )
    # A context manager so the bar is closed before an error message is printed below it.
    with progress_bar("train_cls", total=solver.max_iter, initial=start_iter) as progress:
        trainer = Trainer(
            task,
            max_iter=solver.max_iter,
            start_iter=start_iter,
            checkpoints=run.checkpoints,
            device=device,
            window=window,
            hooks=default_hooks(
                schedule,
                optimizer,
                logger,
                log_period=solver.log_period,
                checkpoint_period=solver.checkpoint_period,
                progress=progress,
                eval_hook=eval_hook,
                plateau_metric="val_top1_err",
            ),
        )
        iteration = trainer.run()
    return finalize_classifier(
        model,
        cfg,
        stats,
        train_set,
        val_set,
        model_args,
        device,
        out=out,
        train_time_s=trainer.elapsed(),
        iterations=iteration,
    )
