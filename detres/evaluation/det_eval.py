"""Evaluate a detector's outputs on a detection dataset with both COCO AP (pycocotools) and VOC mAP."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from detres.data.build import dataset_class_names, dataset_label_to_category_id
from detres.evaluation.coco import evaluate_coco_detections
from detres.evaluation.voc import evaluate_voc_detections


def dataset_ground_truth(dataset: Any) -> dict[Any, dict[str, np.ndarray]]:
    """image_id → {boxes (original pixels, 0-based xyxy), labels 1..K, difficult} from the annotations."""
    out = {}
    for index in range(len(dataset)):
        ann = dataset.annotation(index)
        out[ann["image_id"]] = {"boxes": ann["boxes"], "labels": ann["labels"], "difficult": ann["difficult"]}
    return out


def dataset_to_coco_gt(dataset: Any) -> dict[str, Any]:
    """A COCO ground-truth dict for datasets without one (VOC); difficult objects become crowd regions.

    COCOeval ignores crowd regions the way the VOC devkit ignores difficult objects: a detection
    on them is neither a true nor a false positive.
    """
    images, annotations = [], []
    for index in range(len(dataset)):
        ann = dataset.annotation(index)
        h, w = ann["orig_size"]
        images.append({"id": ann["image_id"], "height": int(h), "width": int(w), "file_name": str(ann["file_name"])})
        for box, label, difficult in zip(ann["boxes"], ann["labels"], ann["difficult"]):
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append({"id": len(annotations) + 1, "image_id": ann["image_id"], "category_id": int(label),
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                "iscrowd": int(bool(difficult))})
    categories = [{"id": int(c["id"]), "name": str(c["name"])} for c in dataset.categories]
    return {"images": images, "annotations": annotations, "categories": categories}


def evaluate_detection_dataset(
    dataset: Any,
    detections: Sequence[Mapping[str, Any]],
    *,
    iou_thresh_voc: float = 0.5,
    use_07_metric: bool = True,
) -> dict[str, Any]:
    """{"coco": 12 summary numbers + per-category AP, "voc": mAP + per-class AP} for ``detections``.

    ``detections``: per image ``{"image_id", "boxes", "scores", "labels"}`` in original image pixels.
    """
    coco_gt = getattr(dataset, "coco", None)
    gt = coco_gt if coco_gt is not None else dataset_to_coco_gt(dataset)
    coco = evaluate_coco_detections(gt, detections, dataset_label_to_category_id(dataset))
    voc = evaluate_voc_detections(detections, dataset_ground_truth(dataset), dataset_class_names(dataset),
                                  iou_thresh=iou_thresh_voc, use_07_metric=use_07_metric)
    coco.pop("summary_text", None)
    return {"coco": coco, "voc": voc}
