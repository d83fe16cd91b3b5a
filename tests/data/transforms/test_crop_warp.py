"""R-CNN crop-and-warp: where image content lands in the warped crop, exact inverse mapping, outside pixels, N=0."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from detres.data.transforms.crop_warp import context_boxes, crop_and_warp, image_to_warped, warped_to_image


def _rectangle_image() -> np.ndarray:
    image = np.zeros((100, 120, 3), np.uint8)
    image[20:40, 30:60] = 255  # continuous box [30, 20, 60, 40]
    return image


def test_filled_rectangle_lands_where_the_mapping_says():
    roi = torch.tensor([[10.0, 10.0, 90.0, 90.0]])  # 80 px -> 160: each warped pixel is half an image pixel
    crop = crop_and_warp(_rectangle_image(), roi, size=160, sampling_ratio=1)
    assert crop.shape == (1, 3, 160, 160)
    expected = image_to_warped(torch.tensor([[30.0, 20.0, 60.0, 40.0]]), roi, 160)[0]
    assert expected.tolist() == [40.0, 20.0, 100.0, 60.0]
    rows, cols = torch.nonzero(crop[0, 0] > 127.5, as_tuple=True)
    # pixels whose centre lies inside the mapped box are the ones mostly covered by the rectangle
    assert (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1) == (40, 20, 100, 60)
    assert torch.all(crop[0, :, 22:58, 42:98] == 255)
    assert torch.all(crop[0, :, :18] == 0) and torch.all(crop[0, :, :, 102:] == 0)


def test_uint8_hwc_and_float_chw_images_give_the_same_crops():
    image = _rectangle_image()
    chw = torch.from_numpy(image).permute(2, 0, 1).float()
    rois = torch.tensor([[5.0, 7.0, 70.5, 66.0], [0.0, 0.0, 120.0, 100.0]])
    assert torch.equal(crop_and_warp(image, rois, 32), crop_and_warp(chw, rois, 32))
    assert torch.equal(crop_and_warp(torch.from_numpy(image), rois, 32), crop_and_warp(chw, rois, 32))


@pytest.mark.parametrize("padding", [0.0, 16.0])
def test_round_trip_is_exact_for_corners(padding):
    rois = torch.tensor([[3.0, 5.5, 50.0, 41.0], [0.0, 0.0, 224.0, 160.0], [-10.0, 20.0, 30.0, 90.0]])
    corners = torch.tensor([[0.0, 0.0, 224.0, 224.0]]).repeat(3, 1)
    assert torch.allclose(warped_to_image(corners, rois, 224, padding), context_boxes(rois, 224, padding))
    inner = torch.tensor([[padding, padding, 224 - padding, 224 - padding]]).repeat(3, 1)
    assert torch.allclose(warped_to_image(inner, rois, 224, padding), rois, atol=1e-4)
    boxes = torch.tensor([[10.0, 12.0, 40.0, 30.0], [1.0, 2.0, 3.0, 4.0], [0.0, 25.0, 15.0, 60.0]])
    assert torch.allclose(
        warped_to_image(image_to_warped(boxes, rois, 224, padding), rois, 224, padding), boxes, atol=1e-4
    )


def test_context_padding_grows_the_window():
    window = context_boxes(torch.tensor([[100.0, 100.0, 292.0, 292.0]]), 224, 16)
    assert torch.allclose(window, torch.tensor([[84.0, 84.0, 308.0, 308.0]]))  # 192 px -> 224 * 192/192


def test_outside_the_image_reads_the_mean():
    image = torch.full((3, 100, 100), 100.0)
    crop = crop_and_warp(
        image, torch.tensor([[-50.0, 0.0, 50.0, 100.0]]), 100, pixel_mean=(50.0, 50.0, 50.0), sampling_ratio=1
    )[0]
    assert torch.all(crop[:, :, :49] == 0)  # left half outside: 0 after normalisation = the mean colour
    assert torch.all(crop[:, :, 50:] == 50)
    outside = crop_and_warp(image, torch.tensor([[200.0, 200.0, 260.0, 250.0]]), 8, pixel_mean=(50.0, 50.0, 50.0))
    assert torch.all(outside == 0)
    scaled = crop_and_warp(
        image, torch.tensor([[0.0, 0.0, 50.0, 50.0]]), 4, pixel_mean=(50.0,) * 3, pixel_std=(25.0,) * 3
    )
    assert torch.allclose(scaled, torch.full_like(scaled, 2.0))


def test_no_boxes_and_bad_boxes():
    image = torch.zeros(3, 10, 10)
    assert crop_and_warp(image, torch.zeros(0, 4), 224).shape == (0, 3, 224, 224)
    assert warped_to_image(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0, 4)
    with pytest.raises(ValueError, match="x2 > x1"):
        crop_and_warp(image, torch.tensor([[5.0, 5.0, 5.0, 8.0]]))
    with pytest.raises(ValueError, match="channels"):
        crop_and_warp(torch.zeros(10, 10, 4, dtype=torch.uint8), torch.zeros(0, 4))
