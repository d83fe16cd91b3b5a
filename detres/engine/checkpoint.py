"""Atomic checkpoint and file writing (temp file + os.replace) and safe loading (weights_only)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from detres.engine.atomic import _atomic_write, atomic_write_bytes, atomic_write_text  # noqa: F401  (re-exported)


def save_checkpoint(path: str | Path, obj: dict[str, Any]) -> None:
    """Save ``obj`` with torch.save so that a crash mid-write never leaves a truncated checkpoint."""
    _atomic_write(path, lambda handle: torch.save(obj, handle))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint onto the CPU with ``weights_only=True``; clear error when missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt/foreign files
        raise ValueError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj
