"""Localization datasets (Appendix C): images with labelled boxes from an ILSVRC-layout folder or Tiny-ImageNet.

Every reader gives :class:`LocRecord` s with boxes in detres's in-memory convention, 0-based continuous
``xyxy`` (ILSVRC XML's 1-based inclusive ``(x0, y0, x1, y1)`` is ``(x0 - 1, y0 - 1, x1, y1)``; Tiny-ImageNet's
0-based inclusive one is ``(x0, y0, x1 + 1, y1 + 1)``) and labels 1..K in synset-list order.
:class:`LocDataset` turns them into samples {image, boxes, labels, image_id, orig_size (h, w)}.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from detres.data.bad_samples import BadSamples
from detres.data.datasets.ilsvrc import read_loc_xml_folder, read_synsets, synset_labels
from detres.data.datasets.tiny_imagenet import parse_tiny_box, read_tiny_imagenet_val
from detres.data.image_io import read_image_rgb

__all__ = [
    "LocDataset",
    "LocRecord",
    "devkit_ground_truth",
    "read_ilsvrc_loc",
    "read_tiny_imagenet_train",
    "collate_loc",
    "read_tiny_imagenet_val_records",
    "tiny_imagenet_synsets",
]

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".JPEG", ".jpeg", ".jpg", ".png", ".PNG")


@dataclass(frozen=True)
class LocRecord:
    image_id: str
    path: str
    boxes: tuple[tuple[float, float, float, float], ...]  # 0-based continuous xyxy
    labels: tuple[int, ...]  # 1..K


def _image_path(folder: Path, image_id: str) -> Path:
    for ext in IMAGE_EXTENSIONS:
        if (folder / f"{image_id}{ext}").is_file():
            return folder / f"{image_id}{ext}"
    raise FileNotFoundError(f"image of {image_id!r} not found in {folder} (tried {', '.join(IMAGE_EXTENSIONS)})")


def read_ilsvrc_loc(
    root: str | os.PathLike,
    split: str,
    synsets: list[str] | None = None,
    *,
    synsets_file: str | os.PathLike | None = None,
    bad_samples: BadSamples | None = None,
) -> tuple[list[LocRecord], list[str]]:
    """``root/Annotations/<split>/**/*.xml`` + ``root/Data/<split>/<same sub-folder>/<id>.*`` -> (records sorted by
    path, synsets). ``split`` may be nested (ILSVRC's ``CLS-LOC/train``, whose XML sit in one folder per wnid).
    Synsets: ``synsets``, else ``synsets_file``, else ``root/LOC_synset_mapping.txt``. With ``bad_samples`` a
    malformed XML or a missing image is reported there (an error under "error") and its image left out.
    """
    root = Path(root)
    if synsets is None:
        synsets = read_synsets(Path(synsets_file) if synsets_file else root / "LOC_synset_mapping.txt")
    ann = root / "Annotations" / split
    if not ann.is_dir():
        raise FileNotFoundError(f"annotations folder not found: {ann}")
    by_folder: dict[Path, list[str]] = {}
    for xml in sorted(ann.rglob("*.xml")):
        by_folder.setdefault(xml.parent, []).append(xml.stem)
    if not by_folder:
        raise ValueError(f"{ann}: no *.xml annotation")
    records = []
    for folder, ids in by_folder.items():
        gt = read_loc_xml_folder(folder, ids, synsets, bad_samples=bad_samples)
        images = root / "Data" / split / folder.relative_to(ann)
        for i in (i for i in ids if i in gt):
            try:
                path = _image_path(images, i)
            except FileNotFoundError as exc:
                if bad_samples is None:
                    raise
                bad_samples.report(images / i, str(exc), kind="missing image")
                continue
            records.append(
                LocRecord(
                    i,
                    str(path),
                    tuple((b[0] - 1.0, b[1] - 1.0, float(b[2]), float(b[3])) for _, b in gt[i]),
                    tuple(int(lab) for lab, _ in gt[i]),
                )
            )
    return records, list(synsets)


def tiny_imagenet_synsets(root: str | os.PathLike) -> list[str]:
    """The classes a localizer can learn: ``wnids.txt`` order, keeping only wnids with a ``train/<wnid>`` folder.

    The shared copy lists 202 wnids of which 200 have training images; the other two are reported here.
    """
    root = Path(root)
    listed = read_synsets(root / "wnids.txt")
    trained = [w for w in listed if (root / "train" / w).is_dir()]
    missing = [w for w in listed if w not in trained]
    if missing:
        log.warning(
            "Tiny-ImageNet: %d of %d wnids in %s have no training images and are not classes of the localizer: %s",
            len(missing),
            len(listed),
            root / "wnids.txt",
            ", ".join(missing),
        )
    if not trained:
        raise ValueError(f"{root}: no wnid of wnids.txt has a train/<wnid> folder")
    return trained


def _tiny_box(fields: list[str], where: str) -> tuple[float, float, float, float]:
    """A Tiny-ImageNet box as 0-based continuous xyxy (the 1-based inclusive box shifted by one at the top left)."""
    x0, y0, x1, y1 = parse_tiny_box(fields, where)
    return float(x0 - 1), float(y0 - 1), float(x1), float(y1)


def read_tiny_imagenet_train(
    root: str | os.PathLike, synsets: list[str], *, bad_samples: BadSamples | None = None
) -> list[LocRecord]:
    """``train/<wnid>/<wnid>_boxes.txt`` (``<file> x0 y0 x1 y1``, 0-based inclusive) for every wnid of ``synsets``.

    A malformed line is an error naming ``file:line``, or, with ``bad_samples``, reported there (an error under
    "error") and its image left out."""
    root = Path(root)
    records: list[LocRecord] = []
    for label, wnid in enumerate(synsets, start=1):
        path = root / "train" / wnid / f"{wnid}_boxes.txt"
        if not path.is_file():
            raise FileNotFoundError(f"Tiny-ImageNet boxes file not found: {path}")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            try:
                if len(fields) != 5:
                    raise ValueError(f"{path}:{number}: expected '<file> x0 y0 x1 y1', got {len(fields)} fields")
                box = _tiny_box(fields[1:], f"{path}:{number}")
            except ValueError as exc:
                if bad_samples is None:
                    raise
                bad_samples.report(f"{path}:{number}", str(exc).removeprefix(f"{path}:{number}: "))
                continue
            records.append(
                LocRecord(Path(fields[0]).stem, str(root / "train" / wnid / "images" / fields[0]), (box,), (label,))
            )
    return records


def read_tiny_imagenet_val_records(root: str | os.PathLike, synsets: list[str]) -> list[LocRecord]:
    """``val/val_annotations.txt`` images of the ``synsets`` classes; images of other wnids are skipped and logged."""
    root = Path(root)
    val = read_tiny_imagenet_val(root / "val" / "val_annotations.txt", synsets, unknown="skip")
    if val.skipped:
        log.warning(
            "Tiny-ImageNet val: skipped %d images of %d wnids without training images (%s); %d images kept",
            sum(val.skipped.values()),
            len(val.skipped),
            ", ".join(f"{w}: {n}" for w, n in sorted(val.skipped.items())),
            len(val.image_ids),
        )
    images = root / "val" / "images"
    return [
        LocRecord(
            i,
            str(_image_path(images, i)),
            tuple((b[0] - 1.0, b[1] - 1.0, float(b[2]), float(b[3])) for _, b in val.ground_truth[i]),
            tuple(int(lab) for lab, _ in val.ground_truth[i]),
        )
        for i in val.image_ids
    ]


def devkit_ground_truth(records: list[LocRecord]) -> dict[str, list[tuple[int, tuple[float, float, float, float]]]]:
    """Ground truth in the metric's convention: 1-based inclusive boxes ``(x0 + 1, y0 + 1, x1, y1)``."""
    return {
        r.image_id: [(lab, (b[0] + 1.0, b[1] + 1.0, b[2], b[3])) for lab, b in zip(r.labels, r.boxes)] for r in records
    }


class LocDataset(torch.utils.data.Dataset):
    """Samples {image float32 [3,H,W] RGB 0..255, boxes [N,4], labels [N], image_id, orig_size (h, w)}.

    ``transform(image, boxes, labels) -> (image, boxes, labels)`` (training) or ``view_transform(image) ->
    (image, view)`` (testing: the sample then carries ``view``, a :class:`~detres.data.transforms.localization.LocView`,
    and the original boxes).
    """

    def __init__(
        self,
        records: list[LocRecord],
        synsets: list[str],
        *,
        transform: Callable | None = None,
        view_transform: Callable | None = None,
    ) -> None:
        if transform is not None and view_transform is not None:
            raise ValueError("LocDataset: give transform (training) or view_transform (testing), not both")
        self.records, self.synsets = list(records), list(synsets)
        self.labels = synset_labels(self.synsets)
        self.transform, self.view_transform = transform, view_transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        image = read_image_rgb(record.path)
        boxes = np.asarray(record.boxes, dtype=np.float32).reshape(-1, 4)
        labels = np.asarray(record.labels, dtype=np.int64)
        sample: dict[str, Any] = {"image_id": record.image_id, "orig_size": image.shape[:2]}
        if self.transform is not None:
            image, boxes, labels = self.transform(image, boxes, labels)
        if self.view_transform is not None:
            image, sample["view"] = self.view_transform(image)
        sample.update(
            image=torch.from_numpy(np.ascontiguousarray(np.asarray(image, np.float32).transpose(2, 0, 1))),
            boxes=torch.from_numpy(boxes),
            labels=torch.from_numpy(labels),
        )
        return sample


def collate_loc(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Same-size training crops -> {images [B,3,H,W], targets [{boxes, labels[, seed]}], image_ids}; test views stay
    a list. A sample's ``seed`` (training: see ``detres.engine.seeded_data``) goes into its target, where the
    per-class RPN's anchor sampler reads it."""
    images = [s["image"] for s in batch]
    same = all(im.shape == images[0].shape for im in images)
    targets = [{"boxes": s["boxes"], "labels": s["labels"]} for s in batch]
    for target, sample in zip(targets, batch):
        if sample.get("seed") is not None:
            target["seed"] = int(sample["seed"])
    return {
        "images": torch.stack(images) if same else images,
        "targets": targets,
        "image_ids": [s["image_id"] for s in batch],
        "orig_sizes": [s["orig_size"] for s in batch],
        "views": [s.get("view") for s in batch],
    }
