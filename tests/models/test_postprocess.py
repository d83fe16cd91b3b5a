"""Tests for detection post-processing (threshold, clip, per-class NMS, top-k) and rescaling."""
from __future__ import annotations

import pytest
import torch
from torchvision.ops import clip_boxes_to_image, nms

from detres.models.postprocess import postprocess_boxes, rescale_detections


def _hand_case() -> tuple[torch.Tensor, torch.Tensor]:
    # Columns: background, class 1, class 2.
    probs = torch.tensor(
        [
            [0.05, 0.90, 0.05],
            [0.10, 0.70, 0.20],
            [0.90, 0.05, 0.05],  # isolated box, but 0.05 is not strictly above the 0.05 threshold
        ]
    )
    boxes = torch.tensor(
        [
            [-5.0, -5.0, 10.0, 10.0],  # clipped to (0, 0, 10, 10) inside a 20x30 image
            [1.0, 1.0, 11.0, 11.0],  # IoU 81/119 = 0.68 with the clipped R0 box
            [20.0, 5.0, 28.0, 15.0],
        ]
    )
    return probs, boxes


def test_hand_example_per_class_nms_threshold_and_clipping() -> None:
    probs, boxes = _hand_case()
    out = postprocess_boxes(probs, boxes, (20, 30), score_thresh=0.05, nms_thresh=0.3, detections_per_img=100)
    # Class 1: R1 suppressed by R0 (0.68 > 0.3). Class 2: R1 survives although it overlaps R0.
    torch.testing.assert_close(out["boxes"], torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0]]))
    torch.testing.assert_close(out["scores"], torch.tensor([0.90, 0.20]))
    assert out["labels"].tolist() == [1, 2] and out["labels"].dtype == torch.int64


def test_hand_example_top_k_and_higher_threshold() -> None:
    probs, boxes = _hand_case()
    top1 = postprocess_boxes(probs, boxes, (20, 30), detections_per_img=1)
    assert top1["labels"].tolist() == [1] and top1["scores"].tolist() == pytest.approx([0.9])
    strict = postprocess_boxes(probs, boxes, (20, 30), score_thresh=0.5)
    assert strict["labels"].tolist() == [1]
    # With a loose NMS nothing in class 1 is suppressed any more.
    loose = postprocess_boxes(probs, boxes, (20, 30), nms_thresh=0.7)
    assert sorted(zip(loose["labels"].tolist(), loose["scores"].tolist())) == [
        (1, pytest.approx(0.7)),
        (1, pytest.approx(0.9)),
        (2, pytest.approx(0.2)),
    ]


def _naive_reference(probs, boxes, hw, score_thresh, nms_thresh, k):
    """Per-class loop with torchvision.ops.nms: the textbook procedure."""
    all_boxes, all_scores, all_labels = [], [], []
    for c in range(1, probs.shape[1]):
        b = clip_boxes_to_image(boxes[:, c], hw)
        s = probs[:, c]
        keep = s > score_thresh
        b, s = b[keep], s[keep]
        kept = nms(b, s, nms_thresh)
        all_boxes.append(b[kept])
        all_scores.append(s[kept])
        all_labels.append(torch.full((kept.numel(),), c, dtype=torch.int64))
    boxes_cat, scores_cat, labels_cat = torch.cat(all_boxes), torch.cat(all_scores), torch.cat(all_labels)
    order = scores_cat.argsort(descending=True)[:k]
    return boxes_cat[order], scores_cat[order], labels_cat[order]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_naive_per_class_loop(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    num_rois, num_cols, hw = 60, 5, (50, 70)
    probs = torch.softmax(torch.randn(num_rois, num_cols, generator=g) * 2, dim=1)
    xy = torch.rand(num_rois, num_cols, 2, generator=g) * torch.tensor([80.0, 60.0]) - 10
    wh = torch.rand(num_rois, num_cols, 2, generator=g) * 25 + 2
    boxes = torch.cat([xy, xy + wh], dim=2)
    out = postprocess_boxes(probs, boxes, hw, score_thresh=0.1, nms_thresh=0.3, detections_per_img=15)
    ref_boxes, ref_scores, ref_labels = _naive_reference(probs, boxes, hw, 0.1, 0.3, 15)
    assert out["scores"].numel() == 15  # the cap is active in this case
    torch.testing.assert_close(out["scores"], ref_scores)
    torch.testing.assert_close(out["boxes"], ref_boxes)
    assert torch.equal(out["labels"], ref_labels)
    assert bool((out["boxes"][:, 2] <= hw[1]).all() and (out["boxes"][:, 3] <= hw[0]).all())


def test_empty_input_and_bad_shapes() -> None:
    out = postprocess_boxes(torch.zeros(0, 3), torch.zeros(0, 3, 4), (10, 10))
    assert out["boxes"].shape == (0, 4) and out["scores"].shape == (0,) and out["labels"].shape == (0,)
    with pytest.raises(ValueError, match="boxes"):
        postprocess_boxes(torch.rand(4, 3), torch.rand(4, 2, 4), (10, 10))
    with pytest.raises(ValueError, match="class_probs"):
        postprocess_boxes(torch.rand(4), torch.rand(4, 4), (10, 10))


def test_rescale_detections_back_to_original_size() -> None:
    dets = {"boxes": torch.tensor([[10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 90.0, 90.0]]), "scores": torch.tensor([0.9, 0.5])}
    out = rescale_detections(dets, 2.0, (30, 40))
    torch.testing.assert_close(out["boxes"], torch.tensor([[5.0, 10.0, 15.0, 20.0], [0.0, 0.0, 40.0, 30.0]]))
    assert out["scores"] is dets["scores"]  # other entries pass through
    assert dets["boxes"][0, 0] == 10.0  # the input dict is not modified
    aniso = rescale_detections(dets, (2.0, 4.0), (100, 100))  # (scale_y, scale_x)
    torch.testing.assert_close(aniso["boxes"][0], torch.tensor([2.5, 10.0, 7.5, 20.0]))
    with pytest.raises(ValueError, match="scale"):
        rescale_detections(dets, 0.0, (30, 40))
