"""Tests for detres.models.detection.box_coder against hand values and torchvision's BoxCoder."""

import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder as TVBoxCoder

from detres.models.detection.box_coder import BoxCoder


def _random_boxes(n: int, gen: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen) * 200
    wh = torch.rand(n, 2, generator=gen) * 150 + 4
    return torch.cat([xy, xy + wh], dim=1)


def test_encode_hand_computed():
    anchor = torch.tensor([[0.0, 0.0, 10.0, 10.0]])  # centre (5, 5), 10 x 10
    gt = torch.tensor([[2.0, 2.0, 12.0, 14.0]])  # centre (7, 8), 10 x 12
    deltas = BoxCoder().encode(gt, anchor)
    assert torch.allclose(deltas, torch.tensor([[0.2, 0.3, 0.0, math.log(1.2)]]), atol=1e-6)
    weighted = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0)).encode(gt, anchor)
    assert torch.allclose(weighted, torch.tensor([[2.0, 3.0, 0.0, 5 * math.log(1.2)]]), atol=1e-5)
    assert torch.allclose(BoxCoder().decode(deltas, anchor), gt, atol=1e-5)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_matches_torchvision_box_coder(weights):
    gen = torch.Generator().manual_seed(0)
    proposals = _random_boxes(50, gen)
    gt = _random_boxes(50, gen)
    ours, ref = BoxCoder(weights=weights), TVBoxCoder(weights=weights)
    assert torch.allclose(ours.encode(gt, proposals), ref.encode_single(gt, proposals), atol=1e-5)

    deltas = torch.randn(50, 4, generator=gen) * 2
    ref_boxes = ref.decode_single(deltas, proposals)
    assert torch.allclose(ours.decode(deltas, proposals), ref_boxes, atol=1e-3)


def test_round_trip_and_multiclass_shape():
    gen = torch.Generator().manual_seed(1)
    proposals = _random_boxes(20, gen)
    gt = _random_boxes(20, gen)
    coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    assert torch.allclose(coder.decode(coder.encode(gt, proposals), proposals), gt, atol=1e-3)

    num_classes = 3
    deltas = torch.randn(20, 4 * num_classes, generator=gen)
    decoded = coder.decode(deltas, proposals)
    assert decoded.shape == (20, num_classes, 4)
    # Class c uses deltas[:, 4c:4c+4].
    assert torch.allclose(decoded[:, 2], coder.decode(deltas[:, 8:12], proposals))


def test_decode_clamps_log_scale():
    box = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    decoded = BoxCoder().decode(torch.tensor([[0.0, 0.0, 50.0, 50.0]]), box)
    # Clamp at log(1000/16): width grows to 16 * 1000/16 = 1000 around centre 8.
    assert torch.allclose(decoded, torch.tensor([[-492.0, -492.0, 508.0, 508.0]]), atol=1e-2)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="deltas"):
        BoxCoder().decode(torch.zeros(3, 5), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="same length"):
        BoxCoder().encode(torch.zeros(3, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match="weights"):
        BoxCoder(weights=(1.0, 1.0, 0.0, 1.0))
