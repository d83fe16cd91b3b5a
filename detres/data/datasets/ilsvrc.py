"""ILSVRC CLS-LOC ground truth: synset list, image set, blacklist and the per-image XML folder.

Every ground-truth reader returns ``{image_id: [(label, (xmin, ymin, xmax, ymax)), ...]}`` with
``label`` the 1-based position of the object's wnid in the synset list (the devkit's label
numbering) and boxes exactly as written: 1-based inclusive pixels. A wnid that is not in the
synset list is an error naming the file (and line), never a silently dropped object.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from detres.data.datasets.voc_xml import parse_voc_xml

__all__ = [
    "read_blacklist",
    "read_image_set",
    "read_loc_xml_folder",
    "read_synsets",
    "synset_labels",
]

Box = tuple[float, float, float, float]


def _lines(path: Path, what: str) -> list[tuple[int, list[str]]]:
    """(line number, whitespace-separated fields) of every non-blank line of a text file."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from None
    return [(n, line.split()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _first_fields(path: Path, what: str) -> list[str]:
    """First field of each non-blank line; a value listed twice is an error naming both lines."""
    values: list[str] = []
    first_line: dict[str, int] = {}
    for number, fields in _lines(path, what):
        if fields[0] in first_line:
            raise ValueError(f"{path}:{number}: {fields[0]!r} is listed twice (first on line {first_line[fields[0]]})")
        first_line[fields[0]] = number
        values.append(fields[0])
    if not values:
        raise ValueError(f"{path}: {what} is empty")
    return values


def read_synsets(path: str | os.PathLike) -> list[str]:
    """Wnids in label order from ``LOC_synset_mapping.txt`` ("n01440764 tench, Tinca tinca") or a plain wnid list.

    Only the first field of each line is used, so Tiny-ImageNet's ``wnids.txt`` reads the same way.
    """
    return _first_fields(Path(path), "synset list")


def synset_labels(synsets: Sequence[str]) -> dict[str, int]:
    """wnid -> 1-based label (the devkit's numbering: line k of the synset list is label k)."""
    return {wnid: k for k, wnid in enumerate(synsets, start=1)}


def read_image_set(path: str | os.PathLike) -> list[str]:
    """Image ids, one per line (first field; ``ImageSets/CLS-LOC/val.txt`` lines are "<id> <index>")."""
    return _first_fields(Path(path), "image set")


def read_blacklist(path: str | os.PathLike, image_ids: Sequence[str]) -> list[str]:
    """Image ids to leave out of the evaluation.

    A line's first field is an image id when it names one of ``image_ids``; otherwise it must be a
    positive integer, read as the devkit's 1-based index into ``image_ids`` (the format of
    ``ILSVRC2014_clsloc_validation_blacklist.txt``). Anything else is an error naming ``file:line``.
    """
    path = Path(path)
    known = set(image_ids)
    out: list[str] = []
    for number, fields in _lines(path, "blacklist"):
        token = fields[0]
        if token in known:
            out.append(token)
        elif token.isdigit() and 1 <= int(token) <= len(image_ids):
            out.append(image_ids[int(token) - 1])
        else:
            raise ValueError(
                f"{path}:{number}: {token!r} is neither an image id of the image set nor an index in "
                f"1..{len(image_ids)}"
            )
    return list(dict.fromkeys(out))


def _label(wnid: str, labels: dict[str, int], where: str) -> int:
    if wnid not in labels:
        raise ValueError(f"{where}: wnid {wnid!r} is not in the synset list ({len(labels)} synsets)")
    return labels[wnid]


def read_loc_xml_folder(
    folder: str | os.PathLike, image_ids: Sequence[str], synsets: Sequence[str], *, bad_samples: Any = None
) -> dict[str, list[tuple[int, Box]]]:
    """Ground truth of ``image_ids`` from ``<folder>/<image_id>.xml`` (ILSVRC CLS-LOC / VOC annotation XML).

    Raises FileNotFoundError for a missing folder or XML file (naming the image id), ValueError
    (naming the file) for a malformed XML, an image without objects or a wnid not in ``synsets``. With
    ``bad_samples`` (a :class:`~detres.data.bad_samples.BadSamples`) each such image is reported there instead
    (which raises under "error") and left out of the result.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"annotations folder not found: {folder}")
    labels = synset_labels(synsets)
    out: dict[str, list[tuple[int, Box]]] = {}
    for image_id in image_ids:
        path = folder / f"{image_id}.xml"
        try:
            out[image_id] = _xml_ground_truth(path, image_id, labels)
        except (FileNotFoundError, ValueError) as exc:
            if bad_samples is None:
                raise
            bad_samples.report(path, str(exc).removeprefix(f"{path}: "))
    return out


def _xml_ground_truth(path: Path, image_id: str, labels: dict[str, int]) -> list[tuple[int, Box]]:
    if not path.is_file():
        raise FileNotFoundError(f"annotation of image {image_id!r} not found: {path}")
    objects = parse_voc_xml(path)["objects"]
    if not objects:
        raise ValueError(f"{path}: no <object> (a localization image needs at least one box)")
    return [(_label(o["name"], labels, f"{path}: object #{k}"), o["bbox"]) for k, o in enumerate(objects)]
