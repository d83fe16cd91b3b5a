"""Tests for detection post-processing (threshold, clip, per-class NMS, top-k) and rescaling."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import clip_boxes_to_image, nms

from detres.models.detection.postprocess import DetectionPostprocess, rescale_detections
from tests.tiny_configs import det_model_config


def postprocess_boxes(probs: torch.Tensor, boxes: torch.Tensor, hw, **roi_heads) -> dict[str, torch.Tensor]:
    """One image through the post-processing of a ``model.roi_heads`` tree with the ``roi_heads`` keys set."""
    return DetectionPostprocess.from_config(det_model_config(roi_heads=roi_heads).roi_heads)(probs, boxes, hw)


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
    dets = {
        "boxes": torch.tensor([[10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 90.0, 90.0]]),
        "scores": torch.tensor([0.9, 0.5]),
    }
    out = rescale_detections(dets, 2.0, (30, 40))
    torch.testing.assert_close(out["boxes"], torch.tensor([[5.0, 10.0, 15.0, 20.0], [0.0, 0.0, 40.0, 30.0]]))
    assert out["scores"] is dets["scores"]  # other entries pass through
    assert dets["boxes"][0, 0] == 10.0  # the input dict is not modified
    aniso = rescale_detections(dets, (2.0, 4.0), (100, 100))  # (scale_y, scale_x)
    torch.testing.assert_close(aniso["boxes"][0], torch.tensor([2.5, 10.0, 7.5, 20.0]))
    with pytest.raises(ValueError, match="scale"):
        rescale_detections(dets, 0.0, (30, 40))


# ----------------------------------------------------------------- soft-NMS and box voting options
def test_hand_example_soft_linear_reports_decayed_scores() -> None:
    probs, boxes = _hand_case()
    out = postprocess_boxes(probs, boxes, (20, 30), nms_method="soft_linear", nms_thresh=0.3)
    # Class 1: R1 is not suppressed but decayed: IoU 81/119 > 0.3 -> 0.7 * (1 - 81/119) = 0.7 * 38/119 = 0.22353.
    # Class 2: R1 (0.2) alone. Sorted by decayed score.
    torch.testing.assert_close(out["scores"], torch.tensor([0.90, 0.7 * 38 / 119, 0.20]))
    assert out["labels"].tolist() == [1, 1, 2]
    torch.testing.assert_close(
        out["boxes"], torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [1.0, 1.0, 11.0, 11.0]])
    )
    # The final threshold applies to decayed scores: 0.21 drops class 2's 0.2 only, 0.25 also the decayed 0.2235.
    mid = postprocess_boxes(probs, boxes, (20, 30), nms_method="soft_linear", soft_nms_score_thresh=0.21)
    assert mid["labels"].tolist() == [1, 1]
    high = postprocess_boxes(probs, boxes, (20, 30), nms_method="soft_linear", soft_nms_score_thresh=0.25)
    assert high["labels"].tolist() == [1]


def test_hand_example_box_voting_moves_kept_boxes_only() -> None:
    probs, boxes = _hand_case()
    out = postprocess_boxes(probs, boxes, (20, 30), box_voting=True, box_voting_iou=0.5)
    # Class 1 keeps clipped R0 (0,0,10,10) 0.9; R1 (1,1,11,11) 0.7 has IoU 0.68 >= 0.5 and votes:
    # x1 = y1 = (0.9*0 + 0.7*1) / 1.6 = 0.4375; x2 = y2 = (0.9*10 + 0.7*11) / 1.6 = 10.4375.
    # Class 2 keeps R1 0.2, whose only classmate above 0.05 is itself: unchanged.
    torch.testing.assert_close(out["boxes"], torch.tensor([[0.4375, 0.4375, 10.4375, 10.4375], [1.0, 1.0, 11.0, 11.0]]))
    torch.testing.assert_close(out["scores"], torch.tensor([0.90, 0.20]))
    assert out["labels"].tolist() == [1, 2]
    # voting_iou > 1: the plain NMS detections.
    plain = postprocess_boxes(probs, boxes, (20, 30))
    same = postprocess_boxes(probs, boxes, (20, 30), box_voting=True, box_voting_iou=1.5)
    assert all(torch.equal(plain[k], same[k]) for k in ("boxes", "scores", "labels"))


def _random_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    num_rois, num_cols = 60, 5
    probs = torch.softmax(torch.randn(num_rois, num_cols, generator=g) * 2, dim=1)
    xy = torch.rand(num_rois, num_cols, 2, generator=g) * torch.tensor([80.0, 60.0]) - 10
    wh = torch.rand(num_rois, num_cols, 2, generator=g) * 25 + 2
    return probs, torch.cat([xy, xy + wh], dim=2)


@pytest.mark.parametrize("seed", [0, 1])
def test_defaults_reproduce_the_plain_nms_pipeline_exactly(seed: int) -> None:
    from torchvision.ops import batched_nms

    probs, boxes = _random_case(seed)
    hw = (50, 70)
    out = postprocess_boxes(probs, boxes, hw, score_thresh=0.1, detections_per_img=15)
    explicit = postprocess_boxes(
        probs, boxes, hw, score_thresh=0.1, detections_per_img=15, nms_method="nms", box_voting=False
    )
    # The pipeline as it was before soft-NMS / voting existed: threshold, batched_nms, top-k.
    clipped = clip_boxes_to_image(boxes.reshape(-1, 4), hw).reshape(boxes.shape)
    scores, cand = probs[:, 1:].reshape(-1), clipped[:, 1:, :].reshape(-1, 4)
    labels = torch.arange(1, probs.shape[1]).repeat(probs.shape[0])
    sel = scores > 0.1
    keep = batched_nms(cand[sel], scores[sel], labels[sel], 0.3)[:15]
    for key, ref in (("boxes", cand[sel][keep]), ("scores", scores[sel][keep]), ("labels", labels[sel][keep])):
        assert torch.equal(out[key], ref) and torch.equal(explicit[key], ref)


@pytest.mark.parametrize("method", ["soft_linear", "soft_gaussian"])
def test_soft_nms_and_voting_compose_the_standalone_functions(method: str) -> None:
    from detres.models.detection.box_voting import box_voting
    from detres.models.detection.soft_nms import soft_nms

    probs, boxes = _random_case(2)
    hw = (50, 70)
    out = postprocess_boxes(
        probs,
        boxes,
        hw,
        score_thresh=0.1,
        detections_per_img=20,
        nms_method=method,
        soft_nms_sigma=0.4,
        soft_nms_score_thresh=0.02,
        box_voting=True,
        box_voting_iou=0.6,
    )
    clipped = clip_boxes_to_image(boxes.reshape(-1, 4), hw).reshape(boxes.shape)
    scores, cand = probs[:, 1:].reshape(-1), clipped[:, 1:, :].reshape(-1, 4)
    labels = torch.arange(1, probs.shape[1]).repeat(probs.shape[0])
    sel = scores > 0.1
    scores, cand, labels = scores[sel], cand[sel], labels[sel]
    keep, decayed = soft_nms(cand, scores, labels, method=method[5:], iou_thresh=0.3, sigma=0.4, score_thresh=0.02)
    keep, decayed = keep[:20], decayed[:20]
    voted, _ = box_voting(cand[keep], decayed, labels[keep], cand, scores, labels, 0.6)
    assert out["scores"].numel() == 20
    torch.testing.assert_close(out["scores"], decayed)
    torch.testing.assert_close(out["boxes"], voted)
    assert torch.equal(out["labels"], labels[keep])
    assert torch.all(out["scores"][:-1] >= out["scores"][1:])
    assert not torch.equal(out["boxes"], cand[keep])  # voting moved some boxes in this case


def test_bad_postprocess_options() -> None:
    probs, boxes = _hand_case()
    with pytest.raises(ValueError, match="nms_method"):
        postprocess_boxes(probs, boxes, (20, 30), nms_method="soft")
    with pytest.raises(ValueError, match="soft_nms_sigma"):
        postprocess_boxes(probs, boxes, (20, 30), nms_method="soft_gaussian", soft_nms_sigma=0.0)
    with pytest.raises(ValueError, match="voting_iou"):
        postprocess_boxes(probs, boxes, (20, 30), box_voting=True, box_voting_iou=-0.1)
    post = DetectionPostprocess.from_config(det_model_config().roi_heads)
    with pytest.raises(ValueError, match="postprocess: class_probs must be"):
        post(probs[:, 0], boxes, (20, 30))
