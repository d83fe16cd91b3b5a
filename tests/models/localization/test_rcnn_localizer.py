"""RoI-centric R-CNN of the localizer: target assignment, losses, gradients, per-class scoring/refinement, loading."""

from __future__ import annotations

import math

import pytest
import torch

from detres.config.load import load_config
from detres.models.localization.rcnn_localizer import (
    RCNNLocalizer,
    assign_rcnn_targets,
    load_rcnn_localizer,
    save_rcnn_localizer,
)
from detres.utils.torch_files import save_checkpoint
from tests.tiny_configs import loc_model_config

K = 3
SMALL = {"depth": 18, "base_width": 8, "rcnn": {"crop_size": 32}}


def _model(freeze_at: int = 2, **rcnn) -> RCNNLocalizer:
    """A small R-CNN localizer; ``rcnn`` overrides its ``model.rcnn`` config keys."""
    torch.manual_seed(0)
    tree = {**SMALL, "freeze_at": freeze_at, "rcnn": {"crop_size": 32, **rcnn}}
    return RCNNLocalizer.from_config(loc_model_config(**tree), num_classes=K)


def test_target_assignment_iou_049_vs_051_and_own_class_only():
    gt_boxes, gt_labels = torch.tensor([[0.0, 0.0, 100.0, 100.0]]), torch.tensor([2])
    proposals = torch.tensor(
        [[0.0, 0.0, 51.0, 100.0], [0.0, 0.0, 49.0, 100.0], [0.0, 0.0, 100.0, 100.0], [0.0, 0.0, 100.0, 100.0]]
    )
    classes = torch.tensor([2, 2, 1, 2])  # the third is a perfect box of another class: background
    labels, matched = assign_rcnn_targets(proposals, classes, gt_boxes, gt_labels)
    assert labels.tolist() == [2, 0, 0, 2]
    assert torch.equal(matched[[0, 3]], gt_boxes.repeat(2, 1))
    none, _ = assign_rcnn_targets(proposals, classes, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert none.tolist() == [0, 0, 0, 0]


def test_several_gt_boxes_of_the_class_match_the_best_one():
    gt_boxes = torch.tensor([[0.0, 0.0, 50.0, 50.0], [40.0, 40.0, 100.0, 100.0]])
    labels, matched = assign_rcnn_targets(
        torch.tensor([[42.0, 42.0, 100.0, 100.0]]), torch.tensor([1]), gt_boxes, torch.tensor([1, 1])
    )
    assert labels.tolist() == [1] and torch.equal(matched[0], gt_boxes[1])


def test_zeroed_head_losses_and_zero_regression_of_the_gt_box():
    model = _model()
    with torch.no_grad():
        for fc in (model.cls_score, model.bbox_pred):
            fc.weight.zero_()
            fc.bias.zero_()
    image = torch.rand(3, 60, 80) * 255
    rois = torch.tensor([[10.0, 10.0, 50.0, 40.0], [0.0, 0.0, 80.0, 60.0]])
    labels, matched = assign_rcnn_targets(rois, torch.tensor([1, 3]), rois[:1], torch.tensor([1]))
    assert labels.tolist() == [1, 0]
    assert torch.allclose(model.box_coder.encode(matched[:1], rois[:1]), torch.zeros(1, 4))
    losses = model.losses(model.warp(image, rois), rois, labels, matched)
    assert losses["loss_rcnn_cls"].item() == pytest.approx(math.log(K + 1), rel=1e-6)
    assert losses["loss_rcnn_box"].item() == 0.0
    scores, boxes = model.eval().score_and_refine(model.warp(image, rois), rois, torch.tensor([1, 3]))
    assert torch.allclose(scores, torch.full((2,), 1.0 / (K + 1)))
    assert torch.allclose(boxes, rois)


def test_gradients_reach_the_fc_layers_and_the_unfrozen_body():
    model = _model(freeze_at=2)
    rois = torch.tensor([[5.0, 5.0, 40.0, 30.0], [20.0, 10.0, 60.0, 50.0]])
    labels, matched = torch.tensor([2, 0]), torch.tensor([[6.0, 4.0, 42.0, 33.0], [20.0, 10.0, 60.0, 50.0]])
    losses = model.losses(model.warp(torch.rand(3, 60, 64) * 255, rois), rois, labels, matched)
    assert losses["loss_rcnn_box"].item() > 0
    sum(losses.values()).backward()
    for p in (model.cls_score.weight, model.bbox_pred.weight, model.body.layer4[0].conv1.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert model.body.conv1.weight.grad is None and not model.body.layer1[0].conv1.weight.requires_grad
    # only the gt class's 4 regression rows get a box gradient
    assert torch.count_nonzero(model.bbox_pred.weight.grad.abs().sum(1)).item() == 4
    assert model.bbox_pred.weight.grad[4:8].abs().sum() > 0


def test_score_and_refine_uses_the_given_class():
    model = _model().eval()
    with torch.no_grad():
        model.bbox_pred.weight.zero_()
        model.bbox_pred.bias.zero_()
        model.bbox_pred.bias[4:8] = torch.tensor([10.0, 0.0, 0.0, 0.0])  # class 2: shift right by one box width
    rois = torch.tensor([[10.0, 10.0, 30.0, 50.0], [10.0, 10.0, 30.0, 50.0]])
    crops = model.warp(torch.rand(3, 64, 64) * 255, rois)
    scores, boxes = model.score_and_refine(crops, rois, torch.tensor([2, 1]))
    assert torch.allclose(boxes, torch.tensor([[30.0, 10.0, 50.0, 50.0], [10.0, 10.0, 30.0, 50.0]]))
    probs = torch.softmax(model(crops)[0], dim=1)
    assert torch.allclose(scores, probs[[0, 1], [2, 1]])
    with pytest.raises(ValueError, match="1..3"):
        model.score_and_refine(crops, rois, torch.tensor([0, 1]))


def test_checkpoint_round_trip(tmp_path):
    model = _model(context_padding=4).eval()
    tree = {"task": "loc", "model": {**SMALL, "rcnn": {"crop_size": 32, "context_padding": 4}}}
    save_rcnn_localizer(tmp_path / "m.pt", model, tree, {"synsets": ["a", "b", "c"]}, iter=7)
    loaded, meta = load_rcnn_localizer(tmp_path / "m.pt")
    assert meta["synsets"] == ["a", "b", "c"] and meta["iter"] == 7 and loaded.context_padding == 4.0
    crops = model.warp(torch.rand(3, 40, 40) * 255, torch.tensor([[2.0, 3.0, 30.0, 35.0]]))
    for a, b in zip(model(crops), loaded(crops)):
        assert torch.equal(a, b)
    save_checkpoint(tmp_path / "rpn.pt", {"model": {}, "config": {}, "meta": {}, "stage": "rpn"})
    with pytest.raises(ValueError, match="R-CNN-stage"):
        load_rcnn_localizer(tmp_path / "rpn.pt")


def test_from_config_builds_the_model():
    cfg = load_config(
        None,
        ["task=loc", "model.depth=18", "model.base_width=8", "model.rcnn.crop_size=32", "model.rcnn.fg_iou_thresh=0.6"],
    )
    model = RCNNLocalizer.from_config(cfg.model, num_classes=5)
    assert (
        model.fg_iou_thresh == 0.6
        and model.crop_size == 32
        and tuple(model.box_coder.weights) == (10.0, 10.0, 5.0, 5.0)
    )
    assert model.cls_score.out_features == 6 and model.bbox_pred.out_features == 20
    assert model(torch.zeros(2, 3, 32, 32))[0].shape == (2, 6)


def test_refine_class_boxes_rescores_regresses_and_sorts_per_class():
    model = _model().eval()
    image = torch.rand(3, 48, 64) * 255
    rois = torch.tensor([[0.0, 0.0, 30.0, 30.0], [10.0, 5.0, 60.0, 40.0], [20.0, 20.0, 70.0, 52.0]])
    proposals = {
        2: (rois, torch.tensor([0.9, 0.5, 0.1])),
        3: (rois[:1], torch.tensor([0.3])),
        1: (torch.zeros(0, 4), torch.zeros(0)),
    }
    out = model.refine_class_boxes(image, proposals, chunk=2)
    assert sorted(out) == [1, 2, 3] and out[1][0].shape == (0, 4)
    scores, boxes = model.score_and_refine(model.warp(image, rois), rois, torch.tensor([2, 2, 2]))
    order = torch.argsort(scores, descending=True)
    torch.testing.assert_close(out[2][1], scores[order])
    torch.testing.assert_close(out[2][0], boxes[order].clamp(min=0).minimum(torch.tensor([64.0, 48.0, 64.0, 48.0])))
    assert out[3][0].shape == (1, 4) and float(out[2][0][:, 2].max()) <= 64


def test_product_score_fusion_multiplies_by_the_rpn_score():
    model = _model().eval()
    image = torch.rand(3, 48, 64) * 255
    rois = torch.tensor([[0.0, 0.0, 30.0, 30.0], [10.0, 5.0, 60.0, 40.0], [20.0, 20.0, 70.0, 52.0]])
    rpn_scores = torch.tensor([0.9, 0.5, 0.1])
    out = model.refine_class_boxes(image, {2: (rois, rpn_scores)}, score_fusion="product")
    scores, _ = model.score_and_refine(model.warp(image, rois), rois, torch.tensor([2, 2, 2]))
    torch.testing.assert_close(out[2][1], (scores * rpn_scores).sort(descending=True).values)
    with pytest.raises(ValueError, match="score_fusion"):
        model.refine_class_boxes(image, {2: (rois, rpn_scores)}, score_fusion="sum")


class _FixedRPN(torch.nn.Module):
    """Stands in for the RPN stage: the same proposals (view pixels) for every requested class."""

    def __init__(self, boxes: torch.Tensor, scores: torch.Tensor) -> None:
        super().__init__()
        self.boxes, self.scores = boxes, scores

    def class_boxes(self, image, classes, *, top_n=200, nms_thresh=None):
        return {c: (self.boxes.clone(), self.scores.clone()) for c in classes}


def test_crop_source_image_crops_the_full_resolution_image_and_answers_in_view_pixels():
    from types import SimpleNamespace

    from detres.models.localization.rcnn_localizer import RPNRCNNLocalizer

    model = _model().eval()
    original = (torch.rand(96, 128, 3) * 255).to(torch.uint8).numpy()
    view = SimpleNamespace(sx=0.5, sy=0.5, left=4, top=2)  # view x = x * 0.5 - 4 (a half-size crop)
    view_rois = torch.tensor([[1.0, 3.0, 21.0, 30.0], [10.0, 0.0, 40.0, 20.0]])
    pair = RPNRCNNLocalizer(_FixedRPN(view_rois, torch.tensor([0.8, 0.4])), model).eval()
    assert pair.wants_source_image
    view_image = torch.rand(3, 44, 60) * 255  # deliberately not the original's content: it must not be cropped
    out = pair.class_boxes(view_image, [2], source=(original, view))
    image_rois = (view_rois + torch.tensor([4.0, 2.0, 4.0, 2.0])) / 0.5
    expected = model.refine_class_boxes(original, {2: (image_rois, torch.tensor([0.8, 0.4]))})
    torch.testing.assert_close(out[2][1], expected[2][1])
    torch.testing.assert_close(out[2][0], expected[2][0] * 0.5 - torch.tensor([4.0, 2.0, 4.0, 2.0]))
    # "view": the R-CNN crops the view itself, whatever source is given
    viewer = RPNRCNNLocalizer(_FixedRPN(view_rois, torch.tensor([0.8, 0.4])), _model(crop_source="view")).eval()
    assert not viewer.wants_source_image
    from_view = viewer.class_boxes(view_image, [2], source=(original, view))
    torch.testing.assert_close(
        from_view[2][1], viewer.rcnn.refine_class_boxes(view_image, {2: (view_rois, torch.tensor([0.8, 0.4]))})[2][1]
    )
    with pytest.raises(ValueError, match="crop_source"):
        _model(crop_source="original")
