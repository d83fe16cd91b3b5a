"""Tests for detres.inference.visualize: score-thresholded drawing, box placement and colour, atomic PNG writes."""
from __future__ import annotations

import numpy as np
import pytest

import detres.engine.atomic as atomic_module
from detres.data.image_io import read_image_rgb
from detres.inference.visualize import class_color, draw_detections, write_png

GREY = 128
NAMES = ["cat", "dog"]


def _canvas() -> np.ndarray:
    return np.full((120, 160, 3), GREY, np.uint8)


def test_only_detections_at_or_above_the_threshold_are_drawn():
    image = _canvas()
    box = [[40.0, 50.0, 90.0, 100.0]]
    below = draw_detections(image, box, [1], [0.49], NAMES, score_thresh=0.5)
    np.testing.assert_array_equal(below, image)  # nothing drawn at all
    at = draw_detections(image, box, [1], [0.5], NAMES, score_thresh=0.5)
    assert (at != image).any()
    np.testing.assert_array_equal(image, _canvas())  # the input is never modified


def test_box_outline_is_drawn_in_the_class_colour_on_its_pixels():
    image = _canvas()
    # Continuous box (40, 50, 90, 100) covers pixel columns 40..89 and rows 50..99.
    drawn = draw_detections(image, [[40.0, 50.0, 90.0, 100.0], [100.0, 60.0, 150.0, 110.0]], [1, 2], [0.9, 0.2],
                            NAMES, score_thresh=0.5)
    colour = np.array(class_color(1), np.uint8)
    assert tuple(class_color(1)) != tuple(class_color(2))
    for y, x in [(75, 40), (75, 89), (99, 65)]:  # left, right, bottom edge (the label sits above the top)
        np.testing.assert_array_equal(drawn[y, x], colour)
    np.testing.assert_array_equal(drawn[75, 65], [GREY] * 3)  # inside the box: untouched
    np.testing.assert_array_equal(drawn[75, 38], [GREY] * 3)  # just outside the left edge
    # The 0.2-score dog box is below the threshold: its whole area is untouched.
    np.testing.assert_array_equal(drawn[58:112, 98:152], image[58:112, 98:152])
    # Its label (name and score) is drawn just above the box top, inside the image.
    assert (drawn[30:50, 40:90] != GREY).any()


def test_write_png_round_trips_rgb(tmp_path):
    image = np.zeros((5, 7, 3), np.uint8)
    image[1, 2] = (255, 0, 0)  # pure red must come back red, not blue (cv2 writes BGR)
    image[3, 4] = (10, 200, 30)
    path = tmp_path / "sub" / "x.png"
    write_png(path, image)
    np.testing.assert_array_equal(read_image_rgb(path), image)


def test_write_png_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "x.png"
    old = np.full((4, 4, 3), 7, np.uint8)
    write_png(path, old)

    def failing_fsync(fd):
        raise OSError("disk full")

    # A failure after the bytes went to the temporary file must leave the old PNG intact and no debris.
    monkeypatch.setattr(atomic_module.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_png(path, np.zeros((4, 4, 3), np.uint8))
    np.testing.assert_array_equal(read_image_rgb(path), old)
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]
