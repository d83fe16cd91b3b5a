"""Up-front checks of training and validation data, before the first iteration: every image file exists and its
header reads (no decoding), declared sizes match, the training set has boxes; bad samples follow the policy."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from detres.data.bad_samples import BadSamples, write_skipped

__all__ = [
    "check_cls_sets",
    "check_detection_sets",
    "check_image_files",
    "check_loc_records",
    "check_loc_sets",
    "image_problem",
]

log = logging.getLogger(__name__)
PROGRESS_MIN_IMAGES = 2000  # a progress bar only where the check takes noticeable time


def image_problem(path: str | os.PathLike, declared_hw: tuple[int, int] | None = None) -> tuple[str, str] | None:
    """(kind, reason) when ``path`` is missing, unreadable or of another size than ``declared_hw`` (H, W); else None.

    Only the header is read (PIL opens lazily), so this costs well under a millisecond per image.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        return "missing image", "image file does not exist"
    try:
        with Image.open(path) as image:
            width, height = image.size
    except UnidentifiedImageError:
        return "unreadable image", "image header cannot be read: empty, corrupt or not an image format"
    except (OSError, ValueError) as exc:
        return "unreadable image", f"image header cannot be read ({' '.join(str(exc).split())})"
    if declared_hw is not None and (height, width) != tuple(declared_hw):
        return "size mismatch", (
            f"image is {width}x{height} (WxH) but its annotation declares {declared_hw[1]}x{declared_hw[0]}"
        )
    return None


def check_image_files(
    paths: Sequence[str | os.PathLike],
    bad: BadSamples,
    *,
    declared_hw: Sequence[tuple[int, int] | None] | None = None,
    what: str = "images",
) -> list[int]:
    """Indices of ``paths`` whose image is usable; each other one is reported to ``bad`` (which raises under
    "error", naming the file)."""
    from tqdm import tqdm

    sizes = declared_hw if declared_hw is not None else [None] * len(paths)
    keep = []
    iterator = zip(paths, sizes)
    if len(paths) >= PROGRESS_MIN_IMAGES:
        iterator = tqdm(iterator, total=len(paths), desc=f"checking {what}", dynamic_ncols=True, leave=False)
    for index, (path, hw) in enumerate(iterator):
        problem = image_problem(path, hw)
        if problem is None:
            keep.append(index)
        else:
            bad.report(path, problem[1], kind=problem[0])
    return keep


def _filter_detection_images(dataset: Any, bad: BadSamples, what: str) -> None:
    """Drop the images of a COCO / VOC dataset whose file is missing, unreadable or of the wrong size."""
    paths = [dataset.annotation(i)["file_name"] for i in range(len(dataset))]
    sizes = [dataset.image_hw(i) for i in range(len(dataset))]
    keep = check_image_files(paths, bad, declared_hw=sizes, what=what)
    if len(keep) != len(dataset):
        dataset.keep_images(keep)


def _classes_with_boxes(dataset: Any) -> set[int]:
    return {int(label) for i in range(len(dataset)) for label in dataset.annotation(i)["labels"]}


def check_detection_sets(train_set: Any, val_set: Any, cfg: Any, out_dir: str | os.PathLike) -> None:
    """Before training a detector: image files of both sets (dropped or an error, by ``data.on_bad_sample``), a
    training set with boxes, a warning for classes with validation boxes but no training box; writes the skip list.
    """
    data = cfg.data
    collections = []
    for dataset, split in ((train_set, "train"), (val_set, "val")):
        bad = getattr(dataset, "bad_samples", None)  # what the dataset's own loading reported
        bad = bad if bad is not None else BadSamples.from_config(cfg)
        _filter_detection_images(dataset, bad, f"{split} images")
        collections.append(bad)
    write_skipped(out_dir, *collections)
    if len(train_set) == 0:
        raise ValueError(f"data.train_ann {data.train_ann}: the training set has no usable images")
    trained = _classes_with_boxes(train_set)
    if not trained:
        raise ValueError(
            f"data.train_ann {data.train_ann}: the training set has {len(train_set)} images but no "
            "boxes (all missing, crowd, difficult or dropped); a detector cannot learn from it"
        )
    names = [str(c["name"]) for c in val_set.categories]
    unseen = sorted(_classes_with_boxes(val_set) - trained)
    if unseen:
        listed = ", ".join(names[label - 1] for label in unseen)
        message = (
            f"classes with validation boxes but no training box (their AP will stay near 0): {listed} "
            f"(data.train_ann {data.train_ann})"
        )
        warnings.warn(message, stacklevel=2)  # like the loaders' counted drops: once, in one line


def check_cls_sets(train_set: Any, val_set: Any, cfg: Any, out_dir: str | os.PathLike) -> None:
    """Before training a classifier: every training and validation image's header (a corrupt val image is reported
    now, not at the first evaluation); bad ones dropped or an error, by ``data.on_bad_sample``; writes the skip list."""
    bad = BadSamples.from_config(cfg)
    for dataset, split in ((train_set, "train"), (val_set, "val")):
        keep = check_image_files(dataset.paths, bad, what=f"{split} images")
        if len(keep) != len(dataset.samples):
            dataset.samples = [dataset.samples[i] for i in keep]
            dataset.targets = [label for _, label in dataset.samples]
        if not dataset.samples:
            raise ValueError(f"data.{split}_dir {dataset.root}: no usable image left after the checks")
    write_skipped(out_dir, bad)


def check_loc_records(records: list[Any], bad: BadSamples, what: str) -> list[Any]:
    """The localization records (:class:`~detres.data.datasets.localization.LocRecord`) whose image file is usable."""
    keep = check_image_files([r.path for r in records], bad, what=what)
    if not keep and records:
        raise ValueError(f"{what}: no usable image left after the checks")
    return [records[i] for i in keep]


def check_loc_sets(train: list[Any], val: list[Any], bad: BadSamples) -> tuple[list[Any], list[Any]]:
    """Both localization record lists checked by :func:`check_loc_records`; everything ``bad`` holds (annotation
    skips included) is summarised in one log line."""
    train, val = check_loc_records(train, bad, "train images"), check_loc_records(val, bad, "val images")
    if len(bad):
        log.warning("%s: %s", ", ".join(sorted({s["file"] for s in bad.skipped})[:5]), bad.summary())
    return train, val
