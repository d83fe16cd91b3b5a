"""Tests for detres.inference.box_refinement: second RoI pass on the regressed boxes, union, NMS, voting."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from detres.inference.box_refinement import refined_rois
from detres.inference.test_config import TestConfig
from detres.inference.test_time import TestTimeAugmentation
from detres.models.detection.faster_rcnn import FasterRCNN
from detres.models.detection.roi_heads import RoIHeads
from detres.models.detection.transform import DetectorTransform
from tests.tiny_configs import build_test_detector, det_model_config


# ------------------------------------------------------------------------------------ a hand-made model
class FixedRPN(nn.Module):
    """Proposals looked up by image size (h, w)."""

    def __init__(self, proposals_by_size: dict[tuple[int, int], list[list[float]]]) -> None:
        super().__init__()
        self.proposals = proposals_by_size

    def forward(self, features, image_sizes, targets=None):
        return [torch.tensor(self.proposals[tuple(hw)], dtype=torch.float32) for hw in image_sizes], {}

    def propose_scored(self, features, image_sizes, mode=None):
        boxes = self(features, image_sizes)[0]
        return boxes, [torch.linspace(1.0, 0.5, len(b)) for b in boxes]  # best first, as the RPN's


class BoxEchoHeads(RoIHeads):
    """RoI heads whose region "feature" is the RoI box itself, so the predictor can answer per box."""

    def region_features(self, features, proposals, image_sizes):
        return torch.cat(list(proposals))


class TablePredictor(nn.Module):
    """Class probabilities and box deltas looked up by the RoI box (an unknown RoI is an error).

    Table rows: (box, probabilities [K+1], per-class (dx, dy, dw, dh) [K+1][4]).
    """

    def __init__(self, table) -> None:
        super().__init__()
        self.boxes = torch.tensor([row[0] for row in table], dtype=torch.float32)
        self.logits = torch.tensor([[math.log(p) for p in row[1]] for row in table], dtype=torch.float32)
        self.deltas = torch.tensor([[v for d in row[2] for v in d] for row in table], dtype=torch.float32)
        self.seen: list[torch.Tensor] = []

    def forward(self, rois):
        self.seen.append(rois.clone())
        match = (rois[:, None, :] - self.boxes[None, :, :]).abs().amax(dim=2) < 1e-4  # [R, T]
        missing = ~match.any(dim=1)
        if missing.any():
            raise AssertionError(f"TablePredictor: no entry for RoIs {rois[missing].tolist()}")
        index = match.float().argmax(dim=1)
        return self.logits[index], self.deltas[index]


def detect_with_refinement(model, images, image_sizes=None, *, voting=None, voting_iou=None):
    """The detector's eval forward with Appendix-B box refinement: the test-time augmentation with only it on
    (``voting`` / ``voting_iou`` None: the model's own post-processing)."""
    config = TestConfig(box_refinement=True, voting=voting, voting_iou=voting_iou)
    return TestTimeAugmentation(model, config)(images, image_sizes)


def _model(proposals_by_size, table) -> FasterRCNN:
    roi_cfg = det_model_config(roi_heads={"score_thresh": 0.05, "nms_thresh": 0.3}).roi_heads
    heads = BoxEchoHeads.from_config(
        roi_cfg, pooler=nn.Identity(), box_head=nn.Identity(), predictor=TablePredictor(table)
    )
    mean, std = (123.675, 116.28, 103.53), (1.0, 1.0, 1.0)
    # test scale 96, longer side at most 96: the 96x96 and 80x96 images below stay at their size
    transform = DetectorTransform(pixel_mean=mean, pixel_std=std, min_size=96, max_size=96)
    return FasterRCNN(nn.Identity(), FixedRPN(proposals_by_size), heads, transform=transform).eval()


ZERO = (0.0, 0.0, 0.0, 0.0)
RIGHT4 = (1.25, 0.0, 0.0, 0.0)  # with the (10, 10, 5, 5) weights: +4 px in x for a 32 px wide RoI
DOWN4 = (0.0, 1.25, 0.0, 0.0)  # +4 px in y for a 32 px tall RoI
A, A1, A2 = [0.0, 0.0, 32.0, 32.0], [4.0, 0.0, 36.0, 32.0], [8.0, 0.0, 40.0, 32.0]
B = [50.0, 50.0, 82.0, 82.0]
# Two object classes. A: class 1 (0.6) moves it right by 4, class 2 (0.3) down by 4; the new RoI is class 1's
# box A1, where class 1 scores 0.9 and moves right by 4 again (A2). B: class 2, no regression, so its second
# pass repeats the first. A1's class-2 score (0.02) stays under the 0.05 threshold.
TABLE = [
    (A, (0.1, 0.6, 0.3), (ZERO, RIGHT4, DOWN4)),
    (A1, (0.08, 0.9, 0.02), (ZERO, RIGHT4, ZERO)),
    (B, (0.2, 0.01, 0.79), (ZERO, ZERO, ZERO)),
]


def _image(h: int, w: int) -> torch.Tensor:
    return torch.full((3, h, w), 100.0)


def test_refinement_moves_a_box_and_merges_the_union_by_nms_and_voting():
    model = _model({(96, 96): [A, B]}, TABLE)
    plain = model([_image(96, 96)])[0]
    # Single pass: B (class 2, 0.79), A1 (class 1, 0.6), A moved down (class 2, 0.3).
    torch.testing.assert_close(plain["scores"], torch.tensor([0.79, 0.6, 0.3]))
    torch.testing.assert_close(plain["boxes"], torch.tensor([B, A1, [0.0, 4.0, 32.0, 36.0]]))

    refined = detect_with_refinement(model, [_image(96, 96)], voting=False)[0]
    # The second pass saw the top-class boxes of the first (A1, not A's class-2 box; B unchanged).
    torch.testing.assert_close(model.roi_heads.predictor.seen[-1], torch.tensor([A1, B]))
    # Class 1: A1 (0.6) and A2 (0.9) overlap by IoU 28*32 / (2*1024 - 896) = 0.78 > 0.3, A2 wins.
    # Class 2: B twice (identical, one kept) and A's class-2 box (0.3).
    torch.testing.assert_close(refined["scores"], torch.tensor([0.9, 0.79, 0.3]))
    assert refined["labels"].tolist() == [1, 2, 2]
    torch.testing.assert_close(refined["boxes"], torch.tensor([A2, B, [0.0, 4.0, 32.0, 36.0]]))

    voted = detect_with_refinement(model, [_image(96, 96)], voting=True, voting_iou=0.5)[0]
    # A2's voters: A2 (0.9) and A1 (0.6): x = (0.9 * 8 + 0.6 * 4) / 1.5 = 6.4, (0.9 * 40 + 0.6 * 36) / 1.5 = 38.4.
    torch.testing.assert_close(voted["scores"], torch.tensor([0.9, 0.79, 0.3]))
    assert voted["labels"].tolist() == [1, 2, 2]
    torch.testing.assert_close(voted["boxes"], torch.tensor([[6.4, 0.0, 38.4, 32.0], B, [0.0, 4.0, 32.0, 36.0]]))
    # voting=None follows the model's own setting; a voting IoU above A1/A2's 0.78 leaves A2 alone.
    own = model.roi_heads.postprocess
    model.roi_heads.postprocess = dataclasses.replace(own, voting=True, voting_iou=0.8)
    torch.testing.assert_close(detect_with_refinement(model, [_image(96, 96)])[0]["boxes"], refined["boxes"])
    model.roi_heads.postprocess = dataclasses.replace(own, voting=True, voting_iou=0.5)
    torch.testing.assert_close(detect_with_refinement(model, [_image(96, 96)])[0]["boxes"], voted["boxes"])


def _naive_reference(model, image_hw, proposals, voting_iou):
    """Loop-by-loop refinement for one image: per RoI the top class's box, per class greedy NMS on the union,
    then per kept box the score-weighted mean of the same-class union boxes with IoU >= voting_iou."""
    from torchvision.ops import box_iou

    heads = model.roi_heads
    h, w = image_hw

    def one_pass(rois):
        probs, boxes = heads.decode_predictions(*heads.predict(heads.region_features(None, [rois], [image_hw])), [rois])
        return probs[0], boxes[0]

    probs, boxes = one_pass(proposals)
    new_rois = []
    for r in range(proposals.shape[0]):
        best = max(range(1, probs.shape[1]), key=lambda c: (probs[r, c].item(), -c))
        x1, y1, x2, y2 = boxes[r, best].tolist()
        new_rois.append([min(max(x1, 0), w), min(max(y1, 0), h), min(max(x2, 0), w), min(max(y2, 0), h)])
    probs2, boxes2 = one_pass(torch.tensor(new_rois))
    union_p, union_b = torch.cat([probs, probs2]), torch.cat([boxes, boxes2])
    out = []
    for c in range(1, union_p.shape[1]):
        cand = [
            (union_p[i, c].item(), [min(max(v, 0), lim) for v, lim in zip(union_b[i, c].tolist(), (w, h, w, h))])
            for i in range(union_p.shape[0])
            if union_p[i, c].item() > heads.postprocess.score_thresh
        ]
        cand.sort(key=lambda t: -t[0])
        kept = []
        for s, b in cand:
            if all(
                box_iou(torch.tensor([b]), torch.tensor([k]))[0, 0] <= heads.postprocess.nms_thresh for _, k in kept
            ):
                kept.append((s, b))
        for s, b in kept:
            voters = [(vs, vb) for vs, vb in cand if box_iou(torch.tensor([b]), torch.tensor([vb]))[0, 0] >= voting_iou]
            total = sum(vs for vs, _ in voters)
            out.append((s, c, [sum(vs * vb[j] for vs, vb in voters) / total for j in range(4)]))
    out.sort(key=lambda t: -t[0])
    return out


def test_refinement_matches_a_naive_loop_reference_and_clips_the_new_rois():
    # C's class-1 box spills over the right border (x2 = 96 + 8): the new RoI is clipped to the image.
    C, C1 = [64.0, 40.0, 96.0, 72.0], [72.0, 40.0, 96.0, 72.0]
    table = TABLE + [
        (C, (0.3, 0.5, 0.2), ((0.0, 0.0, 0.0, 0.0), (2.5, 0.0, 0.0, 0.0), (0.0, -1.25, 0.0, 0.0))),
        (C1, (0.4, 0.45, 0.15), ((0.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.5, 0.0), (0.0, 0.0, 0.0, 0.0))),
    ]
    proposals = [A, B, C]
    model = _model({(96, 96): proposals}, table)
    got = detect_with_refinement(model, [_image(96, 96)], voting=True, voting_iou=0.5)[0]
    assert model.roi_heads.predictor.seen[-1].tolist() == [A1, B, C1]
    want = _naive_reference(model, (96, 96), torch.tensor(proposals), 0.5)
    assert len(want) == got["scores"].numel() >= 4
    torch.testing.assert_close(got["scores"], torch.tensor([s for s, _, _ in want]))
    assert got["labels"].tolist() == [c for _, c, _ in want]
    torch.testing.assert_close(got["boxes"], torch.tensor([b for _, _, b in want]))


def test_a_batch_gives_what_each_image_gives_alone():
    C, C1 = [64.0, 40.0, 96.0, 72.0], [72.0, 40.0, 96.0, 72.0]
    table = TABLE + [
        (C, (0.3, 0.5, 0.2), (ZERO, (2.5, 0.0, 0.0, 0.0), (0.0, -1.25, 0.0, 0.0))),
        (C1, (0.4, 0.45, 0.15), (ZERO, (0.0, 0.0, 0.5, 0.0), ZERO)),
    ]
    # Different sizes (so a padded batch with per-image clipping) and different numbers of proposals.
    model = _model({(96, 96): [A, B], (80, 96): [C, A, C]}, table)
    images = [_image(96, 96), _image(80, 96)]
    for voting in (False, True):
        batch = detect_with_refinement(model, images, voting=voting)
        alone = [detect_with_refinement(model, [image], voting=voting)[0] for image in images]
        for b, a in zip(batch, alone):
            assert b.keys() == a.keys()
            for key in b:
                torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)


def test_refined_rois_picks_the_top_foreground_class_box_per_image():
    probs = [torch.tensor([[0.9, 0.04, 0.06], [0.1, 0.5, 0.4]]), torch.tensor([[0.2, 0.3, 0.5]])]
    boxes = [
        torch.tensor(
            [[[0, 0, 1, 1], [1, 1, 2, 2], [2, 2, 30, 30]], [[0, 0, 1, 1], [-5, 3, 8, 9], [9, 9, 9, 9]]],
            dtype=torch.float32,
        ),
        torch.tensor([[[0, 0, 1, 1], [1, 1, 2, 2], [10, 10, 50, 60]]], dtype=torch.float32),
    ]
    rois = refined_rois(probs, boxes, [(20, 25), (40, 45)])
    # Background never counts (row 0 takes class 2); clipped to each image's own (W, H).
    assert [r.tolist() for r in rois] == [[[2, 2, 25, 20], [0, 3, 8, 9]], [[10, 10, 45, 40]]]
    # Class-agnostic boxes are taken as they are.
    agnostic = refined_rois([probs[1]], [torch.tensor([[1.0, 2.0, 3.0, 4.0]])], [(40, 45)])
    assert agnostic[0].tolist() == [[1.0, 2.0, 3.0, 4.0]]


def test_training_mode_is_refused():
    model = _model({(96, 96): [A]}, TABLE).train()
    with pytest.raises(ValueError, match="eval mode"):
        detect_with_refinement(model, [_image(96, 96)])


# ------------------------------------------------------------------------------- a real (tiny) network
class EvenGridRPN(nn.Module):
    """The wrapped RPN's proposals rounded to even pixels (so decoding a zero delta gives them back bit for bit)."""

    def __init__(self, rpn: nn.Module) -> None:
        super().__init__()
        self.rpn = rpn

    def forward(self, features, image_sizes, targets=None):
        proposals, losses = self.rpn(features, image_sizes, targets)
        out = []
        for p in proposals:
            p = (p / 2).round() * 2
            out.append(p[(p[:, 2] > p[:, 0]) & (p[:, 3] > p[:, 1])])
        return out, losses

    def propose_scored(self, features, image_sizes, mode=None):
        boxes = self(features, image_sizes)[0]
        return boxes, [torch.linspace(1.0, 0.5, len(b)) for b in boxes]


def test_refinement_that_changes_nothing_keeps_exactly_the_single_pass_detections():
    torch.manual_seed(0)
    model = build_test_detector(
        3,
        depth=18,
        base_width=16,
        anchor_sizes=[16, 32],
        aspect_ratios=[1.0],
        pixel_std=[1.0, 1.0, 1.0],
        rpn={"pre_nms_top_n_test": 200, "post_nms_top_n_test": 40},
        roi_heads={"pooler_resolution": 8, "score_thresh": 0.0},
    ).eval()
    nn.init.zeros_(model.roi_heads.predictor.bbox_pred.weight)
    nn.init.zeros_(model.roi_heads.predictor.bbox_pred.bias)
    # Larger class weights than the init's, so the three classes' scores spread apart.
    nn.init.normal_(model.roi_heads.predictor.cls_score.weight, std=0.5)
    model.rpn = EvenGridRPN(model.rpn).eval()
    gen = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 64, 96, generator=gen) * 255]
    with torch.no_grad():
        plain = model(images)[0]
    refined = detect_with_refinement(model, images, voting=False)[0]
    assert plain["scores"].numel() > 5
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(refined[key], plain[key]), key
