"""Which library runs COCO evaluation: pycocotools (the default and the reference) or faster-coco-eval (C++)."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "check_backend", "check_integer_ids", "coco_classes"]

BACKENDS = ("pycocotools", "faster_coco_eval")
DEFAULT_BACKEND = "pycocotools"
_INSTALL_HINT = "pip install faster-coco-eval (or, in a detres checkout, pip install -e '.[fast-eval]')"


def check_backend(backend: str) -> str:
    """``backend`` if it names a backend, else a ValueError listing the choices."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown COCO evaluation backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    return backend


def coco_classes(backend: str = DEFAULT_BACKEND) -> tuple[type, type]:
    """The (COCO, COCOeval) classes of ``backend``; faster-coco-eval's COCOeval is its ``COCOeval_faster``."""
    if check_backend(backend) == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    try:
        from faster_coco_eval import COCO, COCOeval_faster
    except ImportError as exc:
        raise ImportError(f"COCO evaluation backend 'faster_coco_eval' is not installed: {_INSTALL_HINT}") from exc
    return COCO, COCOeval_faster


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_integer_ids(dataset: Mapping[str, Any], name: str, backend: str) -> None:
    """faster-coco-eval casts image ids to int and its C++ core takes numeric ids: a string id is mangled
    ('007' becomes 7) or fails deep inside; refuse it here, naming the entry (pycocotools takes any id)."""
    if backend != "faster_coco_eval":
        return
    for key in ("images", "categories", "annotations"):
        for i, entry in enumerate(dataset.get(key, [])):
            for field in ("id", "image_id", "category_id"):
                if field in entry and not _is_integer(entry[field]):
                    raise ValueError(
                        f"{name}: {key}[{i}]: {field} {entry[field]!r} is not an integer; backend 'faster_coco_eval' "
                        "needs integer image, category and annotation ids (use backend 'pycocotools' or renumber)"
                    )
