"""Checkpoint files: atomic saving (temp file + os.replace) and safe loading (CPU, ``weights_only=True``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from detres.utils.atomic import _atomic_write


def save_checkpoint(path: str | Path, obj: dict[str, Any]) -> None:
    """Save ``obj`` with torch.save so that a crash mid-write never leaves a truncated checkpoint."""
    _atomic_write(path, lambda handle: torch.save(obj, handle))


def read_torch_file(path: str | os.PathLike, *, what: str = "checkpoint", mmap: bool = False) -> object:
    """torch.load ``path`` onto the CPU, tensors only (``weights_only=True``); clear errors naming the file.

    ``what`` names the file in those errors ("checkpoint", "weights file"). ``mmap`` maps the tensors
    instead of reading them, for when only the small metadata is wanted (zip files; a legacy file is
    read whole).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    if mmap:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # legacy (non-zip) files cannot be mapped: read them whole below
            pass
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt/foreign files
        raise ValueError(f"cannot read {what} {path}: {type(exc).__name__}: {exc}") from exc


def load_checkpoint(path: str | Path, *, mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint dict onto the CPU (see :func:`read_torch_file`); clear error when missing or unreadable."""
    obj = read_torch_file(path, mmap=mmap)
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj
