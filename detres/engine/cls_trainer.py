"""Classification pre-training (ResNet Sec. 3.4): the SGD loop, evaluation, resume and precise BN."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from detres.config.load import Config
from detres.data.cls_pipeline import (
    ClsDataStats,
    build_eval_transform,
    build_train_transform,
    build_val_dataset,
    compute_data_stats,
)
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
from detres.engine.checkpoint import Diverged
from detres.engine.distributed import (
    all_gather_objects,
    distributed_run_guard,
    is_distributed,
    is_main_process,
    mean_over_ranks,
    shard_batches,
    start_distributed_run,
    sum_over_ranks,
    wrap_ddp,
)
from detres.engine.logging import JsonLinesLogger, read_json_lines
from detres.engine.lr_schedule import LRSchedule, epochs_to_iters
from detres.engine.plots import plot_curves
from detres.engine.run_setup import load_model_state, stop_if_signalled
from detres.engine.seeded_data import EpochBatchSampler, EpochSeededDataset
from detres.engine.sync_bn import convert_sync_batchnorm
from detres.evaluation.classification import evaluate_classifier
from detres.models.backbones.frozen_bn import recompute_bn_statistics
from detres.models.backbones.weights import load_pretrained_backbone
from detres.models.build import build_classifier, classifier_kwargs_from_config
from detres.utils.atomic import write_json_atomic
from detres.utils.dist import finite_on_all_ranks, shard_indices
from detres.utils.torch_files import save_checkpoint


def _loader(dataset, batch_sampler, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers, pin_memory=False)


def _evaluate(model, dataset, cfg: Config, stats: ClsDataStats, mode: str, device) -> dict[str, float]:
    """Top-1/top-5 error of ``model`` on the validation folder with one test protocol
    (the dense multi-scale test scores windows of the training crop size). Under torchrun each rank tests
    every N-th image and the error counts are summed, so every rank gets the whole set's errors."""
    dataset.transform = build_eval_transform(cfg, stats, mode)
    part = Subset(dataset, shard_indices(len(dataset))) if is_distributed() else dataset
    result: dict[str, Any] = {"top1_err": 0.0, "top5_err": 0.0, "n": 0, "top5_k": 0}  # an empty shard
    if len(part):
        result = evaluate_classifier(
            model,
            part,
            mode=mode,
            scales=tuple(cfg.test.scales),
            device=device,
            batch_size=cfg.test.batch_size,
            num_workers=cfg.data.num_workers,
            crop=cfg.augment.crop,
        )
    if not is_distributed():
        return result
    n = result["n"]
    total = sum_over_ranks({"top1": round(result["top1_err"] * n), "top5": round(result["top5_err"] * n), "n": n})
    return {
        "top1_err": total["top1"] / total["n"],
        "top5_err": total["top5"] / total["n"],
        "n": int(total["n"]),
        "top5_k": max(all_gather_objects(result["top5_k"])),
    }


def _sgd_step(
    model, optimizer, images, targets, *, iteration: int, lr: float, amp: MixedPrecision
) -> tuple[float, float]:
    """One SGD step on a batch (forward + loss under ``amp``'s autocast); returns (loss, top-1 error) of the batch."""
    with amp.autocast():
        logits = model(images)
        loss = F.cross_entropy(logits, targets)
    if not finite_on_all_ranks(loss.item()):
        raise Diverged(
            f"iteration {iteration}: loss is {loss.item()} (lr {lr}); lower solver.base_lr", failed_from=iteration
        )
    optimizer.zero_grad(set_to_none=True)
    amp.backward_and_step(loss, optimizer)
    return loss.item(), (logits.argmax(1) != targets).float().mean().item()


def _checkpoint_payload(
    model,
    optimizer,
    schedule,
    iteration: int,
    model_args,
    stats,
    class_names,
    cfg,
    log_window: list[tuple[float, float]],
    amp: MixedPrecision | None = None,
    *,
    pending_eval: bool = False,
) -> dict:
    return scaler_state_into(
        {
            "model": model.state_dict(),
            "model_args": model_args,
            "class_names": class_names,
            "data_stats": stats.to_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "iter": iteration,
            "config": cfg.to_dict(),
            "bn_recomputed": False,
            # Per-iteration (loss, error) not yet averaged into a log line, so a resumed run logs the same values.
            "log_window": [list(w) for w in log_window],
            # Saved before this iteration's validation (so a failing evaluation loses no training): a resumed run
            # evaluates first, so the plateau schedule sees the same results as an uninterrupted run.
            "pending_eval": pending_eval,
        },
        amp,
    )


def train_classifier(
    cfg: Config, *, resume: bool | str = False, resume_from: str | Path | None = None, allow_model_change: bool = False
) -> dict[str, Any]:
    """Train, evaluate (1-crop, 10-crop, multi-scale), recompute BN; returns the metrics it writes.

    Writes ``config.yaml``, ``metrics.jsonl`` (train and validation records), ``last.pt`` (for
    ``resume``), then ``model_final.pt``, ``metrics.json`` and ``curves.png``. ``resume=True``
    continues ``<output_dir>/last.pt`` exactly (same batches, augmentation and logged losses);
    without it an existing ``last.pt`` is never overwritten (FileExistsError). ``resume="auto"`` continues
    ``last.pt`` when there is one; ``resume_from`` continues an older kept checkpoint; changed ``model.*``
    options are refused on resume unless ``allow_model_change`` (:func:`detres.engine.run_setup.start_run`).
    An unreadable image raises ImageReadError naming the file, also when met in a loader worker.
    SIGINT / SIGTERM save ``last.pt`` after the current step and raise TrainingInterrupted; a non-finite loss or
    state stops training (FloatingPointError) with ``last.pt`` set to the last good checkpoint.
    """
    with distributed_run_guard(cfg), readable_worker_errors():  # torchrun: rank 0 holds the lock
        return _train_classifier(cfg, resume=resume, resume_from=resume_from, allow_model_change=allow_model_change)


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
    iters_per_epoch = len(train_set) // solver.batch_size
    if iters_per_epoch == 0:
        raise ValueError(
            f"{cfg.data.train_dir}: {len(train_set)} images, fewer than solver.batch_size={solver.batch_size}"
        )
    if state is not None:
        stats = ClsDataStats.from_dict(state["data_stats"])
    else:
        stats = compute_data_stats(train_set.paths, cfg)
    train_set.transform = build_train_transform(cfg, stats)

    model_args = classifier_kwargs_from_config(cfg.model, num_classes=len(train_set.class_names))
    model = build_classifier(**model_args)
    if cfg.bn_recompute.enabled and not any(
        isinstance(m, _BatchNorm) and m.running_mean is not None for m in model.modules()
    ):
        raise ValueError(f"model.arch={model_args['arch']} has no BatchNorm layers: set bn_recompute.enabled=false")
    if cfg.model.weights and state is None:
        load_pretrained_backbone(model, cfg.model.weights)
    if cfg.solver.get("sync_bn", False) and is_distributed():
        model = convert_sync_batchnorm(model, device)  # BN statistics over the global batch of all ranks
    model.to(device)
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
    start_iter = 0
    if state is not None:
        load_model_state(model, state["model"], run.source)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        amp.load_state_dict(state.get(SCALER_KEY))  # absent in fp32 / older checkpoints: a fresh scaler
        start_iter = int(state["iter"])
    train_model = wrap_ddp(model, device)  # torchrun: DDP averages the gradients; `model` stays the plain module
    logger = JsonLinesLogger(out / "metrics.jsonl", resume_from_iter=start_iter if state is not None else None)
    if state is None and getattr(val_set, "num_skipped", 0):
        logger.log(
            iter=0,
            val_images=len(val_set),
            val_skipped_unknown_class=val_set.num_skipped,
            val_skipped_classes=val_set.skipped_classes,
        )

    def save(iteration: int, pending_eval: bool = False) -> Path:
        if not is_main_process():
            return run.last_path  # rank 0 writes; the ranks' weights are the same
        return run.checkpoints.save(
            _checkpoint_payload(
                model,
                optimizer,
                schedule,
                iteration,
                model_args,
                stats,
                train_set.class_names,
                cfg,
                window,
                amp,
                pending_eval=pending_eval,
            ),
            iteration,
        )

    def evaluate(iteration: int) -> None:
        result = _evaluate(model, val_set, cfg, stats, "1crop", device)
        dropped = schedule.observe_validation(result["top1_err"], iteration=iteration)
        logger.log(iter=iteration, val_top1_err=result["top1_err"], val_top5_err=result["top5_err"], lr_dropped=dropped)
        model.train()

    seeded = EpochSeededDataset(train_set, seed=cfg.seed)
    iteration = start_iter
    window: list[tuple[float, float]] = [] if state is None else [tuple(w) for w in state.get("log_window", [])]
    started = time.time()
    if state is not None and state.get("pending_eval"):
        evaluate(start_iter)  # the validation that followed this checkpoint (it may have failed)
    # A context manager so the bar is closed before an error message is printed below it.
    with (
        tqdm(
            total=solver.max_iter,
            initial=start_iter,
            desc="train_cls",
            dynamic_ncols=True,
            disable=not is_main_process(),
        ) as progress,
        run.checkpoints.stop_on_divergence(),
    ):
        while iteration < solver.max_iter:
            epoch, first_batch = divmod(iteration, iters_per_epoch)
            sampler = EpochBatchSampler(
                len(train_set), solver.batch_size, seed=cfg.seed, epoch=epoch, start_batch=first_batch
            )
            model.train()
            for images, targets in _loader(seeded, shard_batches(sampler), cfg.data.num_workers):
                lr = schedule.apply(iteration)
                window.append(
                    _sgd_step(
                        train_model,
                        optimizer,
                        images.to(device),
                        targets.to(device),
                        iteration=iteration,
                        lr=lr,
                        amp=amp,
                    )
                )
                run.checkpoints.note_loss(iteration, window[-1][0])
                iteration += 1
                progress.update(1)
                if iteration % solver.log_period == 0 or iteration == solver.max_iter:
                    loss_avg = sum(w[0] for w in window) / len(window)
                    err_avg = sum(w[1] for w in window) / len(window)
                    means = mean_over_ranks({"loss": loss_avg, "err": err_avg})  # over the global batch
                    loss_avg, err_avg = means["loss"], means["err"]
                    logger.log(
                        iter=iteration, epoch=epoch, lr=lr, loss=loss_avg, train_err=err_avg, time=time.time() - started
                    )
                    progress.set_postfix(loss=f"{loss_avg:.3f}", err=f"{err_avg:.3f}", lr=f"{lr:.2g}")
                    window.clear()
                eval_due = iteration % solver.eval_period == 0 or iteration == solver.max_iter
                if iteration % solver.checkpoint_period == 0 or iteration == solver.max_iter:
                    save(iteration, pending_eval=eval_due)  # before evaluating: a failing val set loses nothing
                if eval_due:
                    evaluate(iteration)
                stop_if_signalled(iteration, lambda: save(iteration))  # noqa: B023
                if iteration >= solver.max_iter:
                    break
    train_time = time.time() - started
    return finalize_classifier(
        model,
        cfg,
        stats,
        train_set,
        val_set,
        model_args,
        device,
        out=out,
        train_time_s=train_time,
        iterations=iteration,
    )


def _model_title(model_args) -> str:
    if model_args["arch"] in ("imagenet", "cifar"):
        return f"{model_args['arch']} ResNet-{model_args['depth']}"
    return {"vgg16": "VGG-16", "alexnet": "AlexNet"}.get(model_args["arch"], model_args["arch"])


def _plateau_min_iters(solver, num_train_images: int) -> int:
    """``solver.plateau_min_epochs`` in iterations (an epoch = num_train_images // batch_size)."""
    epochs = solver.get("plateau_min_epochs", 0.0) or 0.0
    if epochs < 0:
        raise ValueError(f"solver.plateau_min_epochs must be >= 0, got {epochs!r}")
    return epochs_to_iters(epochs, num_train_images, solver.batch_size)


def _bn_batch_size(num_images: int, batch_size: int) -> int:
    """Batch size for the BN pass: at most the set size, and never leaving a last batch of one image
    (a train-mode BN on a 1x1 map, e.g. conv5 of a small crop, cannot normalise a single value)."""
    size = max(1, min(batch_size, num_images))
    while size > 2 and num_images % size == 1:
        size -= 1
    return size


def finalize_classifier(
    model,
    cfg: Config,
    stats: ClsDataStats,
    train_set,
    val_set,
    model_args,
    device,
    *,
    out: Path,
    train_time_s: float,
    iterations: int,
) -> dict[str, Any]:
    """Evaluate, recompute BN statistics over the training set (Appendix A), evaluate again, save.

    The BN pass reads every training image once (no dropped last batch), with the training
    augmentation, so the statistics are those of the inputs the network was trained on.
    """
    metrics: dict[str, Any] = {
        "iterations": iterations,
        "train_time_s": round(train_time_s, 1),
        "num_classes": len(train_set.class_names),
        "train_images": len(train_set),
        "val_images": len(val_set),
        "model_args": model_args,
    }
    if cfg.data.get("val_labels"):
        metrics["val_skipped_unknown_class"] = val_set.num_skipped
    metrics["before_bn_recompute"] = {
        mode: _evaluate(model, val_set, cfg, stats, mode, device) for mode in cfg.test.modes
    }
    if cfg.bn_recompute.enabled:
        started = time.time()
        train_set.transform = build_train_transform(cfg, stats)
        batch_size = _bn_batch_size(len(train_set), cfg.bn_recompute.batch_size)
        loader = DataLoader(
            EpochSeededDataset(train_set, seed=cfg.seed + 1),
            batch_sampler=EpochBatchSampler(len(train_set), batch_size, seed=cfg.seed + 1, epoch=0, drop_last=False),
            num_workers=cfg.data.num_workers,
        )
        max_batches = None
        if cfg.bn_recompute.max_images is not None:
            max_batches = max(1, cfg.bn_recompute.max_images // batch_size)
        recompute_bn_statistics(model, (images.to(device) for images, _ in loader), num_batches=max_batches)
        metrics["bn_recompute_time_s"] = round(time.time() - started, 1)
    model.eval()
    after = {mode: _evaluate(model, val_set, cfg, stats, mode, device) for mode in cfg.test.modes}
    metrics["after_bn_recompute" if cfg.bn_recompute.enabled else "final"] = after
    if not is_main_process():
        return metrics  # every rank evaluated and recomputed BN alike; rank 0 writes
    save_checkpoint(
        out / "model_final.pt",
        {
            "model": model.state_dict(),
            "model_args": model_args,
            "class_names": train_set.class_names,
            "data_stats": stats.to_dict(),
            "bn_recomputed": bool(cfg.bn_recompute.enabled),
            "iter": iterations,
            "config": cfg.to_dict(),
        },
    )
    write_json_atomic(out / "metrics.json", metrics)
    records = read_json_lines(out / "metrics.jsonl")
    plot_curves(
        records,
        out / "curves.png",
        series=[("train_err", "train error (augmented crops)"), ("val_top1_err", "val top-1 error (1-crop)")],
        title=_model_title(model_args),
        ylabel="error",
        percent=True,
    )
    return metrics
