"""Tests for detres.structures.boxes: format conversions, clipping, inside-image and non-empty masks."""

import pytest
import torch

from detres.structures.boxes import (
    box_area,
    boxes_inside_image,
    clip_boxes,
    nonempty_mask,
    remove_small_boxes,
    voc_to_xyxy,
    xywh_to_xyxy,
    xyxy_to_voc,
    xyxy_to_xywh,
)


def test_xywh_xyxy_known_values_and_round_trip():
    xywh = torch.tensor([[10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 1.5, 2.5]])
    xyxy = xywh_to_xyxy(xywh)
    assert torch.equal(xyxy, torch.tensor([[10.0, 20.0, 40.0, 60.0], [0.0, 0.0, 1.5, 2.5]]))
    assert torch.equal(xyxy_to_xywh(xyxy), xywh)


def test_voc_conversion_follows_contract():
    # VOC 1-based inclusive (1, 1, 10, 20) covers pixels 0..9 x 0..19 -> continuous [0, 10] x [0, 20].
    voc = torch.tensor([[1.0, 1.0, 10.0, 20.0], [48.0, 240.0, 195.0, 371.0]])
    xyxy = voc_to_xyxy(voc)
    assert torch.equal(xyxy, torch.tensor([[0.0, 0.0, 10.0, 20.0], [47.0, 239.0, 195.0, 371.0]]))
    # Width = x2 - x1 equals the VOC inclusive width x2 - x1 + 1.
    assert xyxy[0, 2] - xyxy[0, 0] == voc[0, 2] - voc[0, 0] + 1
    assert torch.equal(xyxy_to_voc(xyxy), voc)


def test_clip_boxes_to_continuous_image_edge():
    boxes = torch.tensor([[-5.0, -3.0, 120.0, 50.0], [10.0, 10.0, 20.0, 90.0]])
    clipped = clip_boxes(boxes, (60, 100))
    assert torch.equal(clipped, torch.tensor([[0.0, 0.0, 100.0, 50.0], [10.0, 10.0, 20.0, 60.0]]))


def test_boxes_inside_image_with_and_without_border():
    boxes = torch.tensor(
        [
            [0.0, 0.0, 100.0, 60.0],  # exactly the image: inside
            [-1.0, 0.0, 50.0, 50.0],  # 1 px outside on the left
            [10.0, 10.0, 100.5, 20.0],  # 0.5 px outside on the right
            [10.0, 10.0, 20.0, 20.0],
        ]
    )
    assert boxes_inside_image(boxes, (60, 100)).tolist() == [True, False, False, True]
    assert boxes_inside_image(boxes, (60, 100), allowed_border=1).tolist() == [True, True, True, True]


def test_nonempty_mask_and_torchvision_reexports():
    boxes = torch.tensor([[0.0, 0.0, 0.0, 5.0], [0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 3.0, 4.0]])
    assert nonempty_mask(boxes).tolist() == [False, True, True]
    assert nonempty_mask(boxes, min_size=2).tolist() == [False, False, True]
    assert torch.equal(box_area(boxes), torch.tensor([0.0, 4.0, 12.0]))
    assert remove_small_boxes(boxes, 2.0).tolist() == [1, 2]


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="boxes"):
        clip_boxes(torch.zeros(3, 5), (10, 10))
    with pytest.raises(ValueError, match="image_hw"):
        boxes_inside_image(torch.zeros(3, 4), (10, 0))
