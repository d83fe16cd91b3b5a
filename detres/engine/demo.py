"""The README's main job on built-in data: shapes world → train_cls → precise BN → train_det → metrics."""
from __future__ import annotations

import shutil
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from detres.config.load import load_config
from detres.data.build import build_detection_dataset, dataset_label_to_category_id
from detres.data.synthetic import generate_shapes_world
from detres.engine.cls_trainer import train_classifier
from detres.engine.det_trainer import train_detector
from detres.engine.plots import save_pr_curves
from detres.evaluation.results_io import load_coco_results
from detres.utils.atomic import write_json_atomic

CLS_CONFIG = "configs/cls/shapes_r18.yaml"
DET_CONFIG = "configs/det/shapes_r18.yaml"


def run_demo(out: str | Path, *, data_root: str | Path = "data_toy", repo_root: str | Path = ".",
             overwrite: bool = False, seed: int = 0) -> dict[str, Any]:
    """Generate the data, pre-train ResNet-18, recompute BN, train and evaluate the detector."""
    out, data_root, repo_root = Path(out), Path(data_root), Path(repo_root)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite to replace this demo run")
        shutil.rmtree(out)
    started = time.time()
    paths = generate_shapes_world(data_root, seed=seed)
    cls_cfg = load_config(repo_root / CLS_CONFIG, [
        f"output_dir={out / 'cls'}", f"data.train_dir={paths['cls_train']}", f"data.val_dir={paths['cls_val']}",
        f"seed={seed}"])
    cls_metrics = train_classifier(cls_cfg)
    det_cfg = load_config(repo_root / DET_CONFIG, [
        f"output_dir={out / 'det'}", f"model.weights={out / 'cls' / 'model_final.pt'}",
        f"data.train_images={paths['det_images']}", f"data.train_ann={paths['det_coco_train']}",
        f"data.val_images={paths['det_images']}", f"data.val_ann={paths['det_coco_val']}", f"seed={seed}"])
    det_metrics = train_detector(det_cfg)
    pr_png = write_demo_pr_curves(det_cfg, out / "det" / "test", det_metrics["voc"]["per_class"])
    summary = {
        "classification": {"val_errors_after_bn_recompute": cls_metrics.get("after_bn_recompute"),
                           "train_time_s": cls_metrics["train_time_s"]},
        "detection": {"coco": det_metrics["coco"]["summary"], "voc07_mAP": det_metrics["voc"]["mAP"],
                      "voc_per_class": det_metrics["voc"]["per_class"], "train_time_s": det_metrics["train_time_s"]},
        "total_time_s": round(time.time() - started, 1),
        "outputs": {"cls": str(out / "cls"), "det": str(out / "det"),
                    "detection_pngs": str(out / "det" / "test" / "vis"), "pr_curves": str(pr_png)},
    }
    write_json_atomic(out / "summary.json", summary)
    return summary


def detections_from_coco_results(results: Sequence[Mapping[str, Any]], dataset: Any) -> list[dict[str, Any]]:
    """Per-image detection dicts (xyxy, contiguous labels) back from a COCO results list, in dataset order.

    The inverse of detections_to_coco_results: within an image and class the entries keep their order,
    so the VOC evaluation of the result is the one of the original detections.
    """
    label_of = {cat: label for label, cat in dataset_label_to_category_id(dataset).items()}
    ids = [dataset.annotation(i)["image_id"] for i in range(len(dataset))]
    per_image: dict[Any, list[Mapping[str, Any]]] = {image_id: [] for image_id in ids}
    for entry in results:
        per_image[entry["image_id"]].append(entry)
    dets = []
    for image_id, entries in per_image.items():
        boxes = np.asarray([[x, y, x + w, y + h] for x, y, w, h in (e["bbox"] for e in entries)], np.float64)
        dets.append({"image_id": image_id, "boxes": boxes.reshape(-1, 4),
                     "scores": np.asarray([e["score"] for e in entries], np.float64),
                     "labels": np.asarray([label_of[int(e["category_id"])] for e in entries], np.int64)})
    return dets


def write_demo_pr_curves(det_cfg: Any, test_dir: Path, reported_ap: Mapping[str, float]) -> Path:
    """``test_dir/pr_curves.png`` from the written ``coco_results.json`` unless the test step wrote it already;
    warns if an AP of the plotted curves differs from the one the evaluation reported."""
    png = test_dir / "pr_curves.png"
    if png.exists():
        return png
    dataset = build_detection_dataset(det_cfg, "val", train=False)
    dets = detections_from_coco_results(load_coco_results(test_dir / "coco_results.json")[0], dataset)
    curves = save_pr_curves(dataset, dets, png, iou_thresh=det_cfg.test.iou_thresh_voc,
                            use_07_metric=det_cfg.test.use_07_metric)
    differ = [n for n, c in curves.items() if not np.isclose(c["ap"], reported_ap.get(n, np.nan), equal_nan=True)]
    if differ:
        warnings.warn(f"{png}: the PR curves' AP differs from metrics.json for {differ}", stacklevel=2)
    return png
