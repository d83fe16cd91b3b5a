"""Tests for detres.inference.visualize: thresholds, box placement and colour, enlargement, ground truth, PNG writes."""

from __future__ import annotations

import numpy as np
import pytest

import detres.utils.atomic as atomic_module
from detres.data.image_io import read_image_rgb
from detres.inference.visualize import (
    VIS_MIN_SIDE,
    class_color,
    draw_detections,
    save_detection_pngs,
    upscale_factor,
    write_png,
)

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
    np.testing.assert_array_equal(at[75, 40], class_color(1))  # its left edge, in the class colour
    np.testing.assert_array_equal(image, _canvas())  # the input is never modified


def test_box_outline_is_drawn_in_the_class_colour_on_its_pixels():
    image = _canvas()
    # Continuous box (40, 50, 90, 100) covers pixel columns 40..89 and rows 50..99.
    drawn = draw_detections(
        image, [[40.0, 50.0, 90.0, 100.0], [100.0, 60.0, 150.0, 110.0]], [1, 2], [0.9, 0.2], NAMES, score_thresh=0.5
    )
    colour = np.array(class_color(1), np.uint8)
    assert tuple(class_color(1)) != tuple(class_color(2))
    for y, x in [(75, 40), (75, 89), (99, 65)]:  # left, right, bottom edge (the label sits above the top)
        np.testing.assert_array_equal(drawn[y, x], colour)
    np.testing.assert_array_equal(drawn[75, 65], [GREY] * 3)  # inside the box: untouched
    np.testing.assert_array_equal(drawn[75, 38], [GREY] * 3)  # just outside the left edge
    # The 0.2-score dog box is below the threshold: its whole area is untouched.
    np.testing.assert_array_equal(drawn[58:112, 98:152], image[58:112, 98:152])
    # Its label (name and score) sits on a filled class-colour box just above the box top, inside the
    # image: the pixel right above the top-left corner is the label box's bottom-left one.
    np.testing.assert_array_equal(drawn[49, 40], colour)


def test_upscale_factor_is_the_smallest_integer_reaching_min_side():
    assert upscale_factor(120, 160, 480) == 4  # 120 * 4 = 480
    assert upscale_factor(96, 150, 480) == 5
    assert upscale_factor(121, 160, 480) == 4  # 484 >= 480; 3 would give 363
    assert upscale_factor(600, 800, 480) == 1  # never shrinks


def test_min_side_enlarges_the_image_and_draws_boxes_at_the_scaled_position():
    image = _canvas()  # 120 x 160 -> factor 4 -> 480 x 640
    drawn = draw_detections(image, [[40.0, 50.0, 90.0, 100.0]], [1], [0.9], NAMES, min_side=480)
    assert drawn.shape == (480, 640, 3)
    colour = np.array(class_color(1), np.uint8)
    # The box covers columns 160..359 and rows 200..399 of the enlarged image.
    for y, x in [(300, 160), (300, 359), (399, 260)]:  # left, right, bottom edge
        np.testing.assert_array_equal(drawn[y, x], colour)
    np.testing.assert_array_equal(drawn[300, 260], [GREY] * 3)  # inside: untouched
    np.testing.assert_array_equal(drawn[300, 155], [GREY] * 3)  # outside the left edge
    np.testing.assert_array_equal(drawn[300, 40], [GREY] * 3)  # where the unscaled box edge would be
    # The label sits on a filled class-colour background above the box top, tall enough to read (>= 16 px).
    column = (drawn[:200, 162] == colour).all(axis=1)
    assert column[200 - 16 : 200].all()
    # The pixels are enlarged with nearest neighbour: an untouched corner block keeps the source pixel value.
    image2 = image.copy()
    image2[0, 0] = (10, 20, 30)
    np.testing.assert_array_equal(
        draw_detections(image2, [], [], [], NAMES, min_side=480)[:4, :4],
        np.broadcast_to(np.array([10, 20, 30], np.uint8), (4, 4, 3)),
    )


def test_ground_truth_is_a_dashed_outline_without_label():
    image = _canvas()
    drawn = draw_detections(image, [], [], [], NAMES, min_side=480, gt_boxes=[[40.0, 50.0, 90.0, 100.0]], gt_labels=[2])
    colour = np.array(class_color(2), np.uint8)
    left_edge = (drawn[200:400, 160] == colour).all(axis=1)
    # Dashes of 6 px on, 6 px off (3 x the line thickness round(2 * 480 / 600) = 2), from the top corner
    # (row 200) down; the last row, 399, is the bottom edge's first dash.
    rows = np.arange(200, 400)
    np.testing.assert_array_equal(left_edge, ((rows - 200) % 12 < 6) | (rows == 399))
    np.testing.assert_array_equal(drawn[150:199, 160:360], np.full((49, 200, 3), GREY, np.uint8))  # no label
    assert (drawn[300, 170:350] == GREY).all()  # interior untouched


def test_save_detection_pngs_writes_enlarged_images(tmp_path):
    src = tmp_path / "img_7.png"
    write_png(src, np.full((96, 130, 3), GREY, np.uint8))

    class OneImage:
        def annotation(self, index):
            return {
                "image_id": 7,
                "file_name": str(src),
                "boxes": np.array([[10.0, 10.0, 50.0, 60.0]], np.float32),
                "labels": np.array([1]),
            }

    det = {
        "image_id": 7,
        "boxes": np.array([[12.0, 10.0, 50.0, 60.0]]),
        "labels": np.array([2]),
        "scores": np.array([0.8]),
    }
    [path] = save_detection_pngs(OneImage(), [det], NAMES, tmp_path / "vis")
    png = read_image_rgb(path)
    assert path.name == "img_7.png" and min(png.shape[:2]) >= VIS_MIN_SIDE == 480
    assert png.shape[:2] == (96 * 5, 130 * 5)
    np.testing.assert_array_equal(png[150, 60], class_color(2))  # detection's left edge at x = 12 * 5


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
