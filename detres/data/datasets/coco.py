"""COCO instances-JSON detection dataset (pycocotools): contiguous labels, crowd regions apart, bad-sample policy."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from detres.data.bad_samples import BOX_TOLERANCE_PX, BadSamples
from detres.data.transforms.detection import load_sample
from detres.structures.boxes import clip_boxes, xywh_to_xyxy

__all__ = ["CocoDetection", "load_coco_api"]


def load_coco_api(ann_file: str | os.PathLike) -> COCO:
    """Load a COCO JSON with pycocotools, with errors that name the file and without its stdout chatter."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise FileNotFoundError(f"COCO annotation file '{ann_file}' does not exist")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(ann_file))
    except json.JSONDecodeError as exc:
        raise ValueError(f"COCO annotation file '{ann_file}' is not valid JSON: {exc}") from exc
    except (AssertionError, TypeError, KeyError) as exc:
        raise ValueError(f"COCO annotation file '{ann_file}' is not a COCO instances JSON: {exc!r}") from exc
    for key in ("images", "categories"):
        if not isinstance(coco.dataset.get(key), list):
            raise ValueError(f"COCO annotation file '{ann_file}': missing or non-list '{key}' field")
    _check_unique_image_ids(coco.dataset["images"], ann_file)
    return coco


def _check_unique_image_ids(images: list[Any], ann_file: Path) -> None:
    """pycocotools keys images by id, so a repeated id silently keeps only the last entry while the
    annotations of all of them pile up on it: one image would be trained on with another's boxes."""
    files_of: dict[Any, list[str]] = {}
    for img in images:
        img_id = img.get("id") if isinstance(img, dict) else None
        files_of.setdefault(img_id, []).append(str(img.get("file_name", "?")) if isinstance(img, dict) else "?")
    repeated = {i: names for i, names in files_of.items() if len(names) > 1}
    if repeated:
        shown = "; ".join(f"id {i!r}: {', '.join(repr(n) for n in names)}" for i, names in list(repeated.items())[:10])
        more = f"; ... ({len(repeated)} ids in all)" if len(repeated) > 10 else ""
        raise ValueError(
            f"COCO annotation file '{ann_file}': {len(repeated)} image id(s) used by more than one image "
            f"(e.g. after merging files); image ids must be unique: {shown}{more}"
        )


class CocoDetection(Dataset):
    """Detection samples from a COCO instances JSON and its image folder.

    Category ids are mapped to contiguous labels 1..K in sorted id order (``category_id_to_label``,
    ``label_to_category_id``; ``categories[l - 1]`` is label ``l``). Boxes are converted from xywh to
    xyxy and clipped to the image. Crowd annotations are left out of the targets when ``skip_crowd``
    (counted in ``num_crowd``; with ``skip_crowd=False`` they are kept as ordinary boxes); they stay, clipped,
    in the samples' ``crowd_boxes`` (the regions whose anchors and proposals training ignores, as in Detectron)
    and in ``evaluation_ground_truth`` as the regions COCO AP ignores. Boxes with zero width or height (in the
    file or after clipping) are dropped with one warning per dataset (``num_degenerate``); boxes narrower or
    lower than ``min_box_size`` pixels likewise (``num_small``). Bad samples go to ``bad_samples`` (the
    ``data.on_bad_sample`` policy: error at the first, or skip and record): an image entry without a
    ``file_name`` or a positive integer ``height``/``width``, an annotation on an image id that is not in
    ``images``, and a malformed annotation (unknown category, bbox not 4 numbers, non-finite, negative
    width/height, a non-crowd box outside the image by more than a pixel), which makes its whole image bad
    (dropping only the box would teach the object as background). Evaluation scores the boxes
    as loaded, never the raw JSON (see ``evaluation_ground_truth``). ``image_id`` in samples is the COCO
    image id, as COCO results need it. Image ids must be unique in the file (ValueError otherwise).

    Args:
        image_dir: folder the JSON's ``file_name`` entries are relative to.
        ann_file: the instances JSON.
        transforms: callable on the numpy sample (see ``det_transforms``), e.g. ``build_det_transforms``.
        skip_crowd: leave ``iscrowd=1`` annotations out of the targets.
        remove_images_without_boxes: drop images left with no box (for training).
        min_box_size: minimum width and height in original pixels of a kept box (0 = any positive size).
        image_ids: keep only these COCO image ids, in this order (e.g. a train/val split); None = all,
            sorted by id.
        bad_samples: the policy collecting bad samples; None = "error" (stop at the first).
    """

    def __init__(
        self,
        image_dir: str | os.PathLike,
        ann_file: str | os.PathLike,
        *,
        transforms: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        skip_crowd: bool = True,
        remove_images_without_boxes: bool = False,
        min_box_size: float = 0.0,
        image_ids: Sequence[int] | None = None,
        bad_samples: BadSamples | None = None,
    ):
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        self.skip_crowd = skip_crowd
        if min_box_size < 0:
            raise ValueError(f"min_box_size: expected >= 0, got {min_box_size!r}")
        self.min_box_size = float(min_box_size)
        self.bad_samples = bad_samples if bad_samples is not None else BadSamples("error")

        self.coco = load_coco_api(self.ann_file)
        cat_ids = sorted(int(c["id"]) for c in self.coco.dataset["categories"])
        if len(set(cat_ids)) != len(cat_ids):
            raise ValueError(f"COCO annotation file '{self.ann_file}': duplicate category ids")
        self.categories = [{"id": c, "name": str(self.coco.cats[c].get("name", c))} for c in cat_ids]
        self.category_id_to_label = {c: i + 1 for i, c in enumerate(cat_ids)}
        self.label_to_category_id = {i + 1: c for i, c in enumerate(cat_ids)}

        if image_ids is None:
            ids = sorted(int(i) for i in self.coco.imgs)
        else:
            ids = [int(i) for i in image_ids]
            unknown = [i for i in ids if i not in self.coco.imgs]
            if unknown:
                raise ValueError(f"image_ids: {unknown[:10]} not in COCO annotation file '{self.ann_file}'")
            if len(set(ids)) != len(ids):
                repeated = sorted(i for i, n in Counter(ids).items() if n > 1)
                raise ValueError(f"image_ids: {_preview(repeated)} listed more than once (for '{self.ann_file}')")

        self.num_crowd = 0
        self.num_degenerate = 0
        self.num_small = 0
        degenerate_ann_ids: list[int] = []
        small_ann_ids: list[int] = []
        self._targets: dict[int, dict[str, np.ndarray]] = {}
        self._report_orphan_annotations()
        ids = [i for i in ids if self._image_entry_ok(i)]
        for img_id in list(ids):
            try:
                target, n_crowd, degenerate, small = self._load_targets(img_id)
            except _BadAnnotation as bad:
                self.bad_samples.report(self.ann_file, str(bad))
                ids.remove(img_id)
                continue
            self._targets[img_id] = target
            self.num_crowd += n_crowd
            degenerate_ann_ids += degenerate
            small_ann_ids += small
        self.num_degenerate = len(degenerate_ann_ids)
        self.num_small = len(small_ann_ids)
        if degenerate_ann_ids:
            warnings.warn(
                f"dropped {self.num_degenerate} degenerate boxes (zero width/height, in the file or after "
                f"clipping) in {self.ann_file}: annotation ids {_preview(degenerate_ann_ids)}",
                stacklevel=2,
            )
        if small_ann_ids:
            warnings.warn(
                f"dropped {self.num_small} boxes smaller than min_box_size={self.min_box_size} in "
                f"{self.ann_file}: annotation ids {_preview(small_ann_ids)}",
                stacklevel=2,
            )
        if remove_images_without_boxes:
            ids = [i for i in ids if len(self._targets[i]["labels"]) > 0]
        self.ids: list[int] = ids
        self.num_boxes = sum(len(self._targets[i]["labels"]) for i in ids)

    def _report_orphan_annotations(self) -> None:
        """Annotations whose image_id names no image: a merge slip; nothing to train them on."""
        for ann in self.coco.dataset.get("annotations") or []:
            if isinstance(ann, dict) and ann.get("image_id") not in self.coco.imgs:
                self.bad_samples.report(
                    self.ann_file,
                    f"annotation {ann.get('id')} has image_id {ann.get('image_id')!r}, which is not an id in 'images'",
                )

    def _image_entry_ok(self, img_id: int) -> bool:
        """False (after reporting it) for an image entry without a usable file name or size."""
        info = self.coco.imgs[img_id]
        name = info.get("file_name")
        if not isinstance(name, str) or not name.strip():
            self.bad_samples.report(
                self.ann_file,
                f"image {img_id} has file_name {name!r}; expected the image's path relative to the image folder",
                kind="image",
            )
            return False
        try:
            self._hw_of(info)
        except ValueError as exc:
            self.bad_samples.report(self.ann_file, str(exc).split(": ", 1)[-1], kind="image")
            return False
        return True

    def _load_targets(self, img_id: int) -> tuple[dict[str, np.ndarray], int, list[int], list[int]]:
        """The cleaned targets of one image (boxes in float64 original pixels, labels, COCO areas) and its
        crowd regions, with the crowd count and the ids of the degenerate and too-small annotations."""
        info = self.coco.imgs[img_id]
        height, width = self._hw_of(info)
        boxes, labels, ann_ids, crowd, areas = [], [], [], [], []
        for ann in self.coco.imgToAnns.get(img_id, []):
            cat = ann.get("category_id")
            where = f"annotation {ann.get('id')} (image {img_id} '{info.get('file_name')}')"
            if cat not in self.category_id_to_label:
                raise _BadAnnotation(f"{where} has category_id {cat!r}, which is not in 'categories'")
            # A crowd region only marks what to ignore: one sticking out of the image is clipped, not refused.
            problem = _bbox_problem(ann.get("bbox"), height, width, inside=not ann.get("iscrowd", 0))
            if problem:
                raise _BadAnnotation(f"{where}: {problem}")
            boxes.append([float(v) for v in ann["bbox"]])
            labels.append(self.category_id_to_label[cat])
            ann_ids.append(int(ann.get("id", -1)))
            crowd.append(bool(self.skip_crowd and ann.get("iscrowd", 0)))
            area = ann.get("area")
            areas.append(float(area) if isinstance(area, (int, float)) and not isinstance(area, bool) else math.nan)
        n_crowd = sum(crowd)
        xywh = torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)
        raw_xyxy = xywh_to_xyxy(xywh)
        xyxy = clip_boxes(raw_xyxy, (height, width))
        wh = xyxy[:, 2:] - xyxy[:, :2]
        valid = (wh > 0).all(dim=1)  # zero width or height (in the file, or after clipping): degenerate
        big_enough = (wh >= self.min_box_size).all(dim=1)
        is_crowd = torch.tensor(crowd, dtype=torch.bool).reshape(-1)
        # Crowd regions are not targets: they are kept (clipped) only as regions COCO AP ignores, whatever
        # their size; a degenerate one is dropped like any degenerate box.
        keep = valid & big_enough & ~is_crowd
        keep_crowd = valid & is_crowd
        degenerate = [a for a, v in zip(ann_ids, valid.tolist()) if not v]
        small = [a for a, v, b, c in zip(ann_ids, valid.tolist(), big_enough.tolist(), crowd) if v and not b and not c]
        # COCO's area (the object's own, e.g. its mask area) decides the small/medium/large split of COCO AP.
        # It is kept for a box that loading left as it was; a clipped box gets its clipped w*h.
        unchanged = (xyxy == raw_xyxy).all(dim=1)
        file_area = torch.tensor(areas, dtype=torch.float64).reshape(-1)
        use_file_area = unchanged & torch.isfinite(file_area) & (file_area > 0)
        eval_area = torch.where(use_file_area, file_area, wh.prod(dim=1))
        labels_np = np.asarray(labels, dtype=np.int64).reshape(-1)
        target = {
            "boxes": xyxy[keep].numpy().reshape(-1, 4),
            "labels": labels_np[keep.numpy()],
            "areas": eval_area[keep].numpy().reshape(-1),
            "crowd_boxes": xyxy[keep_crowd].numpy().reshape(-1, 4),
            "crowd_labels": labels_np[keep_crowd.numpy()],
            "crowd_areas": eval_area[keep_crowd].numpy().reshape(-1),
        }
        return target, n_crowd, degenerate, small

    def _hw_of(self, info: dict[str, Any]) -> tuple[int, int]:
        try:
            height, width = int(info["height"]), int(info["width"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"COCO annotation file '{self.ann_file}': image {info.get('id')} lacks integer 'height'/'width'"
            ) from exc
        if height <= 0 or width <= 0:
            raise ValueError(
                f"COCO annotation file '{self.ann_file}': image {info.get('id')} has size {width}x{height}"
            )
        return height, width

    def __len__(self) -> int:
        return len(self.ids)

    def keep_images(self, indices: Sequence[int]) -> None:
        """Keep only the images at these positions (e.g. those whose file passed the up-front checks)."""
        self.ids = [self.ids[i] for i in indices]
        self.num_boxes = sum(len(self._targets[i]["labels"]) for i in self.ids)

    def image_hw(self, index: int) -> tuple[int, int]:
        """(H0, W0) of image ``index`` from the JSON, without decoding the image."""
        return self._hw_of(self.coco.imgs[self.ids[index]])

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.coco.imgs[self.ids[index]]["file_name"]

    def annotation(self, index: int) -> dict[str, Any]:
        """The numpy sample of image ``index`` without the image: boxes in original pixels, labels, ids, and
        the crowd regions (``crowd_boxes`` [C, 4], clipped; none with ``skip_crowd=False``)."""
        img_id = self.ids[index]
        target = self._targets[img_id]
        return {
            "boxes": target["boxes"].astype(np.float32),
            "labels": target["labels"].copy(),
            "difficult": np.zeros(len(target["labels"]), dtype=bool),
            "crowd_boxes": target["crowd_boxes"].astype(np.float32).reshape(-1, 4),
            "image_id": img_id,
            "orig_size": self.image_hw(index),
            "file_name": str(self.image_path(index)),
        }

    def evaluation_ground_truth(self, index: int) -> dict[str, Any]:
        """What evaluation scores image ``index`` against: the loaded targets (as in ``annotation``, after
        clipping and dropping) followed by the crowd regions (``iscrowd`` True; none with ``skip_crowd=False``,
        where crowd boxes are ordinary targets), in float64 original pixels, with the COCO ``area`` of each
        (the file's, unless loading clipped the box). Both COCO AP and VOC mAP use this, so they agree."""
        img_id = self.ids[index]
        t = self._targets[img_id]
        return {
            "image_id": img_id,
            "orig_size": self.image_hw(index),
            "file_name": str(self.image_path(index)),
            "boxes": np.concatenate([t["boxes"], t["crowd_boxes"]]).reshape(-1, 4),
            "labels": np.concatenate([t["labels"], t["crowd_labels"]]),
            "area": np.concatenate([t["areas"], t["crowd_areas"]]),
            "iscrowd": np.concatenate([np.zeros(len(t["labels"]), bool), np.ones(len(t["crowd_labels"]), bool)]),
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        return load_sample(self.annotation(index), self.transforms, annotation_source=self.ann_file)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(images={len(self)}, boxes={self.num_boxes}, classes={len(self.categories)}, "
            f"crowd_skipped={self.num_crowd}, degenerate_dropped={self.num_degenerate}, ann_file='{self.ann_file}')"
        )


class _BadAnnotation(ValueError):
    """A malformed annotation; its image becomes a bad sample."""


def _bbox_problem(bbox: Any, height: int, width: int, *, inside: bool = True) -> str | None:
    """Why a COCO ``[x, y, w, h]`` is malformed, or None. Zero width/height is degenerate, not malformed."""
    if (
        not isinstance(bbox, (list, tuple))
        or len(bbox) != 4
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
    ):
        return f"bbox {bbox!r}; expected [x, y, width, height] (4 numbers)"
    x, y, w, h = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return f"bbox {list(bbox)} has a non-finite number"
    if w < 0 or h < 0:
        return f"bbox {list(bbox)} has a negative width or height; expected [x, y, width >= 0, height >= 0]"
    tol = BOX_TOLERANCE_PX
    if inside and (x < -tol or y < -tol or x + w > width + tol or y + h > height + tol):
        return f"bbox {list(bbox)} lies outside the {width}x{height} image by more than {tol:g} pixel"
    return None


def _preview(ids: list[Any], limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return f"[{shown}{', ...' if len(ids) > limit else ''}]"
