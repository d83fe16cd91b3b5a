"""Parsing numbers from text annotations and result files."""

from __future__ import annotations

import math

__all__ = ["parse_finite_number"]


def parse_finite_number(text: str, where: str) -> int | float:
    """``text`` as a finite number: integral values become ints (pixel coordinates, labels), others stay floats.

    Raises ValueError starting with ``where`` (the file and field) for text that is not a number, NaN or infinite.
    """
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite number, got {text!r}")
    return int(value) if value.is_integer() else value
