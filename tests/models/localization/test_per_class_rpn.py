"""Tests for detres.models.localization.per_class_rpn and the per-class form of RPNHead (Appendix C)."""

from __future__ import annotations

import math

import pytest
import torch

from detres.models.detection.anchors import AnchorGenerator
from detres.models.detection.rpn_head import RPNHead
from detres.models.localization.per_class_rpn import PerClassRPN
from tests.tiny_configs import loc_model_config


def _rpn(num_classes=3, **kwargs) -> PerClassRPN:
    torch.manual_seed(0)
    gen = AnchorGenerator(sizes=(32, 64), aspect_ratios=(1.0,), stride=16)
    head = RPNHead(8, gen.num_anchors_per_location(), num_classes=num_classes)
    return PerClassRPN.from_config(loc_model_config(rpn=kwargs).rpn, anchor_generator=gen, head=head)


def test_flatten_layout_is_anchor_then_class_then_coordinate():
    head = RPNHead(4, 2, num_classes=3)
    b, h, w = 1, 2, 3
    # cls channel a*K + k holds 100a + k everywhere; reg channel (a*K + k)*4 + j holds 100a + 10k + j.
    logits = torch.tensor([100.0 * a + k for a in range(2) for k in range(3)]).view(1, 6, 1, 1).expand(b, 6, h, w)
    deltas = torch.tensor([100.0 * a + 10 * k + j for a in range(2) for k in range(3) for j in range(4)])
    deltas = deltas.view(1, 24, 1, 1).expand(b, 24, h, w)
    flat_logits, flat_deltas = head.flatten(logits, deltas)
    assert flat_logits.shape == (1, h * w * 2, 3) and flat_deltas.shape == (1, h * w * 2, 3, 4)
    n = (1 * w + 2) * 2 + 1  # cell (y=1, x=2), anchor 1
    assert flat_logits[0, n].tolist() == [100.0, 101.0, 102.0]
    assert flat_deltas[0, n, 2].tolist() == [120.0, 121.0, 122.0, 123.0]


def _target(label: int):
    return {"boxes": torch.tensor([[8.0, 8.0, 72.0, 72.0]]), "labels": torch.tensor([label])}


def test_losses_use_only_the_ground_truth_class_channel():
    rpn = _rpn().train()
    features = torch.randn(1, 8, 6, 6)
    _, losses = rpn(features, [(96, 96)], [_target(2)])
    (losses["loss_rpn_cls"] + losses["loss_rpn_box"]).backward()
    k = rpn.head.num_classes
    cls_rows = rpn.head.cls_logits.weight.grad.flatten(1).abs().sum(1)  # one row per (anchor, class) channel
    reg_rows = rpn.head.bbox_pred.weight.grad.flatten(1).abs().sum(1).view(-1, 4).sum(1)
    for a in range(rpn.head.num_anchors):
        for c in range(k):
            assert (cls_rows[a * k + c] > 0) == (c == 1)  # label 2 -> channel 1
            assert reg_rows[a * k + c] == 0 or c == 1


def test_eight_anchors_sampled_half_positive_and_the_loss_of_a_zero_head_is_ln2():
    gen = AnchorGenerator(sizes=(48, 80, 96), aspect_ratios=(1.0,), stride=16)  # many anchors match the big boxes
    rpn = PerClassRPN.from_config(
        loc_model_config().rpn, anchor_generator=gen, head=RPNHead(8, 3, num_classes=3)
    ).train()  # the loc defaults: 8 anchors, 1:1, cross-boundary anchors kept
    with torch.no_grad():
        rpn.head.cls_logits.weight.zero_()
    seen = []
    real = rpn.sampler

    def spy(labels, seeds=None):
        pos, neg = real(labels, seeds)
        seen.append((int(pos[0].sum()), int(neg[0].sum())))
        return pos, neg

    rpn.sampler = spy
    big = {"boxes": torch.tensor([[0.0, 0.0, 96.0, 96.0], [10.0, 10.0, 90.0, 90.0]]), "labels": torch.tensor([1, 1])}
    _, losses = rpn(torch.randn(1, 8, 6, 6), [(96, 96)], [big])
    assert seen == [(4, 4)]
    assert losses["loss_rpn_cls"].item() == pytest.approx(math.log(2.0), abs=1e-6)  # logits 0 -> BCE ln 2


def test_class_boxes_with_zero_deltas_are_the_top_scoring_anchors_of_the_class():
    rpn = _rpn(num_classes=2).eval()
    with torch.no_grad():
        rpn.head.bbox_pred.weight.zero_()
        rpn.head.bbox_pred.bias.zero_()
    features = torch.randn(1, 8, 5, 5)
    probs, boxes = rpn.dense(features, [(80, 80)])
    anchors = rpn.anchor_generator((5, 5), device=torch.device("cpu"))
    assert probs.shape == (1, 50, 2) and boxes.shape == (1, 50, 2, 4)
    torch.testing.assert_close(boxes[0, :, 1], anchors.clamp(0, 80))
    out = rpn.class_boxes(features, [(80, 80)], [[2]], top_n=5, nms_thresh=1.0)
    b, s = out[0][2]
    assert s.tolist() == probs[0, :, 1].topk(5).values.tolist()
    with pytest.raises(ValueError, match="outside 1..2"):
        rpn.class_boxes(features, [(80, 80)], [[3]])


def test_bad_labels_are_refused():
    rpn = _rpn().train()
    with pytest.raises(ValueError, match=r"1\.\.3"):
        rpn(torch.randn(1, 8, 6, 6), [(96, 96)], [_target(4)])
    with pytest.raises(ValueError, match="class_boxes"):
        rpn.eval()(torch.randn(1, 8, 6, 6), [(96, 96)])
