"""PASCAL VOC detection dataset (ImageSets/Main/<set>.txt, Annotations/*.xml, JPEGImages/) in the sample contract."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from detres.data.bad_samples import BOX_TOLERANCE_PX, BadSamples
from detres.data.datasets.voc_xml import VOCAnnotationError, parse_voc_xml
from detres.data.image_io import read_image_rgb
from detres.data.transforms.detection import load_sample
from detres.structures.boxes import clip_boxes, voc_to_xyxy

__all__ = ["VOC_CLASSES", "VocDetection", "read_image_set"]

# The 20 PASCAL VOC object classes in the devkit's order (which is alphabetical).
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


def read_image_set(root: str | os.PathLike, image_set: str) -> list[str]:
    """Image ids listed in ``root/ImageSets/Main/<image_set>.txt`` (first token of each non-empty line)."""
    path = Path(root) / "ImageSets" / "Main" / f"{image_set}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"VOC image set file '{path}' does not exist (root='{root}', image_set='{image_set}')")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if len(set(ids)) != len(ids):
        raise ValueError(f"VOC image set file '{path}' lists some image ids more than once")
    return ids


class VocDetection(Dataset):
    """Detection samples from a PASCAL VOC style folder (VOC2007/2012, BCCD, ...).

    Boxes are 1-based inclusive in the XML and become 0-based continuous xyxy
    ``(x1 - 1, y1 - 1, x2, y2)``, clipped to the annotated image size. A box with ``xmax <= xmin``
    or ``ymax <= ymin`` in the file is a point or a line, not an object (BCCD has two such
    annotation slips): it is dropped, with one warning per dataset (``num_degenerate``). Read as an
    inclusive pixel box such an entry would be 1 pixel wide; it is dropped because its extent in the
    file's own numbers is zero, i.e. the annotator clicked instead of dragging. Boxes left with zero area
    by clipping are dropped and counted the same way.

    Bad samples go to ``bad_samples`` (the ``data.on_bad_sample`` policy: error at the first, or skip and
    record) and leave their whole image out: a missing or malformed XML (including an inverted box,
    ``xmax < xmin``, and non-finite numbers), an object of a class not in ``class_names``, and a box
    outside the annotated image by more than a pixel; the same cases as COCO's negative width.

    ``image_id`` in samples is the position of the image in the set; ``image_ids[image_id]`` is
    its string id (file stem), which VOC devkit result files need.

    Args:
        root: folder holding Annotations/, ImageSets/Main/ and JPEGImages/.
        image_set: name of the ImageSets/Main/<image_set>.txt list.
        class_names: class names in label order (label = position + 1), e.g. ``VOC_CLASSES``; None =
            the sorted names found in this set's XMLs (pass the training set's ``class_names`` to
            other splits so labels agree). An object of another class is an error naming the XML.
        transforms: callable on the numpy sample (see ``det_transforms``), e.g. ``build_det_transforms``.
        keep_difficult: True keeps objects marked difficult in the samples with ``difficult=True``
            (evaluation needs them: the VOC metric ignores them); False leaves them out, the usual
            choice for a training set (Faster R-CNN trains without VOC's difficult objects).
        min_box_size: minimum width and height in original pixels of a kept box (0 = any).
        bad_samples: the policy collecting bad samples; None = "error" (stop at the first).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_set: str = "trainval",
        *,
        class_names: Sequence[str] | None = None,
        transforms: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        keep_difficult: bool = True,
        min_box_size: float = 0.0,
        bad_samples: BadSamples | None = None,
    ):
        self.root = Path(root)
        self.image_set = image_set
        self.transforms = transforms
        self.keep_difficult = keep_difficult
        if min_box_size < 0:
            raise ValueError(f"min_box_size: expected >= 0, got {min_box_size!r}")
        self.min_box_size = float(min_box_size)
        self.bad_samples = bad_samples if bad_samples is not None else BadSamples("error")

        listed = read_image_set(self.root, image_set)
        parsed = [(image_id, self._parse(image_id)) for image_id in listed]
        parsed = [(image_id, rec) for image_id, rec in parsed if rec is not None]
        records = [rec for _, rec in parsed]
        if class_names is None:
            class_names = sorted({obj["name"] for rec in records for obj in rec["objects"]})
        class_names = [str(n) for n in class_names]
        if len(set(class_names)) != len(class_names):
            raise ValueError(f"class_names: duplicate names in {class_names}")
        self.class_names: list[str] = class_names
        self.categories = [{"id": i + 1, "name": n} for i, n in enumerate(class_names)]
        self._label_of = {n: i + 1 for i, n in enumerate(class_names)}

        self.num_degenerate = 0
        self.num_small = 0
        self.num_difficult = 0
        degenerate: list[str] = []
        small: list[str] = []
        self._records: list[dict[str, Any]] = []
        self.image_ids: list[str] = []
        for image_id, rec in parsed:
            try:
                target, dropped, too_small = self._build_target(image_id, rec)
            except _BadObject as bad:
                self.bad_samples.report(self._xml_path(image_id), str(bad))
                continue
            self.image_ids.append(image_id)
            self._records.append(target)
            degenerate += dropped
            small += too_small
            self.num_difficult += int(target["difficult"].sum())
        self.num_degenerate = len(degenerate)
        self.num_small = len(small)
        if degenerate:
            warnings.warn(
                f"dropped {self.num_degenerate} degenerate boxes (xmax == xmin or ymax == ymin, or zero area once "
                f"clipped) in "
                f"{self.root} ({image_set}): {_preview(degenerate)}",
                stacklevel=2,
            )
        if small:
            warnings.warn(
                f"dropped {self.num_small} boxes smaller than min_box_size={self.min_box_size} in "
                f"{self.root} ({image_set}): {_preview(small)}",
                stacklevel=2,
            )
        self.num_boxes = sum(len(r["labels"]) for r in self._records)

    def _xml_path(self, image_id: str) -> Path:
        return self.root / "Annotations" / f"{image_id}.xml"

    def _parse(self, image_id: str) -> dict[str, Any] | None:
        """The XML's record, or None once a missing or malformed file has been reported as a bad sample."""
        path = self._xml_path(image_id)
        if not path.is_file():
            self.bad_samples.report(path, f"VOC annotation does not exist (listed in image set '{self.image_set}')")
            return None
        try:
            return parse_voc_xml(path)
        except VOCAnnotationError as exc:
            self.bad_samples.report(path, str(exc).removeprefix(f"{path}: "))
            return None

    def _build_target(self, image_id: str, rec: dict[str, Any]) -> tuple[dict[str, Any], list[str], list[str]]:
        filename = rec.get("filename") or f"{image_id}.jpg"
        image_path = self.root / "JPEGImages" / filename
        if rec.get("height") is None or rec.get("width") is None:
            # Rare XMLs without <size>: the image itself is the only source of its size.
            try:
                height, width = read_image_rgb(image_path).shape[:2]
            except (OSError, ValueError) as exc:
                raise _BadObject(f"no <size> and the image cannot be read: {exc}") from None
        else:
            height, width = int(rec["height"]), int(rec["width"])
        boxes, labels, difficult, degenerate, small = [], [], [], [], []
        for k, obj in enumerate(rec["objects"]):
            name = obj["name"]
            if name not in self._label_of:
                raise _BadObject(f"object {k} has class '{name}', not in {self.class_names}")
            x1, y1, x2, y2 = (float(v) for v in obj["bbox"])
            tol = BOX_TOLERANCE_PX  # 1-based inclusive: the continuous box is (x1 - 1, y1 - 1, x2, y2)
            if x1 - 1 < -tol or y1 - 1 < -tol or x2 > width + tol or y2 > height + tol:
                raise _BadObject(
                    f"object {k} ({name}): bndbox {list(obj['bbox'])} lies outside the "
                    f"{width}x{height} image by more than {tol:g} pixel"
                )
            if obj["difficult"] and not self.keep_difficult:
                continue
            if not (x2 > x1 and y2 > y1):
                degenerate.append(f"{image_id} object {k} {list(obj['bbox'])}")
                continue
            boxes.append([x1, y1, x2, y2])
            labels.append(self._label_of[name])
            difficult.append(bool(obj["difficult"]))
        xyxy = torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)
        xyxy = clip_boxes(voc_to_xyxy(xyxy), (height, width))
        wh = xyxy[:, 2:] - xyxy[:, :2]
        # A box lying wholly outside the annotated size collapses to zero area when clipped.
        valid = (wh > 0).all(dim=1)
        degenerate += [f"{image_id} object (outside the image) {b}" for b, v in zip(boxes, valid.tolist()) if not v]
        big_enough = (wh >= self.min_box_size).all(dim=1)
        small += [f"{image_id} {b}" for b, v, s in zip(boxes, valid.tolist(), big_enough.tolist()) if v and not s]
        keep = (valid & big_enough).numpy()
        target = {
            "boxes": xyxy.to(torch.float32).numpy()[keep],
            "labels": np.asarray(labels, dtype=np.int64).reshape(-1)[keep],
            "difficult": np.asarray(difficult, dtype=bool).reshape(-1)[keep],
            "orig_size": (height, width),
            "file_name": str(image_path),
        }
        return target, degenerate, small

    def __len__(self) -> int:
        return len(self.image_ids)

    def keep_images(self, indices: Sequence[int]) -> None:
        """Keep only the images at these positions (e.g. those whose file passed the up-front checks)."""
        self.image_ids = [self.image_ids[i] for i in indices]
        self._records = [self._records[i] for i in indices]
        self.num_boxes = sum(len(r["labels"]) for r in self._records)

    def image_hw(self, index: int) -> tuple[int, int]:
        """(H0, W0) of image ``index`` from its XML, without decoding the image."""
        return self._records[index]["orig_size"]

    def annotation(self, index: int) -> dict[str, Any]:
        """The numpy sample of image ``index`` without the image: boxes in original pixels, labels, flags."""
        rec = self._records[index]
        return {
            "boxes": rec["boxes"].copy(),
            "labels": rec["labels"].copy(),
            "difficult": rec["difficult"].copy(),
            "image_id": index,
            "orig_size": rec["orig_size"],
            "file_name": rec["file_name"],
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index = index % len(self)
        return load_sample(
            self.annotation(index), self.transforms, annotation_source=self._xml_path(self.image_ids[index])
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root='{self.root}', image_set='{self.image_set}', images={len(self)}, "
            f"boxes={self.num_boxes}, classes={self.class_names}, degenerate_dropped={self.num_degenerate})"
        )


class _BadObject(ValueError):
    """An object (or size) of one XML that makes its image a bad sample."""


def _preview(items: list[str], limit: int = 10) -> str:
    shown = "; ".join(items[:limit])
    return f"[{shown}{'; ...' if len(items) > limit else ''}]"
