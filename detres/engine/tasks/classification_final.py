"""The end of a classification run (ResNet Sec. 3.4, Appendix A): evaluation in every test mode, BN statistics
recomputed over the training set, ``model_final.pt``, ``metrics.json`` and the curves; and the validation pass the
training loop runs periodically."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Subset

from detres.config.load import Config
from detres.data.cls_pipeline import ClsDataStats, build_eval_transform, build_train_transform
from detres.engine.distributed import all_gather_objects, is_distributed, is_main_process, sum_over_ranks
from detres.engine.logging import read_json_lines
from detres.engine.plots import plot_curves
from detres.engine.seeded_data import EpochBatchSampler, EpochSeededDataset
from detres.evaluation.classification import evaluate_classifier
from detres.models.backbones.frozen_bn import recompute_bn_statistics
from detres.utils.atomic import write_json_atomic
from detres.utils.dist import shard_indices
from detres.utils.torch_files import save_checkpoint

__all__ = ["evaluate_split", "finalize_classifier"]


def evaluate_split(model, dataset, cfg: Config, stats: ClsDataStats, mode: str, device) -> dict[str, float]:
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


def _model_title(model_args) -> str:
    if model_args["arch"] in ("imagenet", "cifar"):
        return f"{model_args['arch']} ResNet-{model_args['depth']}"
    return {"vgg16": "VGG-16", "alexnet": "AlexNet"}.get(model_args["arch"], model_args["arch"])


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
        mode: evaluate_split(model, val_set, cfg, stats, mode, device) for mode in cfg.test.modes
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
    after = {mode: evaluate_split(model, val_set, cfg, stats, mode, device) for mode in cfg.test.modes}
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
