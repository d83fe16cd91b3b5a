"""Evaluate a detector's outputs on a detection dataset with both COCO AP (pycocotools) and VOC mAP."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from detres.data.build import dataset_class_names, dataset_label_to_category_id
from detres.evaluation.coco import evaluate_coco_detections
from detres.evaluation.voc import evaluate_voc_detections


def _coco_crowd_regions(dataset: Any, image_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Crowd boxes (xyxy) and labels of one image of a COCO dataset (none for other datasets)."""
    coco = getattr(dataset, "coco", None)
    if coco is None:
        return np.zeros((0, 4), dtype=np.float32), np.zeros(0, dtype=np.int64)
    crowd = [a for a in coco.imgToAnns.get(image_id, []) if a.get("iscrowd", 0)]
    boxes = np.asarray([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                        for a in crowd], dtype=np.float32).reshape(-1, 4)
    labels = np.asarray([dataset.category_id_to_label[int(a["category_id"])] for a in crowd], dtype=np.int64)
    return boxes, labels


def dataset_ground_truth(dataset: Any) -> dict[Any, dict[str, np.ndarray]]:
    """image_id → {boxes (original pixels, 0-based xyxy), labels 1..K, difficult} from the annotations.

    COCO crowd regions are included as difficult objects, so the VOC metric ignores detections on
    them exactly as COCOeval does (they are left out of the training targets).
    """
    out = {}
    for index in range(len(dataset)):
        ann = dataset.annotation(index)
        crowd_boxes, crowd_labels = _coco_crowd_regions(dataset, ann["image_id"])
        out[ann["image_id"]] = {
            "boxes": np.concatenate([ann["boxes"].reshape(-1, 4), crowd_boxes]),
            "labels": np.concatenate([ann["labels"], crowd_labels]),
            "difficult": np.concatenate([ann["difficult"], np.ones(len(crowd_labels), dtype=bool)]),
        }
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
