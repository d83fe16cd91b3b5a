"""COCO box/mask AP (pycocotools or faster-coco-eval): the 12 summary numbers, per-category AP, input checks."""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detres.evaluation.coco_backend import DEFAULT_BACKEND, check_integer_ids, coco_classes
from detres.evaluation.results_io import detections_to_coco_results, load_coco_results
from detres.utils.atomic import read_json

__all__ = ["SUMMARY_KEYS", "evaluate_coco", "evaluate_coco_detections", "load_coco_gt"]

# Names of COCOeval.stats[0..11], in order.
SUMMARY_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
IOU_TYPES = ("bbox", "segm")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_gt(dataset: Any, name: str, iou_type: str) -> None:
    """Check the fields pycocotools relies on, so a bad file fails here with a clear message."""
    if not isinstance(dataset, Mapping):
        raise ValueError(f"{name}: ground truth must be a JSON object, got {type(dataset).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            raise ValueError(f"{name}: field {key!r} is missing or not a list")
    image_ids: dict[Any, int] = {}
    for i, img in enumerate(dataset["images"]):
        if not isinstance(img, Mapping) or "id" not in img:
            raise ValueError(f"{name}: images[{i}]: missing field 'id'")
        if img["id"] in image_ids:
            first = dataset["images"][image_ids[img["id"]]]
            raise ValueError(
                f"{name}: images[{i}]: duplicate image id {img['id']!r} (file names "
                f"{first.get('file_name')!r} and {img.get('file_name')!r}); image ids must be unique"
            )
        image_ids[img["id"]] = i
        if iou_type == "segm":
            for key in ("height", "width"):
                if not isinstance(img.get(key), int) or img[key] <= 0:
                    raise ValueError(
                        f"{name}: images[{i}]: field {key!r} must be a positive integer for segm evaluation"
                    )
    cat_ids = set()
    for i, cat in enumerate(dataset["categories"]):
        if not isinstance(cat, Mapping) or "id" not in cat or "name" not in cat:
            raise ValueError(f"{name}: categories[{i}]: fields 'id' and 'name' are required")
        cat_ids.add(cat["id"])
    geometry = "bbox" if iou_type == "bbox" else "segmentation"
    for i, ann in enumerate(dataset["annotations"]):
        if not isinstance(ann, Mapping):
            raise ValueError(f"{name}: annotations[{i}]: expected an object")
        for key in ("id", "image_id", "category_id", "area", "iscrowd", geometry):
            if key not in ann:
                raise ValueError(f"{name}: annotations[{i}]: missing field {key!r}")
        if ann["image_id"] not in image_ids:
            raise ValueError(f"{name}: annotations[{i}]: image_id {ann['image_id']!r} is not in 'images'")
        if ann["category_id"] not in cat_ids:
            raise ValueError(f"{name}: annotations[{i}]: category_id {ann['category_id']!r} is not in 'categories'")
        if not _is_number(ann["area"]):
            raise ValueError(f"{name}: annotations[{i}]: 'area' must be a finite number, got {ann['area']!r}")
        if iou_type == "bbox":
            _check_box(ann["bbox"], f"{name}: annotations[{i}]")
    _check_unique_ann_ids(dataset["annotations"], name)


def _check_unique_ann_ids(annotations: Sequence[Any], name: str) -> None:
    """pycocotools keys annotations by id: with a repeated id COCOeval scores one object's box in place
    of another's and every metric is silently wrong (ground truth fed back as results scores far below 1)."""
    seen: dict[Any, int] = {}
    for ann in annotations:
        ann_id = ann.get("id") if isinstance(ann, Mapping) else None
        seen[ann_id] = seen.get(ann_id, 0) + 1
    ids = [a for a, n in seen.items() if n > 1]  # in order of first appearance
    if ids:
        shown = ", ".join(f"{a!r} ({seen[a]}x)" for a in ids[:10]) + (", ..." if len(ids) > 10 else "")
        raise ValueError(
            f"{name}: {len(ids)} annotation id(s) used more than once (e.g. after merging files): {shown}; "
            "pycocotools needs unique annotation ids, renumber them (e.g. 1..N)"
        )


def _check_box(box: Any, where: str) -> None:
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(_is_number(v) for v in box)):
        raise ValueError(f"{where}: 'bbox' must be [x, y, width, height] with 4 finite numbers, got {box!r}")
    if box[2] < 0 or box[3] < 0:
        raise ValueError(f"{where}: 'bbox' width and height must be >= 0, got {box!r}")


def load_coco_gt(
    gt: str | os.PathLike | Mapping[str, Any] | COCO, iou_type: str = "bbox", backend: str = DEFAULT_BACKEND
) -> tuple[COCO, str]:
    """Return (``backend``'s COCO object, name for messages). Files and dicts are validated; a dict is
    deep-copied because COCOeval writes into the annotations. A COCO object of ``backend`` is used as given
    (its annotation ids are checked to be unique, which pycocotools relies on); one of the other backend
    is rebuilt from a copy of its dataset."""
    coco_cls, _ = coco_classes(backend)
    if isinstance(gt, coco_cls):
        _check_unique_ann_ids(gt.dataset.get("annotations", []), "<COCO ground truth>")
        check_integer_ids(gt.dataset, "<COCO ground truth>", backend)
        return gt, "<COCO ground truth>"
    if isinstance(getattr(gt, "dataset", None), Mapping) and callable(getattr(gt, "createIndex", None)):
        dataset, name = copy.deepcopy(dict(gt.dataset)), "<COCO ground truth>"
    elif isinstance(gt, (str, os.PathLike)):
        dataset, name = read_json(gt, what="ground-truth file"), str(Path(gt))
    elif isinstance(gt, Mapping):
        dataset, name = copy.deepcopy(dict(gt)), "<ground-truth dict>"
    else:
        raise TypeError(f"gt must be a path, a dict or a COCO object, got {type(gt).__name__}")
    _check_gt(dataset, name, iou_type)
    check_integer_ids(dataset, name, backend)
    coco = coco_cls()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco, name


def _prepare_results(results: list[Any], name: str, coco_gt: COCO, gt_name: str, iou_type: str) -> list[dict[str, Any]]:
    """Validate result entries and return copies ready for COCO.loadRes (which writes into them)."""
    prepared = []
    for i, res in enumerate(results):
        where = f"{name}[{i}]"
        if not isinstance(res, Mapping):
            raise ValueError(f"{where}: expected an object, got {type(res).__name__}")
        geometry = "bbox" if iou_type == "bbox" else "segmentation"
        for key in ("image_id", "category_id", "score", geometry):
            if key not in res:
                raise ValueError(f"{where}: missing field {key!r} (required for iou_type={iou_type!r})")
        if res["image_id"] not in coco_gt.imgs:
            raise ValueError(f"{where}: image_id {res['image_id']!r} is not an image of the ground truth {gt_name}")
        if res["category_id"] not in coco_gt.cats:
            raise ValueError(
                f"{where}: category_id {res['category_id']!r} is not a category of the ground truth {gt_name}"
            )
        if not _is_number(res["score"]):
            raise ValueError(f"{where}: 'score' must be a finite number, got {res['score']!r}")
        entry = {k: copy.deepcopy(v) for k, v in res.items() if k not in ("id", "area", "iscrowd")}
        if iou_type == "bbox":
            _check_box(res["bbox"], where)
        else:
            img = coco_gt.imgs[res["image_id"]]
            entry["segmentation"] = _to_rle(res["segmentation"], img, where)
            # Like detectron2: without 'bbox', cocoapi takes the mask area for the small/medium/large split
            # (with it, the box area would be used for mask AP).
            entry.pop("bbox", None)
        prepared.append(entry)
    return prepared


def _to_rle(seg: Any, img: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Compressed RLE for a result mask given as RLE (compressed or not) or polygons."""
    h, w = img.get("height"), img.get("width")
    if isinstance(seg, list):
        if not seg or not all(isinstance(p, list) and len(p) >= 6 for p in seg):
            raise ValueError(f"{where}: 'segmentation' polygons must be lists of >= 3 (x, y) points")
        return mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    if not (isinstance(seg, Mapping) and "size" in seg and "counts" in seg):
        raise ValueError(f"{where}: 'segmentation' must be an RLE dict with 'size' and 'counts', or polygons")
    if list(seg["size"]) != [h, w]:
        raise ValueError(f"{where}: 'segmentation' size {list(seg['size'])} differs from the image size [{h}, {w}]")
    if isinstance(seg["counts"], list):
        return mask_utils.frPyObjects(dict(seg), h, w)
    return dict(seg)


def _empty_results(coco_gt: COCO) -> COCO:
    """A results object with no detections, so COCOeval reports 0 (or -1 without ground truth)."""
    res = type(coco_gt)()
    res.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": copy.deepcopy(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        res.createIndex()
    return res


def _summary_text(coco_eval: COCOeval) -> str:
    """The lines COCOeval.summarize() prints for the 12 SUMMARY_KEYS (faster-coco-eval prints through
    ``print_function``, a logger by default, and adds AR50 and AR75 lines, left out here)."""
    if hasattr(coco_eval, "print_function"):
        coco_eval.print_function = print
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        coco_eval.summarize()
    return "".join(text.getvalue().splitlines(keepends=True)[: len(SUMMARY_KEYS)])


def _per_category_ap(coco_eval: COCOeval, coco_gt: COCO) -> list[dict[str, Any]]:
    """AP per category from eval['precision'] [T, R, K, A, M] at area 'all' and the largest maxDets,
    averaging only the entries that are not -1 (as detectron2 does); -1 when none are defined."""
    precision = coco_eval.eval["precision"]
    out = []
    for k, cat_id in enumerate(coco_eval.params.catIds):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        ap = float(np.mean(values)) if values.size else -1.0
        out.append({"id": cat_id, "name": coco_gt.cats[cat_id]["name"], "AP": ap})
    return out


def evaluate_coco(
    gt: str | os.PathLike | Mapping[str, Any] | COCO,
    results: str | os.PathLike | Sequence[Mapping[str, Any]] | Mapping[str, Any],
    iou_type: str = "bbox",
    *,
    backend: str = DEFAULT_BACKEND,
) -> dict[str, Any]:
    """Run COCOeval (all ground-truth images, default parameters) and return
    ``dict(summary={AP, AP50, ..., ARl}, per_category=[{id, name, AP}], iou_type, num_images,
    num_results, summary_text)``. Values follow pycocotools: in [0, 1], -1 where undefined (no ground
    truth in that area range / category). ``results`` is a results JSON path, a list of result dicts,
    or a dict with an ``annotations`` list. Empty results give a warning and 0/-1 metrics.
    ``backend``: "pycocotools" (the reference) or "faster_coco_eval" (same numbers within 1e-6, several
    times faster on large sets), see :mod:`detres.evaluation.coco_backend`.
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    _, cocoeval_cls = coco_classes(backend)  # an unknown or uninstalled backend fails before any file is read
    coco_gt, gt_name = load_coco_gt(gt, iou_type, backend)
    entries, res_name = load_coco_results(results)
    prepared = _prepare_results(entries, res_name, coco_gt, gt_name, iou_type)
    with contextlib.redirect_stdout(io.StringIO()):
        if prepared:
            coco_dt = coco_gt.loadRes(prepared)
        else:
            warnings.warn(
                f"{res_name}: no detections; every metric is 0 (or -1 where there is no ground truth)", stacklevel=2
            )
            coco_dt = _empty_results(coco_gt)
        coco_eval = cocoeval_cls(coco_gt, coco_dt, iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
    text = _summary_text(coco_eval)
    return {
        "iou_type": iou_type,
        "summary": {key: float(v) for key, v in zip(SUMMARY_KEYS, coco_eval.stats)},
        "per_category": _per_category_ap(coco_eval, coco_gt),
        "num_images": len(coco_eval.params.imgIds),
        "num_results": len(prepared),
        "summary_text": text,
    }


def evaluate_coco_detections(
    gt: str | os.PathLike | Mapping[str, Any] | COCO,
    detections: Sequence[Mapping[str, Any]],
    label_to_category_id: Mapping[int, int],
    *,
    backend: str = DEFAULT_BACKEND,
) -> dict[str, Any]:
    """Box AP of in-memory model detections (per-image dicts, see detections_to_coco_results), no files."""
    results = detections_to_coco_results(detections, label_to_category_id)
    return evaluate_coco(gt, results, iou_type="bbox", backend=backend)
