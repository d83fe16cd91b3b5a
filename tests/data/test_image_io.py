"""Tests for detres.data.image_io: RGB order, channel handling, EXIF, and errors that name the file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from detres.data.image_io import ImageReadError, read_image_rgb


def _pattern(h: int = 6, w: int = 8) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_png_comes_back_rgb_uint8(tmp_path: Path) -> None:
    bgr = _pattern()
    path = tmp_path / "colour.png"
    assert cv2.imwrite(str(path), bgr)
    rgb = read_image_rgb(path)
    assert rgb.dtype == np.uint8 and rgb.shape == (6, 8, 3) and rgb.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(rgb, bgr[:, :, ::-1])


def test_greyscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    grey = _pattern()[:, :, 0]
    path = tmp_path / "grey.png"
    assert cv2.imwrite(str(path), grey)
    rgb = read_image_rgb(path)
    assert rgb.shape == (6, 8, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[:, :, c], grey)


def test_alpha_channel_is_dropped(tmp_path: Path) -> None:
    bgr = _pattern()
    alpha = np.full(bgr.shape[:2] + (1,), 7, dtype=np.uint8)
    path = tmp_path / "rgba.png"
    assert cv2.imwrite(str(path), np.concatenate([bgr, alpha], axis=2))
    rgb = read_image_rgb(path)
    assert rgb.shape == (6, 8, 3)
    np.testing.assert_array_equal(rgb, bgr[:, :, ::-1])


def test_16_bit_png_is_reduced_to_8_bit(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    assert cv2.imwrite(str(path), np.full((3, 5), 0x1234, dtype=np.uint16))
    rgb = read_image_rgb(path)
    assert rgb.dtype == np.uint8 and rgb.shape == (3, 5, 3)
    assert (rgb == 0x12).all()  # the high byte


def _jpeg_with_exif_orientation(path: Path, image: np.ndarray, orientation: int) -> None:
    ok, buf = cv2.imencode(".jpg", image)
    assert ok
    data = buf.tobytes()
    # Minimal little-endian TIFF block with one IFD entry: Orientation (0x0112), SHORT, count 1.
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + struct.pack("<HHII", 0x0112, 3, 1, orientation)
    tiff += struct.pack("<I", 0)
    payload = b"Exif\x00\x00" + tiff
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    path.write_bytes(data[:2] + app1 + data[2:])


def test_exif_orientation_is_ignored_so_pixels_match_annotations(tmp_path: Path) -> None:
    image = np.zeros((20, 40, 3), dtype=np.uint8)
    image[:, :10] = 255
    path = tmp_path / "rotated_tag.jpg"
    _jpeg_with_exif_orientation(path, image, orientation=6)
    # The tag is real: OpenCV's default reader rotates the image by 90 degrees.
    assert cv2.imread(str(path)).shape == (40, 20, 3)
    rgb = read_image_rgb(path)
    assert rgb.shape == (20, 40, 3)
    assert rgb[:, :8].mean() > 240 and rgb[:, 12:].mean() < 15


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "missing.jpg"
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        read_image_rgb(path)


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="is a directory"):
        read_image_rgb(tmp_path)


def test_empty_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"empty\.jpg.*empty"):
        read_image_rgb(path)


def test_garbage_bytes_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "not_an_image.jpg"
    path.write_text(json.dumps({"this": "is json"}))
    with pytest.raises(ValueError, match=r"not_an_image\.jpg.*corrupt"):
        read_image_rgb(path)


def test_truncated_png_names_the_file(tmp_path: Path) -> None:
    ok, buf = cv2.imencode(".png", _pattern(50, 50))
    assert ok
    path = tmp_path / "truncated.png"
    path.write_bytes(buf.tobytes()[: len(buf) // 2])
    with pytest.raises(ImageReadError, match=r"truncated\.png"):
        read_image_rgb(path)


def test_real_coco_jpeg_matches_annotated_size(shared_dir: Path) -> None:
    root = shared_dir / "data" / "coco128"
    ann_file = root / "annotations" / "instances_train2017.json"
    if not ann_file.is_file():
        pytest.skip(f"coco128 not found at {root}")
    info = json.loads(ann_file.read_text())["images"][0]
    rgb = read_image_rgb(root / "train2017" / info["file_name"])
    assert rgb.shape == (info["height"], info["width"], 3)
    # RGB order: same pixels as OpenCV's BGR read, channels reversed.
    np.testing.assert_array_equal(rgb, cv2.imread(str(root / "train2017" / info["file_name"]))[:, :, ::-1])
