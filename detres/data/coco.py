"""COCO instances-JSON detection dataset (pycocotools): contiguous labels, crowd and degenerate boxes removed."""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from detres.data.det_transforms import load_sample
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
    return coco


class CocoDetection(Dataset):
    """Detection samples from a COCO instances JSON and its image folder.

    Category ids are mapped to contiguous labels 1..K in sorted id order (``category_id_to_label``,
    ``label_to_category_id``; ``categories[l - 1]`` is label ``l``). Boxes are converted from xywh to
    xyxy and clipped to the image. Crowd annotations are left out of the targets when ``skip_crowd``
    (counted in ``num_crowd``; with ``skip_crowd=False`` they are kept as ordinary boxes). Boxes with
    zero width or height after clipping, or non-finite numbers, are dropped with one warning per
    dataset (``num_degenerate``); boxes narrower or lower than ``min_box_size`` pixels likewise
    (``num_small``). ``image_id`` in samples is the COCO image id, as COCO results need it.

    Args:
        image_dir: folder the JSON's ``file_name`` entries are relative to.
        ann_file: the instances JSON.
        transforms: callable on the numpy sample (see ``det_transforms``), e.g. ``build_det_transforms``.
        skip_crowd: leave ``iscrowd=1`` annotations out of the targets.
        remove_images_without_boxes: drop images left with no box (for training).
        min_box_size: minimum width and height in original pixels of a kept box (0 = any positive size).
        image_ids: keep only these COCO image ids, in this order (e.g. a train/val split); None = all,
            sorted by id.
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
    ):
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        self.skip_crowd = skip_crowd
        if min_box_size < 0:
            raise ValueError(f"min_box_size: expected >= 0, got {min_box_size!r}")
        self.min_box_size = float(min_box_size)

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

        self.num_crowd = 0
        self.num_degenerate = 0
        self.num_small = 0
        degenerate_ann_ids: list[int] = []
        small_ann_ids: list[int] = []
        self._targets: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for img_id in ids:
            boxes, labels, n_crowd, degenerate, small = self._load_targets(img_id)
            self._targets[img_id] = (boxes, labels)
            self.num_crowd += n_crowd
            degenerate_ann_ids += degenerate
            small_ann_ids += small
        self.num_degenerate = len(degenerate_ann_ids)
        self.num_small = len(small_ann_ids)
        if degenerate_ann_ids:
            warnings.warn(
                f"dropped {self.num_degenerate} degenerate boxes (zero width/height after clipping, or "
                f"non-finite) in {self.ann_file}: annotation ids {_preview(degenerate_ann_ids)}",
                stacklevel=2,
            )
        if small_ann_ids:
            warnings.warn(
                f"dropped {self.num_small} boxes smaller than min_box_size={self.min_box_size} in "
                f"{self.ann_file}: annotation ids {_preview(small_ann_ids)}",
                stacklevel=2,
            )
        if remove_images_without_boxes:
            ids = [i for i in ids if len(self._targets[i][1]) > 0]
        self.ids: list[int] = ids
        self.num_boxes = sum(len(self._targets[i][1]) for i in ids)

    def _load_targets(self, img_id: int) -> tuple[np.ndarray, np.ndarray, int, list[int], list[int]]:
        info = self.coco.imgs[img_id]
        height, width = self._hw_of(info)
        boxes, labels, ann_ids = [], [], []
        n_crowd = 0
        for ann in self.coco.imgToAnns.get(img_id, []):
            if self.skip_crowd and ann.get("iscrowd", 0):
                n_crowd += 1
                continue
            cat = ann.get("category_id")
            if cat not in self.category_id_to_label:
                raise ValueError(
                    f"COCO annotation file '{self.ann_file}': annotation {ann.get('id')} has category_id "
                    f"{cat!r}, which is not in 'categories'"
                )
            bbox = ann.get("bbox")
            if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
                raise ValueError(
                    f"COCO annotation file '{self.ann_file}': annotation {ann.get('id')} has bbox {bbox!r}; "
                    "expected [x, y, width, height]"
                )
            boxes.append([float(v) for v in bbox])
            labels.append(self.category_id_to_label[cat])
            ann_ids.append(int(ann.get("id", -1)))
        if not boxes:
            return np.zeros((0, 4), np.float32), np.zeros(0, np.int64), n_crowd, [], []
        xywh = torch.tensor(boxes, dtype=torch.float64)
        finite = torch.isfinite(xywh).all(dim=1)
        # Non-finite rows are zeroed so that clipping cannot turn them into a plausible box.
        xyxy = clip_boxes(xywh_to_xyxy(torch.where(finite[:, None], xywh, torch.zeros_like(xywh))), (height, width))
        wh = xyxy[:, 2:] - xyxy[:, :2]
        valid = finite & (wh > 0).all(dim=1)
        big_enough = (wh >= self.min_box_size).all(dim=1)
        keep = valid & big_enough
        degenerate = [a for a, v in zip(ann_ids, valid.tolist()) if not v]
        small = [a for a, v, b in zip(ann_ids, valid.tolist(), big_enough.tolist()) if v and not b]
        kept = keep.numpy()
        return (
            xyxy[keep].to(torch.float32).numpy(),
            np.asarray(labels, dtype=np.int64)[kept],
            n_crowd,
            degenerate,
            small,
        )

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

    def image_hw(self, index: int) -> tuple[int, int]:
        """(H0, W0) of image ``index`` from the JSON, without decoding the image."""
        return self._hw_of(self.coco.imgs[self.ids[index]])

    def image_path(self, index: int) -> Path:
        return self.image_dir / self.coco.imgs[self.ids[index]]["file_name"]

    def annotation(self, index: int) -> dict[str, Any]:
        """The numpy sample of image ``index`` without the image: boxes in original pixels, labels, ids."""
        img_id = self.ids[index]
        boxes, labels = self._targets[img_id]
        return {
            "boxes": boxes.copy(),
            "labels": labels.copy(),
            "difficult": np.zeros(len(labels), dtype=bool),
            "image_id": img_id,
            "orig_size": self.image_hw(index),
            "file_name": str(self.image_path(index)),
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        return load_sample(self.annotation(index), self.transforms, annotation_source=self.ann_file)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(images={len(self)}, boxes={self.num_boxes}, classes={len(self.categories)}, "
            f"crowd_skipped={self.num_crowd}, degenerate_dropped={self.num_degenerate}, ann_file='{self.ann_file}')"
        )


def _preview(ids: list[Any], limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in ids[:limit])
    return f"[{shown}{', ...' if len(ids) > limit else ''}]"
