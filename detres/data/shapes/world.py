"""Shapes world: a seeded generator of toy classification/detection/localization data in standard file formats.

Ten shape categories, each with its own texture and a jittered hue, are drawn with OpenCV on
cluttered backgrounds (gradients, low-frequency blotches, noise, small blobs and thin lines that
are not objects). The same categories are written in three on-disk layouts so that every loader
reads real files:

* ``<root>/cls/{train,val}/<class>/*.png`` -- ImageFolder, one object per image;
* ``<root>/det/images/*.png`` + ``<root>/det/annotations/instances_{train,val}.json`` (COCO) and
  ``<root>/det/voc/{Annotations,JPEGImages,ImageSets/Main}`` (PASCAL VOC) describing the same boxes;
* ``<root>/loc/{Annotations,Data}/{train,val}/`` -- ILSVRC CLS-LOC style XML + images, with
  ``LOC_synset_mapping.txt`` and ``LOC_{train,val}_solution.csv``.

Coordinate conventions. In memory (``Scene.boxes``) boxes are float32 xyxy in continuous 0-based
pixel coordinates: a box covering pixel columns ``i0..i1`` is ``(i0, ., i1 + 1, .)``. COCO files
hold ``[x, y, w, h] = [i0, j0, i1 - i0 + 1, j1 - j0 + 1]``. VOC *and* the ILSVRC-style XML/CSV hold
1-based inclusive integers ``(i0 + 1, j0 + 1, i1 + 1, j1 + 1)`` (ImageNet publishes its boxes "in
PASCAL VOC format"), so the project's VOC rule ``(x1 - 1, y1 - 1, x2, y2)`` recovers the continuous box
exactly. Every box is the tight box of the object's visible pixels (its mask after clipping to the
image and removing what later objects cover), so it is exact by construction.

Every image has its own random stream keyed by (seed, task, split, index), so a set generated with
smaller counts is a prefix of a larger one and the output is byte-identical for a given seed.

The generator is split by concept: ``shapes_render`` draws one object, ``shapes_scene`` composes
images, ``shapes_writers`` writes the file layouts; this module is the entry point (idempotent
generation, paths, summary) and re-exports the public names of the other three.
"""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from detres.data.shapes.render import CATEGORIES, TEXTURES, WNIDS, render_object
from detres.data.shapes.scene import (
    DIFFICULT_MIN_SIDE,
    DIFFICULT_MIN_VISIBLE_FRACTION,
    Scene,
    check_size_range,
    compose_scene,
    render_background,
    render_classification_image,
    render_detection_image,
    render_localization_image,
)
from detres.data.shapes.writers import GENERATOR_VERSION, image_rng, json_text

# Bound as module globals so that generate_shapes_world looks them up here (tests patch them).
from detres.data.shapes.writers import write_cls_task as _generate_cls
from detres.data.shapes.writers import write_det_task as _generate_det
from detres.data.shapes.writers import write_loc_task as _generate_loc
from detres.utils.atomic import atomic_write_text

__all__ = [
    "CATEGORIES",
    "DIFFICULT_MIN_SIDE",
    "DIFFICULT_MIN_VISIBLE_FRACTION",
    "GENERATOR_VERSION",
    "MARKER_NAME",
    "SMALL_COUNTS",
    "Scene",
    "TEXTURES",
    "WNIDS",
    "compose_scene",
    "generate_shapes_world",
    "image_rng",
    "render_background",
    "render_classification_image",
    "render_detection_image",
    "render_localization_image",
    "render_object",
    "shapes_world_paths",
    "summarize_shapes_world",
]

MARKER_NAME = ".shapes_world.json"
_OWNED_SUBDIRS = ("cls", "det", "loc")

# Counts for ``--small`` / quick experiments (the function defaults are the README demo sizes).
SMALL_COUNTS: dict[str, int] = dict(
    num_cls_train_per_class=10,
    num_cls_val_per_class=4,
    num_det_train=40,
    num_det_val=16,
    num_loc_train=30,
    num_loc_val=10,
)


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < 1_000_000:
        raise ValueError(f"{name}: expected an integer in [0, 1e6), got {value!r}")
    return int(value)


def shapes_world_paths(root: str | Path) -> dict[str, Path]:
    """Where ``generate_shapes_world(root)`` puts things (whether or not they exist yet)."""
    root = Path(root)
    return {
        "root": root,
        "marker": root / MARKER_NAME,
        "cls_train": root / "cls" / "train",
        "cls_val": root / "cls" / "val",
        "det_images": root / "det" / "images",
        "det_coco_train": root / "det" / "annotations" / "instances_train.json",
        "det_coco_val": root / "det" / "annotations" / "instances_val.json",
        "voc_root": root / "det" / "voc",
        "loc_root": root / "loc",
        "loc_synset_mapping": root / "loc" / "LOC_synset_mapping.txt",
        "loc_train_solution": root / "loc" / "LOC_train_solution.csv",
        "loc_val_solution": root / "loc" / "LOC_val_solution.csv",
    }


def _read_marker(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable shapes-world marker ({exc}); delete the folder to regenerate") from exc
    if not isinstance(marker, dict) or marker.get("generator") != "detres.data.shapes.world":
        raise ValueError(f"{path}: not a detres shapes-world marker; refusing to touch {path.parent}")
    return marker


def generate_shapes_world(
    root: str | Path,
    *,
    seed: int = 0,
    num_cls_train_per_class: int = 100,
    num_cls_val_per_class: int = 25,
    num_det_train: int = 300,
    num_det_val: int = 60,
    num_loc_train: int = 200,
    num_loc_val: int = 50,
    cls_size: tuple[int, int] = (64, 96),
    det_size: tuple[int, int] = (96, 160),
    loc_size: tuple[int, int] = (96, 160),
) -> dict[str, Path]:
    """Write the shapes world under ``root`` and return the paths of what was written.

    Idempotent: a marker file ``<root>/.shapes_world.json`` records the parameters and is marked
    complete last; a call with the same parameters on a complete folder writes nothing. With other
    parameters, or after an interrupted run, the generator's own sub-folders (cls/, det/, loc/) are
    deleted and rewritten. A folder that has those sub-folders but no marker is refused.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    params: dict[str, Any] = {
        "seed": int(seed),
        "num_cls_train_per_class": _check_count("num_cls_train_per_class", num_cls_train_per_class),
        "num_cls_val_per_class": _check_count("num_cls_val_per_class", num_cls_val_per_class),
        "num_det_train": _check_count("num_det_train", num_det_train),
        "num_det_val": _check_count("num_det_val", num_det_val),
        "num_loc_train": _check_count("num_loc_train", num_loc_train),
        "num_loc_val": _check_count("num_loc_val", num_loc_val),
        "cls_size": list(check_size_range("cls_size", cls_size)),
        "det_size": list(check_size_range("det_size", det_size)),
        "loc_size": list(check_size_range("loc_size", loc_size)),
    }
    paths = shapes_world_paths(root)
    root = paths["root"]
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"shapes world root {root} exists and is not a directory")
    marker = _read_marker(paths["marker"])
    if (
        marker is not None
        and marker.get("status") == "complete"
        and marker.get("params") == params
        and marker.get("version") == GENERATOR_VERSION
    ):
        return paths
    owned = [root / d for d in _OWNED_SUBDIRS]
    if marker is None and any(p.exists() for p in owned):
        raise FileExistsError(
            f"{root} already has {', '.join(p.name for p in owned if p.exists())}/ but no {MARKER_NAME}; "
            "it was not written by generate_shapes_world, refusing to overwrite (choose an empty folder)"
        )
    for p in owned:
        if p.exists():
            shutil.rmtree(p)
    header = {"generator": "detres.data.shapes.world", "version": GENERATOR_VERSION, "params": params}
    atomic_write_text(paths["marker"], json_text({**header, "status": "incomplete"}))

    p = params
    _generate_cls(
        root,
        p["seed"],
        {"train": p["num_cls_train_per_class"], "val": p["num_cls_val_per_class"]},
        tuple(p["cls_size"]),
    )
    _generate_det(root, p["seed"], {"train": p["num_det_train"], "val": p["num_det_val"]}, tuple(p["det_size"]))
    _generate_loc(root, p["seed"], {"train": p["num_loc_train"], "val": p["num_loc_val"]}, tuple(p["loc_size"]))
    atomic_write_text(paths["marker"], json_text({**header, "status": "complete"}))
    return paths


def summarize_shapes_world(root: str | Path) -> dict[str, Any]:
    """Counts per task, split and class, read back from the files under ``root``."""
    paths = shapes_world_paths(root)
    marker = _read_marker(paths["marker"])
    if marker is None or marker.get("status") != "complete":
        raise FileNotFoundError(f"{paths['root']}: no complete shapes world here (missing or incomplete {MARKER_NAME})")
    summary: dict[str, Any] = {"params": marker["params"], "cls": {}, "det": {}, "loc": {}}
    for split in ("train", "val"):
        summary["cls"][split] = {name: len(list((paths[f"cls_{split}"] / name).glob("*.png"))) for name in CATEGORIES}
        coco = json.loads(paths[f"det_coco_{split}"].read_text(encoding="utf-8"))
        per_class = {name: 0 for name in CATEGORIES}
        for ann in coco["annotations"]:
            per_class[CATEGORIES[ann["category_id"] - 1]] += 1
        summary["det"][split] = {"images": len(coco["images"]), "objects": per_class}
        loc_images = {name: 0 for name in CATEGORIES}
        loc_objects = 0
        for xml_path in sorted((paths["loc_root"] / "Annotations" / split).glob("*.xml")):
            names = [o.findtext("name") for o in ET.parse(xml_path).getroot().iter("object")]
            loc_images[CATEGORIES[WNIDS.index(names[0])]] += 1
            loc_objects += len(names)
        summary["loc"][split] = {"images": loc_images, "objects": loc_objects}
    return summary
