"""Image file reading with OpenCV: always an RGB uint8 HxWx3 array, or an error that names the file."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

__all__ = ["ImageReadError", "read_image_rgb"]

# IMREAD_COLOR turns greyscale/palette into 3 channels, drops alpha and converts 16-bit to 8-bit.
# IMREAD_IGNORE_ORIENTATION: annotations (COCO, VOC) refer to the stored pixel grid, so an EXIF
# rotation must not be applied or boxes and annotated sizes would no longer match the image.
_READ_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION


class ImageReadError(ValueError):
    """The file exists but is empty, unreadable or not a decodable image."""


def read_image_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as a contiguous ``np.uint8`` array of shape (H, W, 3) in RGB order.

    Raises FileNotFoundError when ``path`` does not exist (or is not a file) and ImageReadError
    (a ValueError) when it cannot be read or decoded; both messages name the file.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not an image file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"image file '{path}' {what}")
    try:
        # np.fromfile + imdecode instead of cv2.imread: works for non-ASCII paths and lets us tell
        # "unreadable" apart from "not an image" (imread returns None for both).
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise ImageReadError(f"image file '{path}' cannot be read: {exc}") from exc
    if data.size == 0:
        raise ImageReadError(f"image file '{path}' is empty (0 bytes)")
    try:
        bgr = cv2.imdecode(data, _READ_FLAGS)
    except cv2.error as exc:
        raise ImageReadError(f"image file '{path}' cannot be decoded by OpenCV: {exc}") from exc
    if bgr is None or bgr.size == 0:
        raise ImageReadError(f"image file '{path}' is corrupt or not an image format OpenCV can decode")
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
