"""Dataset-level testing of a detector: detect, score (COCO and VOC), and write the results files and figures."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from detres.config.load import Config
from detres.engine.distributed import is_main_process
from detres.engine.plots import save_pr_curves
from detres.evaluation.det_eval import dataset_to_coco_gt, evaluate_detection_dataset
from detres.evaluation.results_io import detections_to_coco_results, write_coco_results, write_voc_results
from detres.inference.detect import run_inference
from detres.inference.test_config import TestConfig
from detres.inference.visualize import save_detection_pngs
from detres.utils.atomic import write_json_atomic

__all__ = ["test_detector"]


def test_detector(
    model: torch.nn.Module | Sequence[torch.nn.Module],
    dataset,
    meta: dict[str, Any],
    cfg: Config,
    *,
    out_dir: Path,
    device,
    options: TestConfig | None = None,
) -> dict[str, Any]:
    """Detect on ``dataset``; write COCO results JSON and the COCO ground truth they were scored against,
    VOC devkit files, per-class precision-recall curves, metrics and example PNGs.

    ``model``: one detector or the members of an ensemble; ``options``: the Appendix-B test-time extras
    (None = ``TestConfig.from_config(cfg)``).

    ``coco_gt.json`` is the ground truth ``metrics.json``'s COCO AP was computed on (the boxes as the
    dataset loaded them, crowd / difficult regions as ``iscrowd``), so
    ``tools/eval_det.py coco --gt coco_gt.json --results coco_results.json`` reproduces it exactly.
    """
    out_dir = Path(out_dir)
    dets = run_inference(
        model,
        dataset,
        device=device,
        batch_size=cfg.solver.images_per_batch,
        num_workers=cfg.data.num_workers,
        amp=cfg.test.amp,
        options=TestConfig.from_config(cfg) if options is None else options,
    )
    if not is_main_process():
        return {}  # sharded detection done; rank 0 scores the gathered detections and writes the files
    metrics = evaluate_detection_dataset(
        dataset,
        dets,
        iou_thresh_voc=cfg.test.iou_thresh_voc,
        use_07_metric=cfg.test.use_07_metric,
        coco_backend=cfg.test.coco_backend,
    )
    write_coco_results(detections_to_coco_results(dets, meta["label_to_category_id"]), out_dir / "coco_results.json")
    write_json_atomic(out_dir / "coco_gt.json", dataset_to_coco_gt(dataset), indent=None)
    # VOC datasets name images by string ids; COCO ones by their numeric id.
    write_voc_results(
        dets,
        meta["class_names"],
        getattr(dataset, "image_ids", None),
        str(out_dir / "voc" / "comp4_det_test_{cls}.txt"),
    )
    save_pr_curves(
        dataset,
        dets,
        out_dir / "pr_curves.png",
        iou_thresh=cfg.test.iou_thresh_voc,
        use_07_metric=cfg.test.use_07_metric,
    )
    save_detection_pngs(
        dataset,
        dets,
        meta["class_names"],
        out_dir / "vis",
        count=cfg.test.vis_images,
        score_thresh=cfg.test.vis_score_thresh,
    )
    write_json_atomic(out_dir / "metrics.json", metrics)
    return metrics
