"""Tests for detres.models.detection.anchors: hand-computed anchors, ordering, and torchvision agreement."""

import math

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList

from detres.models.detection.anchors import AnchorGenerator


def test_cell_anchors_hand_values_stride16_size128():
    gen = AnchorGenerator(sizes=(128,), aspect_ratios=(0.5, 1.0, 2.0), stride=16)
    # ratio 0.5 (h/w): h = 128*sqrt(.5) = 90.51, w = 181.02 -> half extents 45.25 / 90.51 rounded.
    expected = torch.tensor(
        [
            [-91.0, -45.0, 91.0, 45.0],
            [-64.0, -64.0, 64.0, 64.0],
            [-45.0, -91.0, 45.0, 91.0],
        ]
    )
    assert gen.num_anchors_per_location() == 3
    assert torch.equal(gen.cell_anchors(), expected)


def test_cell_anchor_areas_are_size_squared_up_to_rounding():
    gen = AnchorGenerator(sizes=(128, 256, 512), aspect_ratios=(0.5, 1.0, 2.0), stride=16)
    cell = gen.cell_anchors()
    areas = (cell[:, 2] - cell[:, 0]) * (cell[:, 3] - cell[:, 1])
    sizes = torch.tensor([128.0, 256.0, 512.0]).repeat(3)  # ratio-major, then size
    assert gen.num_anchors_per_location() == 9
    assert torch.allclose(areas, sizes**2, rtol=0.01)
    ratios = (cell[:, 3] - cell[:, 1]) / (cell[:, 2] - cell[:, 0])
    assert torch.allclose(ratios, torch.tensor([0.5, 1.0, 2.0]).repeat_interleave(3), rtol=0.02)


def test_grid_order_is_y_x_anchor():
    gen = AnchorGenerator(sizes=(128,), aspect_ratios=(0.5, 1.0, 2.0), stride=16)
    anchors = gen((2, 3))
    assert anchors.shape == (2 * 3 * 3, 4)
    cell = gen.cell_anchors()
    for y in range(2):
        for x in range(3):
            for a in range(3):
                shift = torch.tensor([16.0 * x, 16.0 * y, 16.0 * x, 16.0 * y])
                assert torch.equal(anchors[(y * 3 + x) * 3 + a], cell[a] + shift)
    # Spot check one row by hand: cell (y=1, x=2), ratio 1 -> centre (32, 16).
    assert anchors[(1 * 3 + 2) * 3 + 1].tolist() == [-32.0, -48.0, 96.0, 80.0]


def test_offset_half_puts_centres_at_original_faster_rcnn_centre():
    gen = AnchorGenerator(sizes=(128,), aspect_ratios=(1.0,), stride=16, offset=0.5)
    anchors = gen((1, 2))
    centres_x = (anchors[:, 0] + anchors[:, 2]) / 2
    centres_y = (anchors[:, 1] + anchors[:, 3]) / 2
    assert centres_x.tolist() == [8.0, 24.0]
    assert centres_y.tolist() == [8.0, 8.0]


def test_matches_torchvision_anchor_generator_single_level():
    sizes, ratios = (64, 128, 256), (0.5, 1.0, 2.0)
    feature_hw = (5, 7)
    image_hw = (feature_hw[0] * 16, feature_hw[1] * 16)
    ours = AnchorGenerator(sizes=sizes, aspect_ratios=ratios, stride=16)(feature_hw)
    tv = TVAnchorGenerator(sizes=(sizes,), aspect_ratios=(ratios,))
    images = ImageList(torch.zeros(1, 3, *image_hw), [image_hw])
    ref = tv(images, [torch.zeros(1, 8, *feature_hw)])[0]
    assert ours.shape == ref.shape
    assert torch.equal(ours, ref)
    assert math.isclose(float(ours[:, 0].min()), -181.0)


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="sizes"):
        AnchorGenerator(sizes=(), aspect_ratios=(1.0,), stride=16)
    with pytest.raises(ValueError, match="feature_hw"):
        AnchorGenerator(sizes=(128,), aspect_ratios=(1.0,), stride=16)((0, 3))
