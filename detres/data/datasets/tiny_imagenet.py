"""Tiny-ImageNet validation boxes (``val/val_annotations.txt``) as localization ground truth.

Each line is ``<file> <wnid> <x0> <y0> <x1> <y1>`` (tab-separated) with 0-based inclusive pixel
coordinates in the 64x64 image: the values run 0..63 and 572 boxes of the shared copy are the whole
image ``0 0 63 63``. The reader adds 1 so the boxes are 1-based inclusive like ILSVRC XML, the
convention of the localization metric and of its prediction files (IoU itself does not change).

Images are keyed by the file name without extension (``val_0``), in file order. A wnid that is
not in the synset list is an error by default; ``unknown="skip"`` drops those images and counts
them instead (e.g. to score a model against the synset list it was trained on). With the dataset's
own ``wnids.txt`` every image is kept: in ``../shared/data/tiny_imagenet_loc`` that list has 202
wnids, two of which (n02480855, n10148035) have validation images but no training images, so a
model trained on ``train/`` cannot get them right; they are scored, not hidden.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from detres.data.datasets.ilsvrc import synset_labels

__all__ = ["TinyImageNetVal", "read_tiny_imagenet_val"]

Box = tuple[int, int, int, int]


class TinyImageNetVal(NamedTuple):
    image_ids: list[str]
    ground_truth: dict[str, list[tuple[int, Box]]]
    skipped: dict[str, int]  # wnid -> images dropped because the wnid is not in the synset list


def parse_tiny_box(fields: list[str], where: str) -> Box:
    """Tiny-ImageNet's 0-based inclusive 'x0 y0 x1 y1' as a 1-based inclusive (ILSVRC XML) box."""
    try:
        x0, y0, x1, y1 = (int(v) for v in fields)
    except ValueError:
        raise ValueError(f"{where}: box {fields} is not 4 integers") from None
    if min(x0, y0) < 0 or x1 < x0 or y1 < y0:
        raise ValueError(f"{where}: box (x0, y0, x1, y1) = ({x0}, {y0}, {x1}, {y1}) is not a 0-based inclusive box")
    return x0 + 1, y0 + 1, x1 + 1, y1 + 1


def read_tiny_imagenet_val(
    path: str | os.PathLike, synsets: Sequence[str], *, unknown: str = "error"
) -> TinyImageNetVal:
    """Read ``val_annotations.txt``: image ids, ground truth (1-based labels, 1-based inclusive boxes), skips.

    Several lines for one file give that image several objects. ``unknown``: "error" (default)
    raises ValueError naming ``file:line`` for a wnid not in ``synsets``; "skip" leaves such images
    out and counts them in ``skipped``. Malformed lines raise ValueError naming ``file:line``.
    """
    if unknown not in ("error", "skip"):
        raise ValueError(f"unknown: expected 'error' or 'skip', got {unknown!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Tiny-ImageNet annotations file not found: {path}")
    labels = synset_labels(synsets)
    ground_truth: dict[str, list[tuple[int, Box]]] = {}
    skipped: dict[str, set[str]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{number}"
        if len(fields) != 6:
            raise ValueError(f"{where}: expected '<file> <wnid> <x0> <y0> <x1> <y1>', got {len(fields)} fields")
        box = parse_tiny_box(fields[2:], where)
        if fields[1] not in labels:
            if unknown == "error":
                raise ValueError(f"{where}: wnid {fields[1]!r} is not in the synset list ({len(labels)} synsets)")
            skipped.setdefault(fields[1], set()).add(Path(fields[0]).stem)
            continue
        ground_truth.setdefault(Path(fields[0]).stem, []).append((labels[fields[1]], box))
    if not ground_truth:
        raise ValueError(f"{path}: no image with a wnid of the synset list")
    return TinyImageNetVal(list(ground_truth), ground_truth, {wnid: len(ids) for wnid, ids in skipped.items()})
