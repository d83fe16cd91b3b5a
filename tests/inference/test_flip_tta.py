"""Tests for detres.inference.flip_tta: mirrored boxes and images, a flipped scorer answering in original pixels."""

from __future__ import annotations

import torch

from detres.inference.flip_tta import FlippedScorer, flip_boxes, flip_images
from detres.inference.region_scorer import SingleScaleScorer


def test_flip_boxes_by_hand_and_twice_is_the_identity():
    boxes = torch.tensor([[10.0, 5.0, 30.0, 25.0], [0.0, 0.0, 100.0, 50.0]])
    assert flip_boxes(boxes, 100).tolist() == [[70.0, 5.0, 90.0, 25.0], [0.0, 0.0, 100.0, 50.0]]
    torch.testing.assert_close(flip_boxes(flip_boxes(boxes, 100), 100), boxes)
    per_class = boxes[:, None, :].expand(2, 3, 4)  # [N, K+1, 4] works too
    assert flip_boxes(per_class, 100)[:, 2].tolist() == flip_boxes(boxes, 100).tolist()


def test_flip_images_mirrors_only_the_valid_region_of_a_padded_batch():
    batch = torch.zeros(2, 3, 4, 6)
    batch[0, :, :, :] = torch.arange(6.0)
    batch[1, :, :2, :3] = torch.arange(3.0)
    flipped = flip_images(batch, [(4, 6), (2, 3)])
    assert flipped[0][0, 0].tolist() == [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    assert flipped[1].shape == (3, 2, 3) and flipped[1][0, 0].tolist() == [2.0, 1.0, 0.0]


def test_flipped_scorer_scores_mirrored_rois_on_the_mirrored_image(detector, images):
    rois = [torch.tensor([[4.0, 4.0, 60.0, 50.0], [70.0, 20.0, 128.0, 90.0]]), torch.tensor([[0.0, 10.0, 30.0, 112.0]])]
    flipped = FlippedScorer(
        lambda imgs, sizes: SingleScaleScorer(detector, imgs, sizes), images, [img.shape[1:] for img in images]
    )
    probs, boxes = flipped.score(rois)
    mirror = SingleScaleScorer(detector, [torch.flip(img, dims=[2]) for img in images])
    ref_probs, ref_boxes = mirror.score([flip_boxes(r, img.shape[2]) for r, img in zip(rois, images)])
    for p, q in zip(probs, ref_probs):
        torch.testing.assert_close(p, q)
    for b, c, img in zip(boxes, ref_boxes, images):
        torch.testing.assert_close(b, flip_boxes(c, img.shape[2]))  # back in the original image's pixels


def test_flipped_scorer_boxes_with_zero_deltas_are_the_rois(detector, images):
    """With the box regressor zeroed, decoding gives the RoIs back: mirrored twice, they must be unchanged."""
    saved = detector.roi_heads.predictor.bbox_pred.weight.clone(), detector.roi_heads.predictor.bbox_pred.bias.clone()
    try:
        with torch.no_grad():
            detector.roi_heads.predictor.bbox_pred.weight.zero_()
            detector.roi_heads.predictor.bbox_pred.bias.zero_()
        rois = [torch.tensor([[4.0, 4.0, 60.0, 50.0]]), torch.tensor([[2.0, 10.0, 30.0, 100.0]])]
        flipped = FlippedScorer(
            lambda imgs, sizes: SingleScaleScorer(detector, imgs, sizes), images, [img.shape[1:] for img in images]
        )
        _, boxes = flipped.score(rois)
        for b, r in zip(boxes, rois):
            torch.testing.assert_close(b, r[:, None, :].expand_as(b), atol=1e-4, rtol=0)
    finally:
        with torch.no_grad():
            detector.roi_heads.predictor.bbox_pred.weight.copy_(saved[0])
            detector.roi_heads.predictor.bbox_pred.bias.copy_(saved[1])
