"""Evaluate a detector's outputs on a detection dataset with both COCO AP (pycocotools) and VOC mAP."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from detres.data.build import dataset_class_names, dataset_label_to_category_id
from detres.evaluation.coco import evaluate_coco_detections
from detres.evaluation.voc import evaluate_voc_detections


def evaluation_records(dataset: Any) -> list[dict[str, Any]]:
    """Per image, the ground truth both metrics score against, as the dataset loaded it.

    ``{"image_id", "orig_size", "file_name", "boxes" [N, 4] float64 xyxy in original pixels, "labels"
    [N] 1..K, "iscrowd" [N] bool, "area" [N]}``: the boxes after the dataset's own cleaning (clipping,
    dropped degenerate boxes), never the raw annotation file, so a box the detector never trained on is
    not scored either. A dataset with ``evaluation_ground_truth(index)`` (COCO: targets plus crowd
    regions, the file's areas) supplies it; otherwise ``annotation(index)`` does, its difficult objects
    becoming crowd regions and the area being the box's w*h.
    """
    records = []
    own = getattr(dataset, "evaluation_ground_truth", None)
    for index in range(len(dataset)):
        if own is not None:
            rec = own(index)
        else:
            ann = dataset.annotation(index)
            boxes = np.asarray(ann["boxes"], dtype=np.float64).reshape(-1, 4)
            rec = {
                "image_id": ann["image_id"],
                "orig_size": ann["orig_size"],
                "file_name": ann["file_name"],
                "boxes": boxes,
                "labels": np.asarray(ann["labels"], dtype=np.int64).reshape(-1),
                "iscrowd": np.asarray(ann["difficult"], dtype=bool).reshape(-1),
                "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
            }
        records.append(rec)
    return records


def dataset_ground_truth(dataset: Any) -> dict[Any, dict[str, np.ndarray]]:
    """image_id → {boxes (original pixels, 0-based xyxy), labels 1..K, difficult}: the VOC metric's ground
    truth, from :func:`evaluation_records`.

    COCO crowd regions are included as difficult objects, so the VOC metric ignores detections on
    them exactly as COCOeval does (they are left out of the training targets).
    """
    return {
        rec["image_id"]: {"boxes": rec["boxes"], "labels": rec["labels"], "difficult": rec["iscrowd"]}
        for rec in evaluation_records(dataset)
    }


def dataset_to_coco_gt(dataset: Any) -> dict[str, Any]:
    """The COCO ground-truth dict COCO AP is computed on, for any detection dataset (COCO or VOC).

    Built from :func:`evaluation_records` (the boxes as loaded, in original pixels), so COCO AP and VOC
    mAP see the same ground truth. Categories are the dataset's own ids (COCO category ids; the label for
    VOC). Difficult objects (VOC) and crowd regions (COCO) become ``iscrowd`` regions: COCOeval ignores
    them the way the VOC devkit ignores difficult objects, a detection on them being neither a true nor
    a false positive. Annotation ids are numbered afresh 1..N: pycocotools needs them unique, and an
    annotation file's own ids may repeat (e.g. after merging files).
    """
    to_category = dataset_label_to_category_id(dataset)
    images, annotations = [], []
    for rec in evaluation_records(dataset):
        h, w = rec["orig_size"]
        images.append({"id": rec["image_id"], "height": int(h), "width": int(w), "file_name": str(rec["file_name"])})
        for box, label, crowd, area in zip(rec["boxes"], rec["labels"], rec["iscrowd"], rec["area"]):
            x1, y1, x2, y2 = (float(v) for v in box)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": rec["image_id"],
                    "category_id": to_category[int(label)],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": float(area),
                    "iscrowd": int(bool(crowd)),
                }
            )
    categories = [{"id": int(c["id"]), "name": str(c["name"])} for c in dataset.categories]
    return {"images": images, "annotations": annotations, "categories": categories}


def evaluate_detection_dataset(
    dataset: Any,
    detections: Sequence[Mapping[str, Any]],
    *,
    iou_thresh_voc: float = 0.5,
    use_07_metric: bool = True,
    coco_backend: str = "pycocotools",
) -> dict[str, Any]:
    """{"coco": 12 summary numbers + per-category AP, "voc": mAP + per-class AP} for ``detections``.

    ``detections``: per image ``{"image_id", "boxes", "scores", "labels"}`` in original image pixels.
    Both metrics score against the same ground truth, the dataset's loaded boxes and crowd/difficult
    regions (:func:`dataset_to_coco_gt`, :func:`dataset_ground_truth`), not the raw annotation file.
    ``coco_backend``: the library computing COCO AP ("pycocotools" or "faster_coco_eval", config ``test.coco_backend``).
    """
    coco = evaluate_coco_detections(
        dataset_to_coco_gt(dataset), detections, dataset_label_to_category_id(dataset), backend=coco_backend
    )
    voc = evaluate_voc_detections(
        detections,
        dataset_ground_truth(dataset),
        dataset_class_names(dataset),
        iou_thresh=iou_thresh_voc,
        use_07_metric=use_07_metric,
    )
    coco.pop("summary_text", None)
    return {"coco": coco, "voc": voc}
