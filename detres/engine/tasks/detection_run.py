"""What the detection tasks (joint and 4-step alternating training) share within one run: config, folder, data,
the batch stream, the metrics log, checkpoints, AMP, the periodic evaluation and the one detection SGD step."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader

from detres.config.load import Config
from detres.data.build import dataset_class_names, dataset_label_to_category_id
from detres.data.collate import collate_detection
from detres.data.samplers import AspectRatioGroupedBatchSampler, InfiniteSampler, compute_aspect_ratio_groups
from detres.data.worker_errors import readable_worker_errors
from detres.engine.amp import MixedPrecision, mixed_precision_from_config
from detres.engine.distributed import is_main_process, shard_batches
from detres.engine.logging import JsonLinesLogger
from detres.engine.run.checkpoint import CheckpointManager, check_finite_payload
from detres.engine.seeded_data import IterationKeyedBatches, IterationSeededDataset
from detres.engine.train_loop import sgd_update_on_losses
from detres.evaluation.det_eval import evaluate_detection_dataset
from detres.inference.detect import run_inference
from detres.models.build import detector_state
from detres.utils.torch_files import save_checkpoint

__all__ = ["DetectionRun", "detection_sgd_step", "detection_train_loader", "detector_metadata"]


def detection_train_loader(
    dataset, cfg: Config, start_iter: int, *, images_per_batch: int | None = None, seed: int | None = None
) -> DataLoader:
    """An endless, seeded stream of batches that resumes at batch ``start_iter`` exactly.

    ``images_per_batch`` / ``seed`` default to ``solver.images_per_batch`` / ``cfg.seed`` (the
    alternating scheme gives each step its own batch size and stream).
    """
    batch = int(cfg.solver.images_per_batch if images_per_batch is None else images_per_batch)
    seed = int(cfg.seed if seed is None else seed)
    if cfg.solver.aspect_ratio_grouping:
        batches = AspectRatioGroupedBatchSampler(
            InfiniteSampler(len(dataset), seed=seed),
            compute_aspect_ratio_groups(dataset),
            batch,
            start_batch=start_iter,
        )
    else:
        batches = BatchSampler(
            InfiniteSampler(len(dataset), seed=seed, start=start_iter * batch), batch, drop_last=True
        )
    # Every draw (scale, flip, RPN / RoI sampling) of image i at iteration t is seeded by (seed, t, i).
    return DataLoader(
        IterationSeededDataset(dataset, seed=seed),
        batch_sampler=IterationKeyedBatches(shard_batches(batches), start_iter=start_iter),
        collate_fn=collate_detection,
        num_workers=cfg.data.num_workers,
        persistent_workers=cfg.data.num_workers > 0,
    )


def detector_metadata(dataset) -> dict[str, Any]:
    """What inference needs besides the weights and the config tree (whose ``input`` section holds the model's test
    scale): class names and category ids."""
    return {
        "class_names": dataset_class_names(dataset),
        "label_to_category_id": dataset_label_to_category_id(dataset),
    }


def detection_sgd_step(
    losses: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, amp: MixedPrecision, *, iteration: int
) -> dict[str, float]:
    """One SGD step on the sum of the detector's losses (a non-finite total names each loss)."""
    detail = lambda: f" ({ {k: round(v.item(), 4) for k, v in losses.items()} })"  # noqa: E731
    return sgd_update_on_losses(losses, optimizer, amp, iteration=iteration, detail=detail)


class DetectionRun:
    """What one detection training run shares between its loop(s): config, output paths, data, logging,
    checkpoints, AMP. The tasks (:mod:`detres.engine.tasks.detection`, :mod:`detres.engine.tasks.alternating`)
    own the model, the optimizer and the iteration count."""

    def __init__(
        self,
        cfg: Config,
        out: Path,
        last_path: Path,
        device: torch.device,
        train_set,
        val_set,
        meta: dict[str, Any],
        logger: JsonLinesLogger,
        *,
        checkpoints: CheckpointManager,
        model_changed: bool = False,
    ) -> None:
        self.cfg, self.out, self.last_path, self.device = cfg, out, last_path, device
        self.train_set, self.val_set, self.meta, self.logger = train_set, val_set, meta, logger
        self.checkpoints = checkpoints  # writes last.pt (+ the kept copies), knows the last good one
        self.model_changed = model_changed  # resumed with --allow-model-change: build the model from the config
        self.amp = mixed_precision_from_config(cfg.solver, device)  # one per run: warns once, one scaler
        self.started = time.time()

    def loader(self, start_iter: int, *, images_per_batch: int | None = None, seed: int | None = None) -> DataLoader:
        return detection_train_loader(
            self.train_set, self.cfg, start_iter, images_per_batch=images_per_batch, seed=seed
        )

    def payload(self, model: torch.nn.Module, iteration: int, **extra: Any) -> dict:
        """A train_det checkpoint: the detector record (weights, the config tree it is rebuilt from, metadata), the
        iteration and the training scheme."""
        return {
            **detector_state(model, config=self.cfg, meta=self.meta),
            "iter": iteration,
            "scheme": self.cfg.solver.training_scheme,
            **extra,
        }

    def save_file(self, path: Path, payload: dict[str, Any], iteration: int) -> Path:
        """Write a checkpoint other than last.pt (``model_final.pt``, ``stepN_*.pt``); a non-finite state is
        refused (Diverged). Only rank 0 of a distributed run writes (the others' weights are the same)."""
        if is_main_process():
            check_finite_payload(payload, iteration, Path(path))
            save_checkpoint(path, payload)
        return Path(path)

    def evaluate(self, model: torch.nn.Module, iteration: int) -> dict[str, Any]:
        """The periodic validation: COCO AP / AP50 and VOC mAP of ``model`` (on rank 0; {} on the others)."""
        cfg = self.cfg
        with readable_worker_errors():  # a bad val image: one line naming it, not a worker traceback
            dets = run_inference(
                model,
                self.val_set,
                device=self.device,
                batch_size=cfg.solver.images_per_batch,
                num_workers=cfg.data.num_workers,
                amp=cfg.test.amp,
            )
        if not is_main_process():
            return {}  # every rank detected on its shard; rank 0 scores the gathered detections
        result = evaluate_detection_dataset(
            self.val_set,
            dets,
            iou_thresh_voc=cfg.test.iou_thresh_voc,
            use_07_metric=cfg.test.use_07_metric,
            coco_backend=cfg.test.coco_backend,
        )
        summary = result["coco"]["summary"]
        return {"AP": summary["AP"], "AP50": summary["AP50"], "voc_mAP": result["voc"]["mAP"]}
