"""ILSVRC classification+localization error (top-1/top-5, ground-truth class) and the devkit's prediction text format.

The metric follows the ILSVRC devkit's ``eval_clsloc.m`` / ``compute_overlap.m``:

* Boxes are ``(xmin, ymin, xmax, ymax)`` in inclusive pixel coordinates (ILSVRC XML: 1-based), so a
  box is ``xmax - xmin + 1`` pixels wide; IoU = inclusive-pixel intersection / union.
* A guess ``(label, box)`` is correct for a ground-truth class when its label is that class and its
  box has IoU >= 0.5 with *any* ground-truth box of that class (the devkit marks a guess wrong when
  ``ov < 0.50``, so exactly 0.5 is correct).
* Top-k error of an image: 0 when one of its first k guesses is correct, else 1 (min over guesses).
  An image whose objects have several classes scores the mean over its classes (the devkit's
  ``e(i) / n``); an ILSVRC CLS-LOC image has one class, so its error is 0 or 1.
* Ground-truth-class ("oracle", Table 13 of He et al. 2016) error: the predictor is told the class;
  in the file format that is the *first* guess carrying the ground-truth label. The image is wrong
  when no guess carries it or that guess's box has IoU < 0.5 with every box of the class.
* Classification top-k error: no guess among the first k carries the ground-truth label.
* Blacklisted images are left out of every metric (the devkit leaves them out of the localization
  error only; here classification errors use the same images so the columns are comparable).

Differences from the devkit, on purpose: more than 5 guesses on a line is an error (the devkit
silently drops the extra ones), and every malformed line is an error naming ``file:line``.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from detres.utils.atomic import atomic_write_text
from detres.utils.parsing import parse_finite_number

__all__ = [
    "IOU_THRESH",
    "MAX_GUESSES",
    "Box",
    "Guess",
    "devkit_box",
    "evaluate_localization",
    "format_loc_predictions",
    "guess_is_correct",
    "inclusive_iou",
    "read_loc_predictions",
    "write_loc_predictions",
]

IOU_THRESH = 0.5
MAX_GUESSES = 5

Box = tuple[float, float, float, float]
Guess = tuple[int, Box]  # (label, box); also the form of one ground-truth object


def inclusive_iou(box: Sequence[float], gt: Sequence[float]) -> float:
    """IoU of two inclusive pixel boxes (width = xmax - xmin + 1), as the devkit's compute_overlap; 0 when disjoint."""
    iw = min(box[2], gt[2]) - max(box[0], gt[0]) + 1
    ih = min(box[3], gt[3]) - max(box[1], gt[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (box[2] - box[0] + 1) * (box[3] - box[1] + 1) + (gt[2] - gt[0] + 1) * (gt[3] - gt[1] + 1) - inter
    return inter / union


def devkit_box(box: Sequence[float]) -> Box:
    """detres in-memory box (0-based continuous xyxy) -> devkit 1-based inclusive box ``(x0 + 1, y0 + 1, x1, y1)``.

    The inverse of the VOC rule ``(x1 - 1, y1 - 1, x2, y2)``; the inclusive width ``x1 - (x0 + 1) + 1``
    is the continuous width, so :func:`inclusive_iou` of converted boxes is their continuous IoU.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    return x0 + 1, y0 + 1, x1, y1


def guess_is_correct(guess: Guess, label: int, gt_objects: Sequence[Guess], iou_thresh: float = IOU_THRESH) -> bool:
    """The guess names ``label`` and overlaps some ground-truth box of ``label`` with IoU >= ``iou_thresh``."""
    if guess[0] != label:
        return False
    return any(obj_label == label and inclusive_iou(guess[1], box) >= iou_thresh for obj_label, box in gt_objects)


def _check_box(box: Sequence[Any], where: str) -> None:
    """A box is 4 finite numbers with xmin <= xmax and ymin <= ymax (xmin == xmax: one inclusive pixel)."""
    if len(box) != 4:
        raise ValueError(f"{where}: expected a box (xmin, ymin, xmax, ymax), got {tuple(box)}")
    if not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in box):
        raise ValueError(f"{where}: box coordinates must be finite numbers, got {tuple(box)}")
    if box[2] < box[0] or box[3] < box[1]:
        raise ValueError(f"{where}: box has xmax < xmin or ymax < ymin: {tuple(box)}")


def _check_guesses(image_id: str, guesses: Sequence[Guess], max_guesses: int) -> None:
    if len(guesses) > max_guesses:
        raise ValueError(f"predictions for image {image_id!r}: {len(guesses)} guesses, at most {max_guesses} allowed")
    for j, (_label, box) in enumerate(guesses):
        _check_box(box, f"predictions for image {image_id!r}, guess {j + 1}")


def _image_errors(gt_objects: Sequence[Guess], guesses: Sequence[Guess], iou_thresh: float) -> dict[str, float]:
    """Per-image errors, each the mean over the image's ground-truth classes of a 0/1 error."""
    classes = list(dict.fromkeys(label for label, _ in gt_objects))
    errors = dict.fromkeys(("top1_loc_err", "top5_loc_err", "gt_known_loc_err", "top1_cls_err", "top5_cls_err"), 0.0)
    for label in classes:
        hits = [guess_is_correct(g, label, gt_objects, iou_thresh) for g in guesses]
        named = [g[0] == label for g in guesses]
        first_named = named.index(True) if any(named) else None
        errors["top1_loc_err"] += not any(hits[:1])
        errors["top5_loc_err"] += not any(hits)
        errors["gt_known_loc_err"] += first_named is None or not hits[first_named]
        errors["top1_cls_err"] += not any(named[:1])
        errors["top5_cls_err"] += not any(named)
    return {key: value / len(classes) for key, value in errors.items()}


def evaluate_localization(
    ground_truth: Mapping[str, Sequence[Guess]],
    predictions: Mapping[str, Sequence[Guess]],
    *,
    image_ids: Sequence[str] | None = None,
    blacklist: Iterable[str] = (),
    max_guesses: int = MAX_GUESSES,
    iou_thresh: float = IOU_THRESH,
) -> dict[str, Any]:
    """ILSVRC localization and classification errors over in-memory ground truth and guesses.

    ``ground_truth``: image id -> ``[(label, box), ...]`` (at least one object per image);
    ``predictions``: image id -> up to ``max_guesses`` ``(label, box)`` guesses, most confident first
    (an empty list is allowed and is wrong on every metric). Labels are compared for equality only;
    boxes are inclusive pixel boxes in the ground truth's convention. ``image_ids`` (default: the
    ground truth's keys) are the images scored, minus those in ``blacklist`` (ids that are not in
    ``image_ids`` are ignored). Returns fractions ``top1_loc_err``, ``top5_loc_err``,
    ``gt_known_loc_err``, ``top1_cls_err``, ``top5_cls_err`` and the counts ``num_images`` (images
    scored) and ``num_blacklisted`` (images left out). Raises ValueError naming the image on a
    missing ground truth or prediction entry, an image without objects, more than ``max_guesses``
    guesses or a malformed box, on a repeated image id and when no image is left to score.
    """
    ids = list(ground_truth) if image_ids is None else list(image_ids)
    if len(set(ids)) != len(ids):
        raise ValueError(f"image_ids: {len(ids) - len(set(ids))} image id(s) listed more than once")
    excluded = set(blacklist) & set(ids)
    totals = dict.fromkeys(("top1_loc_err", "top5_loc_err", "gt_known_loc_err", "top1_cls_err", "top5_cls_err"), 0.0)
    scored = 0
    for image_id in ids:
        if image_id in excluded:
            continue
        if image_id not in ground_truth:
            raise ValueError(f"ground truth: no entry for image {image_id!r}")
        if image_id not in predictions:
            raise ValueError(f"predictions: no entry for image {image_id!r}")
        gt_objects, guesses = ground_truth[image_id], predictions[image_id]
        if not gt_objects:
            raise ValueError(f"ground truth: image {image_id!r} has no object (nothing to localize)")
        for k, (_label, box) in enumerate(gt_objects):
            _check_box(box, f"ground truth for image {image_id!r}, object {k + 1}")
        _check_guesses(image_id, guesses, max_guesses)
        for key, value in _image_errors(gt_objects, guesses, iou_thresh).items():
            totals[key] += value
        scored += 1
    if scored == 0:
        raise ValueError(f"no image to evaluate ({len(ids)} listed, {len(excluded)} blacklisted)")
    result: dict[str, Any] = {key: value / scored for key, value in totals.items()}
    result.update(num_images=scored, num_blacklisted=len(excluded), iou_thresh=iou_thresh, max_guesses=max_guesses)
    return result


# ------------------------------------------------------------------ the devkit's prediction text format
def _parse_line(line: str, where: str, num_classes: int, max_guesses: int) -> list[Guess]:
    """``label xmin ymin xmax ymax`` groups -> guesses; labels are integers in 1..num_classes."""
    tokens = line.split()
    if len(tokens) % 5:
        raise ValueError(
            f"{where}: expected groups of 5 numbers 'label xmin ymin xmax ymax', got {len(tokens)} numbers"
        )
    if len(tokens) > 5 * max_guesses:
        raise ValueError(f"{where}: {len(tokens) // 5} guesses, at most {max_guesses} allowed")
    guesses = []
    for j in range(0, len(tokens), 5):
        label = parse_finite_number(tokens[j], f"{where}: guess {j // 5 + 1} label")
        if not isinstance(label, int) or not 1 <= label <= num_classes:
            raise ValueError(
                f"{where}: guess {j // 5 + 1}: label must be an integer in 1..{num_classes}, got {tokens[j]!r}"
            )
        box = tuple(parse_finite_number(t, f"{where}: guess {j // 5 + 1} box") for t in tokens[j + 1 : j + 5])
        _check_box(box, f"{where}: guess {j // 5 + 1}")
        guesses.append((label, box))
    return guesses


def read_loc_predictions(
    path: str | os.PathLike, image_ids: Sequence[str], num_classes: int, *, max_guesses: int = MAX_GUESSES
) -> dict[str, list[Guess]]:
    """Read a devkit prediction file: line i holds the guesses for ``image_ids[i]``.

    Each line has 0 to ``max_guesses`` groups ``label xmin ymin xmax ymax`` separated by whitespace,
    most confident first; labels are 1-based indices into the synset list, boxes 1-based inclusive
    pixels (integers, or decimals). An empty line means no guess. Raises FileNotFoundError, or
    ValueError naming ``file:line`` for a wrong number of lines, more than ``max_guesses`` guesses,
    a label outside 1..num_classes, a malformed number or a box with xmax < xmin / ymax < ymin.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prediction file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from None
    if len(lines) != len(image_ids):
        raise ValueError(
            f"{path}: {len(lines)} lines, expected one line per image of the image list ({len(image_ids)} images)"
        )
    return {
        image_id: _parse_line(line, f"{path}:{number}", num_classes, max_guesses)
        for number, (image_id, line) in enumerate(zip(image_ids, lines), start=1)
    }


def _format_number(value: float) -> str:
    """Integers as integers, other floats in their shortest exact form (so reading back gives the same value)."""
    if isinstance(value, numbers.Integral) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def format_loc_predictions(
    image_ids: Sequence[str], predictions: Mapping[str, Sequence[Guess]], *, max_guesses: int = MAX_GUESSES
) -> str:
    """The prediction file's text: one line per image of ``image_ids`` (see :func:`read_loc_predictions`)."""
    lines = []
    for image_id in image_ids:
        if image_id not in predictions:
            raise ValueError(f"predictions: no entry for image {image_id!r}")
        guesses = predictions[image_id]
        _check_guesses(image_id, guesses, max_guesses)
        for label, _box in guesses:
            if not isinstance(label, numbers.Integral) or isinstance(label, bool) or label < 1:
                raise ValueError(f"predictions for image {image_id!r}: labels must be 1-based integers, got {label!r}")
        lines.append(" ".join(" ".join(_format_number(v) for v in (label, *box)) for label, box in guesses))
    return "".join(line + "\n" for line in lines)


def write_loc_predictions(
    path: str | os.PathLike,
    image_ids: Sequence[str],
    predictions: Mapping[str, Sequence[Guess]],
    *,
    max_guesses: int = MAX_GUESSES,
) -> Path:
    """Write the devkit prediction file atomically (labels 1-based, boxes as given: 1-based inclusive pixels)."""
    atomic_write_text(path, format_loc_predictions(image_ids, predictions, max_guesses=max_guesses))
    return Path(path)
