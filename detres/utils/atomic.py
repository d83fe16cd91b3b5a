"""Atomic file writes (temp file in the same folder + fsync + os.replace), strict JSON output, JSON input.

No torch import here, so light command-line paths (e.g. COCO evaluation) stay fast to start.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def _atomic_write(path: str | Path, write) -> None:
    """Write through ``write(fileobj)`` into a temp file in the same folder, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    _atomic_write(path, lambda handle: handle.write(data))


def to_jsonable(obj: Any) -> Any:
    """Convert numpy/torch scalars and arrays and tuples to JSON types; NaN/inf become None (JSON has no NaN)."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray) or (hasattr(obj, "tolist") and hasattr(obj, "dim")):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps_json(obj: Any, *, indent: int | None = 2) -> str:
    """Strict JSON text of ``obj`` (see :func:`to_jsonable`)."""
    return json.dumps(to_jsonable(obj), indent=indent, allow_nan=False)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as strict JSON atomically (numpy values converted, NaN written as null)."""
    atomic_write_text(path, dumps_json(obj, indent=indent) + "\n")
    return Path(path)


def read_json(path: str | os.PathLike, *, what: str = "JSON file") -> Any:
    """Parse the JSON file ``path``; ``what`` names it in the errors (FileNotFoundError, ValueError)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON ({exc})") from None
