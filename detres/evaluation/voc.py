"""PASCAL VOC detection AP following the official devkit (VOCevaldet / VOCap, VOC2007 11-point option).

Devkit rules implemented here, checked against the MATLAB VOCdevkit ``VOCevaldet.m``:

* IoU with "+1" pixel widths on 1-based inclusive boxes. All boxes in memory are 0-based continuous
  (contracts): a devkit box (x1, y1, x2, y2) is (x1 - 1, y1 - 1, x2, y2), and the plain continuous IoU
  of converted boxes (torchvision ``box_iou``) equals the devkit's ``+1`` IoU exactly.
* A detection is matched to the ground-truth box of its image with the largest IoU (the first one on
  ties, as the devkit's strict ``ov > ovmax``), over all boxes of the class including difficult and
  already-matched ones; boxes that do not overlap at all are never matched.
* Match when ``IoU >= threshold``: the MATLAB devkit tests ``ovmax >= VOCopts.minoverlap``. (The Python
  port in py-faster-rcnn's ``voc_eval.py`` uses ``>``; we follow the official MATLAB code and the
  "IoU >= threshold" wording; the two differ only for an IoU exactly equal to the threshold.)
* Matched difficult box: neither TP nor FP. Matched box already taken: FP (duplicate). No match: FP.
  ``npos`` counts non-difficult boxes only.
* Detections are ranked by decreasing score with a stable sort (MATLAB's ``sort`` is stable), so equal
  scores keep their input order and results are reproducible.
* AP: VOC2010+ area under the interpolated (monotone) precision envelope at every recall change
  (``VOCap.m``), or with ``use_07_metric`` the VOC2007 mean of max precision at recall >= t for
  t = 0, 0.1, ..., 1. Thresholds are computed as k / 10 so a recall of exactly 0.3 counts at t = 0.3
  (``np.arange(0, 1.1, 0.1)`` would make that t = 0.30000000000000004).
* Precision where TP + FP = 0 (only difficult matches so far) is taken as 0; the devkit gives NaN there,
  which its ``max`` ignores, so AP is identical.
* A class without non-difficult ground truth has undefined AP (the devkit divides by npos = 0): reported
  as NaN with a warning and left out of the mAP.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_iou

from detres.data.datasets.voc_xml import parse_voc_xml
from detres.evaluation.results_io import CLASS_PLACEHOLDER, as_numpy, iter_detections, read_voc_results
from detres.structures.boxes import voc_to_xyxy

__all__ = [
    "evaluate_voc",
    "evaluate_voc_class",
    "evaluate_voc_detections",
    "load_voc_annotations",
    "voc_ap",
    "voc_ground_truth",
    "voc_mean_ap",
    "voc_pr_curves",
]

GroundTruth = Mapping[Hashable, Mapping[str, Any]]


def voc_ap(
    recall: Sequence[float] | np.ndarray, precision: Sequence[float] | np.ndarray, use_07_metric: bool = False
) -> float:
    """Average precision from a ranked list's recall/precision arrays (same length, in rank order).

    ``use_07_metric=False``: VOC2010+ area under the precision envelope (all recall points);
    ``True``: VOC2007 11-point interpolated AP. An empty list gives 0; NaN recall (no positives) gives NaN.
    """
    rec = np.asarray(recall, dtype=np.float64).reshape(-1)
    prec = np.asarray(precision, dtype=np.float64).reshape(-1)
    if rec.shape != prec.shape:
        raise ValueError(f"recall and precision must have the same length, got {rec.size} and {prec.size}")
    if np.isnan(rec).any():
        return float("nan")
    if use_07_metric:
        ap = 0.0
        for t in np.arange(11) / 10.0:
            above = prec[rec >= t]
            ap += (above.max() if above.size else 0.0) / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    # Envelope: precision at each point becomes the best precision at any higher recall.
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    changes = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    return float(np.sum((mrec[changes] - mrec[changes - 1]) * mpre[changes]))


def _gt_arrays(gts: Mapping[Hashable, Sequence[tuple[Any, bool]]]) -> dict[Hashable, tuple[torch.Tensor, np.ndarray]]:
    """Per image: ground-truth boxes as a float64 tensor [M,4] and difficult flags [M]."""
    out = {}
    for image_id, objects in gts.items():
        boxes = np.asarray([box for box, _ in objects], dtype=np.float64).reshape(-1, 4)
        difficult = np.asarray([bool(d) for _, d in objects], dtype=bool)
        if not np.isfinite(boxes).all():
            raise ValueError(f"ground truth for image {image_id!r}: boxes must be finite")
        out[image_id] = (torch.from_numpy(boxes), difficult)
    return out


def evaluate_voc_class(
    gts: Mapping[Hashable, Sequence[tuple[Any, bool]]],
    dets: Sequence[tuple[Hashable, float, Any]],
    iou_thresh: float = 0.5,
    use_07_metric: bool = False,
) -> dict[str, Any]:
    """Devkit evaluation of one class.

    ``gts``: image_id -> list of (box, difficult); ``dets``: list of (image_id, score, box), in input
    order (ties keep it). Boxes are xyxy 0-based continuous (see module docstring for the devkit
    equivalence). A detection on an image absent from ``gts`` has nothing to match and is an FP.
    Returns ``dict(ap, precision, recall, tp, fp, npos)``; the arrays are in rank order, tp/fp are 0/1
    per detection (both 0 for a detection matched to a difficult box).
    """
    if not 0.0 < iou_thresh <= 1.0:
        raise ValueError(f"iou_thresh must be in (0, 1], got {iou_thresh}")
    gt = _gt_arrays(gts)
    npos = int(sum(int((~difficult).sum()) for _, difficult in gt.values()))
    n = len(dets)
    scores = np.asarray([float(d[1]) for d in dets], dtype=np.float64)
    det_boxes = np.asarray([d[2] for d in dets], dtype=np.float64).reshape(n, 4)
    if not (np.isfinite(scores).all() and np.isfinite(det_boxes).all()):
        raise ValueError("detections: scores and boxes must be finite (found NaN or inf)")

    # Best-overlapping ground truth per detection; it does not depend on matching state (as in the devkit).
    best_gt = np.full(n, -1, dtype=np.int64)
    best_iou = np.zeros(n, dtype=np.float64)
    by_image: dict[Hashable, list[int]] = {}
    for k, det in enumerate(dets):
        by_image.setdefault(det[0], []).append(k)
    for image_id, idx in by_image.items():
        if image_id not in gt or gt[image_id][0].shape[0] == 0:
            continue
        iou = box_iou(torch.from_numpy(det_boxes[idx]), gt[image_id][0]).numpy()
        iou = np.nan_to_num(iou, nan=0.0)  # 0/0 for two empty boxes: no overlap, as the devkit's iw>0 test
        best_gt[idx] = iou.argmax(axis=1)  # first maximum, like the devkit's strict ov > ovmax
        best_iou[idx] = iou.max(axis=1)

    order = np.argsort(-scores, kind="stable")
    tp = np.zeros(n, dtype=np.float64)
    fp = np.zeros(n, dtype=np.float64)
    taken = {image_id: np.zeros(len(difficult), dtype=bool) for image_id, (_, difficult) in gt.items()}
    for rank, k in enumerate(order):
        image_id = dets[k][0]
        j = best_gt[k]
        if j >= 0 and best_iou[k] > 0.0 and best_iou[k] >= iou_thresh:
            if gt[image_id][1][j]:
                continue  # difficult: neither TP nor FP
            if taken[image_id][j]:
                fp[rank] = 1.0  # duplicate detection of an already matched box
            else:
                tp[rank] = 1.0
                taken[image_id][j] = True
        else:
            fp[rank] = 1.0
    ctp, cfp = np.cumsum(tp), np.cumsum(fp)
    recall = ctp / npos if npos > 0 else np.full(n, np.nan)
    precision = np.divide(ctp, ctp + cfp, out=np.zeros(n), where=(ctp + cfp) > 0)
    ap = voc_ap(recall, precision, use_07_metric) if npos > 0 else float("nan")
    return {"ap": ap, "precision": precision, "recall": recall, "tp": tp, "fp": fp, "npos": npos}


def voc_mean_ap(per_class_ap: Mapping[str, float]) -> float:
    """Mean of the defined (non-NaN) class APs; NaN when no class has one."""
    values = [v for v in per_class_ap.values() if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def _read_image_set(image_set: str | os.PathLike) -> list[str]:
    """Image ids from an ImageSets file (first token per line; per-class files' second column is ignored)."""
    path = Path(image_set)
    if not path.is_file():
        raise FileNotFoundError(f"image set file not found: {path}")
    with open(path, encoding="utf-8") as handle:
        ids = [line.split()[0] for line in handle if line.strip()]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: image ids are repeated")
    return ids


def load_voc_annotations(
    annotations_dir: str | os.PathLike, image_set: str | os.PathLike | Sequence[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Parse ``<annotations_dir>/<id>.xml`` for every id of the image set (a file or a list of ids),
    or for every XML file in the folder when ``image_set`` is None; returns id -> parse_voc_xml record."""
    folder = Path(annotations_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"annotations folder not found: {folder}")
    if image_set is None:
        ids = sorted(p.stem for p in folder.glob("*.xml"))
        if not ids:
            raise FileNotFoundError(f"no *.xml annotation files in {folder}")
    elif isinstance(image_set, (str, os.PathLike)):
        ids = _read_image_set(image_set)
    else:
        ids = [str(i) for i in image_set]
    records = {}
    for image_id in ids:
        xml = folder / f"{image_id}.xml"
        if not xml.is_file():
            raise FileNotFoundError(f"annotation file for image {image_id!r} not found: {xml}")
        records[image_id] = parse_voc_xml(xml)
    return records


def voc_ground_truth(
    records: Mapping[Hashable, Mapping[str, Any]], class_names: Sequence[str]
) -> dict[Hashable, dict[str, np.ndarray]]:
    """Turn parse_voc_xml records into the in-memory ground truth used by evaluate_voc_detections:
    image_id -> {"boxes" [M,4] 0-based continuous, "labels" [M] 1..K, "difficult" [M]}; objects of
    classes not in ``class_names`` are dropped."""
    label_of = {name: k + 1 for k, name in enumerate(class_names)}
    out = {}
    for image_id, record in records.items():
        objects = [o for o in record["objects"] if o["name"] in label_of]
        boxes = voc_to_xyxy(torch.tensor([o["bbox"] for o in objects], dtype=torch.float64).reshape(-1, 4)).numpy()
        out[image_id] = {
            "boxes": boxes,
            "labels": np.asarray([label_of[o["name"]] for o in objects], dtype=np.int64),
            "difficult": np.asarray([o["difficult"] for o in objects], dtype=bool),
        }
    return out


def _class_gts(ground_truth: GroundTruth, num_classes: int) -> list[dict[Hashable, list[tuple[np.ndarray, bool]]]]:
    """Split the per-image ground truth into per-class dicts image_id -> [(box, difficult)]."""
    per_class: list[dict[Hashable, list[tuple[np.ndarray, bool]]]] = [{} for _ in range(num_classes)]
    for image_id, entry in ground_truth.items():
        for key in ("boxes", "labels"):
            if key not in entry:
                raise ValueError(f"ground truth for image {image_id!r}: missing key {key!r}")
        where = f"ground truth for image {image_id!r}"
        boxes = as_numpy(entry["boxes"], np.float64, f"{where}: boxes").reshape(-1, 4)
        labels = as_numpy(entry["labels"], np.int64, f"{where}: labels").reshape(-1)
        difficult = entry.get("difficult")
        if difficult is None:
            difficult = np.zeros(len(labels), dtype=bool)
        difficult = as_numpy(difficult, bool, f"{where}: difficult").reshape(-1)
        if not len(boxes) == len(labels) == len(difficult):
            raise ValueError(
                f"ground truth for image {image_id!r}: boxes/labels/difficult lengths differ "
                f"({len(boxes)}, {len(labels)}, {len(difficult)})"
            )
        for c in range(num_classes):
            per_class[c][image_id] = []
        for box, label, diff in zip(boxes, labels, difficult):
            if not 1 <= int(label) <= num_classes:
                raise ValueError(f"ground truth for image {image_id!r}: label {int(label)} is outside 1..{num_classes}")
            per_class[int(label) - 1][image_id].append((box, bool(diff)))
    return per_class


def _summarize(
    class_names: Sequence[str],
    results: Sequence[dict[str, Any]],
    iou_thresh: float,
    use_07_metric: bool,
    num_images: int,
) -> dict[str, Any]:
    """Common result dict of the VOC entry points; warns about classes without positives."""
    per_class = {name: r["ap"] for name, r in zip(class_names, results)}
    undefined = [name for name, ap in per_class.items() if np.isnan(ap)]
    if undefined:
        warnings.warn(
            f"VOC evaluation: no non-difficult ground truth for classes {undefined}; their AP is undefined "
            "(NaN) and left out of the mAP",
            stacklevel=3,
        )
    return {
        "mAP": voc_mean_ap(per_class),
        "per_class": per_class,
        "num_positives": {name: r["npos"] for name, r in zip(class_names, results)},
        "num_detections": {name: int(len(r["tp"])) for name, r in zip(class_names, results)},
        "iou_thresh": float(iou_thresh),
        "use_07_metric": bool(use_07_metric),
        "num_images": int(num_images),
    }


def evaluate_voc_detections(
    detections: Sequence[Mapping[str, Any]],
    ground_truth: GroundTruth,
    class_names: Sequence[str],
    iou_thresh: float = 0.5,
    use_07_metric: bool = False,
) -> dict[str, Any]:
    """In-memory VOC evaluation of model outputs, no files involved.

    ``detections``: per-image dicts ``{"image_id", "boxes" [N,4] xyxy 0-based continuous in original image
    coordinates, "scores" [N], "labels" [N] 1..K}``; ``ground_truth``: image_id -> ``{"boxes", "labels",
    "difficult" (optional)}`` in the same conventions (see voc_ground_truth). Every detection's image
    must be in ``ground_truth``. Returns ``dict(mAP, per_class, num_positives, num_detections, ...)``.
    """
    results = _evaluate_classes(detections, ground_truth, class_names, iou_thresh, use_07_metric)
    return _summarize(class_names, results, iou_thresh, use_07_metric, len(ground_truth))


def voc_pr_curves(
    detections: Sequence[Mapping[str, Any]],
    ground_truth: GroundTruth,
    class_names: Sequence[str],
    iou_thresh: float = 0.5,
    use_07_metric: bool = False,
) -> dict[str, dict[str, Any]]:
    """Per-class precision/recall arrays behind evaluate_voc_detections' APs (same inputs, same numbers).

    Returns class name -> ``{"ap", "precision", "recall", "npos"}``; the arrays are in rank order (one
    point per detection) and ``voc_ap(recall, precision, use_07_metric) == ap``, the AP reported by
    evaluate_voc_detections.
    """
    results = _evaluate_classes(detections, ground_truth, class_names, iou_thresh, use_07_metric)
    keys = ("ap", "precision", "recall", "npos")
    return {name: {k: r[k] for k in keys} for name, r in zip(class_names, results)}


def _evaluate_classes(
    detections: Sequence[Mapping[str, Any]],
    ground_truth: GroundTruth,
    class_names: Sequence[str],
    iou_thresh: float,
    use_07_metric: bool,
) -> list[dict[str, Any]]:
    """evaluate_voc_class for every class of in-memory detections (the shared core of the entry points)."""
    gts = _class_gts(ground_truth, len(class_names))
    dets: list[list[tuple[Hashable, float, np.ndarray]]] = [[] for _ in class_names]
    for image_id, boxes, scores, labels in iter_detections(detections):
        if image_id not in ground_truth:
            raise ValueError(f"detections: image_id {image_id!r} is not in the ground truth")
        for box, score, label in zip(boxes, scores, labels):
            if not 1 <= label <= len(class_names):
                raise ValueError(f"detections for image {image_id!r}: label {label} is outside 1..{len(class_names)}")
            dets[label - 1].append((image_id, float(score), box))
    return [evaluate_voc_class(g, d, iou_thresh, use_07_metric) for g, d in zip(gts, dets)]


def evaluate_voc(
    annotations_dir: str | os.PathLike,
    image_set: str | os.PathLike | Sequence[str] | None,
    results_pattern: str,
    classes: Sequence[str] | None = None,
    iou_thresh: float = 0.5,
    use_07_metric: bool = False,
    *,
    strict_classes: bool = False,
) -> dict[str, Any]:
    """Evaluate devkit result files ``results_pattern.replace("{cls}", name)`` against VOC XML files.

    ``image_set``: ImageSets file, list of ids, or None for every XML in ``annotations_dir``. The class
    list is ``classes`` or the sorted object names found in the image set's XMLs. A missing result file
    gives that class AP 0 with a warning; a result line for an image outside the image set is an error
    (as in the devkit). ``strict_classes``: a given class with no object in the image set is an error listing
    the valid classes (else its AP is nan). Returns the evaluate_voc_detections dict plus ``missing_results`` and
    ``classes``.
    """
    if CLASS_PLACEHOLDER not in results_pattern:
        raise ValueError(f"results pattern {results_pattern!r} must contain {CLASS_PLACEHOLDER!r}")
    records = load_voc_annotations(annotations_dir, image_set)
    found = sorted({o["name"] for r in records.values() for o in r["objects"]})
    if classes is None:
        classes = found
        if not classes:
            raise ValueError(f"no objects in the annotations under {annotations_dir}; pass the class list explicitly")
    classes = list(classes)
    unknown = [c for c in classes if c not in found]
    if strict_classes and unknown:  # its AP would be nan (no positives) and drag mAP to nan
        raise ValueError(
            f"classes {unknown} have no object in the annotations under {annotations_dir}; "
            f"valid classes: {', '.join(found) or '(none)'}"
        )
    gts = _class_gts(voc_ground_truth(records, classes), len(classes))
    results, missing = [], []
    for name, class_gts in zip(classes, gts):
        path = Path(results_pattern.replace(CLASS_PLACEHOLDER, name))
        if not path.is_file():
            warnings.warn(
                f"VOC evaluation: result file for class {name!r} not found ({path}); its AP counts as 0", stacklevel=2
            )
            missing.append(name)
            ids, scores, boxes = [], np.zeros(0), np.zeros((0, 4))
        else:
            ids, scores, boxes = read_voc_results(path, image_ids=records)
        dets = list(zip(ids, scores.tolist(), boxes))
        results.append(evaluate_voc_class(class_gts, dets, iou_thresh, use_07_metric))
    summary = _summarize(classes, results, iou_thresh, use_07_metric, len(records))
    summary["classes"] = classes
    summary["missing_results"] = missing
    return summary
