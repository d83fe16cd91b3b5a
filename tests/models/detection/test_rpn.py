"""Tests for detres.models.detection.rpn: head, target assignment, losses, proposal filtering, tiny overfit."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import BoxCoder as TVBoxCoder
from torchvision.ops import nms

from detres.models.detection.anchors import AnchorGenerator
from detres.models.detection.rpn import RegionProposalNetwork
from detres.models.detection.rpn_head import RPNHead
from tests.tiny_configs import det_model_config


def _toy_rpn(channels: int = 8, **kwargs) -> RegionProposalNetwork:
    # One 32x32 anchor per cell of a stride-16 map: the anchor of cell (y, x) is
    # [16x - 16, 16y - 16, 16x + 16, 16y + 16].
    gen = AnchorGenerator(sizes=(32,), aspect_ratios=(1.0,), stride=16)
    return _rpn(gen, RPNHead(channels, gen.num_anchors_per_location()), **kwargs)


def _multi_rpn(channels: int = 8, **kwargs) -> RegionProposalNetwork:
    gen = AnchorGenerator(sizes=(16, 32, 64), aspect_ratios=(0.5, 1.0, 2.0), stride=16)
    return _rpn(gen, RPNHead(channels, gen.num_anchors_per_location()), **kwargs)


def _rpn(gen: AnchorGenerator, head: RPNHead, **rpn) -> RegionProposalNetwork:
    """An RPN with the config's defaults but for ``rpn`` (``model.rpn`` keys)."""
    return RegionProposalNetwork.from_config(det_model_config(rpn=rpn).rpn, anchor_generator=gen, head=head)


def test_head_shapes_and_init():
    torch.manual_seed(0)
    head = RPNHead(16, 9, conv_channels=12)
    logits, deltas = head(torch.randn(2, 16, 5, 7))
    assert logits.shape == (2, 9, 5, 7) and deltas.shape == (2, 36, 5, 7)
    assert head.conv.out_channels == 12
    for layer in (head.conv, head.cls_logits, head.bbox_pred):
        assert torch.count_nonzero(layer.bias) == 0
        assert 0.005 < float(layer.weight.detach().std()) < 0.015


def test_assign_targets_hand_case_gt_equal_to_anchor():
    rpn = _toy_rpn()
    anchors = rpn.anchor_generator((4, 4))
    gt = torch.tensor([[16.0, 16.0, 48.0, 48.0]])  # exactly the anchor of cell (2, 2)
    labels, matched = rpn.assign_targets(anchors, [(64, 64)], [{"boxes": gt}])
    # Row y=0 and column x=0 anchors stick out of the image -> ignored (-1).
    # IoU 1/3 (half-overlapping neighbours) -> ignore band; IoU 1/7 (diagonal) -> negative.
    expected = torch.tensor(
        [
            [-1, -1, -1, -1],
            [-1, 0, -1, 0],
            [-1, -1, 1, -1],
            [-1, 0, -1, 0],
        ]
    ).flatten()
    assert torch.equal(labels[0], expected)
    assert torch.equal(matched[0][10], gt[0])


def test_assign_targets_border_options_and_valid_region():
    rpn = _toy_rpn(allowed_border=-1)
    anchors = rpn.anchor_generator((4, 4))
    gt = torch.tensor([[16.0, 16.0, 48.0, 48.0]])
    labels = rpn.assign_targets(anchors, [(64, 64)], [{"boxes": gt}])[0][0].view(4, 4)
    # With the border check disabled the cross-boundary anchors take part: (0, 0) is negative.
    assert labels[0, 0] == 0 and labels[2, 2] == 1 and labels[1, 2] == -1

    # Valid region 64 (h) x 40 (w) inside a 64x64 padded map: column x=2 ends at 48 > 40 -> ignored.
    rpn = _toy_rpn()
    labels = rpn.assign_targets(anchors, [(64, 40)], [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]])}])[0][0]
    labels = labels.view(4, 4)
    assert bool((labels[:, 2:] == -1).all())
    # gt has IoU 576/1472 = 0.39 with both (1,1) [0,0,32,32] and (2,1) [0,16,32,48], and no anchor
    # reaches 0.7: both tied best anchors become positive; (3,1) has IoU 0.10 -> negative.
    assert labels[:, 1].tolist() == [-1, 1, 1, 0]
    assert int((labels == 1).sum()) == 2


def test_zero_gt_image_all_inside_anchors_negative():
    rpn = _toy_rpn()
    anchors = rpn.anchor_generator((4, 4))
    labels, _ = rpn.assign_targets(anchors, [(64, 64)], [{"boxes": torch.zeros(0, 4)}])
    grid = labels[0].view(4, 4)
    assert bool((grid[1:, 1:] == 0).all())
    assert bool((grid[0] == -1).all()) and bool((grid[:, 0] == -1).all())


def test_losses_known_answer():
    rpn = _toy_rpn(batch_size_per_image=256)
    rpn.train()
    b = 0.7
    with torch.no_grad():  # constant outputs: every logit = b, every delta = 0
        for layer in (rpn.head.cls_logits, rpn.head.bbox_pred):
            layer.weight.zero_()
        rpn.head.cls_logits.bias.fill_(b)
    gt = torch.tensor([[20.0, 20.0, 44.0, 50.0]])
    _, losses = rpn(torch.randn(1, 8, 4, 4), [(64, 64)], [{"boxes": gt}])

    # Inside anchors: (2,2) positive via the best-anchor rule (IoU 0.627), (3,2) ignored (IoU 0.329),
    # the other 7 negative -> 8 sampled.
    def softplus(x: float) -> float:
        return math.log1p(math.exp(x))

    expected_cls = (softplus(-b) + 7 * softplus(b)) / 8
    # Target deltas of gt vs anchor [16,16,48,48]: (0, 3/32, log(24/32), log(30/32)); prediction 0.
    beta = 1.0 / 9

    def smooth_l1(x: float) -> float:
        return 0.5 * x * x / beta if abs(x) < beta else abs(x) - 0.5 * beta

    expected_box = sum(smooth_l1(v) for v in (0.0, 3 / 32, math.log(24 / 32), math.log(30 / 32))) / 8
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_box"}
    assert math.isclose(losses["loss_rpn_cls"].item(), expected_cls, rel_tol=1e-5)
    assert math.isclose(losses["loss_rpn_box"].item(), expected_box, rel_tol=1e-5)


def _spy_on_sampler(rpn: RegionProposalNetwork, monkeypatch) -> list:
    """Record the (positive masks, negative masks) the RPN's sampler returns."""
    calls = []
    real = rpn.sampler

    def spy(labels, seeds=None):
        out = real(labels, seeds)
        calls.append(out)
        return out

    monkeypatch.setattr(rpn, "sampler", spy)
    return calls


def _flat_anchors(rpn: RegionProposalNetwork, height: int, width: int) -> torch.Tensor:
    """Anchors in the head's flat (y, x, anchor) order, built by hand from the cell anchors and stride 16."""
    cell = rpn.anchor_generator.cell_anchors()
    return torch.stack(
        [
            cell[a] + torch.tensor([16.0 * x, 16.0 * y, 16.0 * x, 16.0 * y])
            for y in range(height)
            for x in range(width)
            for a in range(cell.shape[0])
        ]
    )


def test_zero_gt_and_all_cross_boundary_give_known_losses(monkeypatch):
    torch.manual_seed(0)
    rpn = _multi_rpn()
    rpn.train()
    sampled_masks = _spy_on_sampler(rpn, monkeypatch)
    features = torch.randn(1, 8, 4, 4, requires_grad=True)
    _, losses = rpn(features, [(64, 64)], [{"boxes": torch.zeros(0, 4)}])
    assert losses["loss_rpn_box"].item() == 0.0
    # No gt: every sampled anchor is negative, and with 144 anchors < 256 every anchor inside the
    # 64x64 image is sampled. The loss is then mean softplus(objectness) over those anchors.
    (pos,), (neg,) = sampled_masks[0]
    anchors = _flat_anchors(rpn, 4, 4)
    inside = (anchors[:, 0] >= 0) & (anchors[:, 1] >= 0) & (anchors[:, 2] <= 64) & (anchors[:, 3] <= 64)
    assert not pos.any() and torch.equal(neg, inside) and int(inside.sum()) > 0
    logits, _ = rpn.head(features)
    objectness = logits.permute(0, 2, 3, 1).reshape(-1)  # (y, x, anchor) order
    expected = F.softplus(objectness[inside]).mean()
    torch.testing.assert_close(losses["loss_rpn_cls"], expected)
    (losses["loss_rpn_cls"] + losses["loss_rpn_box"]).backward()
    (expected_grad,) = torch.autograd.grad(expected, features)
    assert expected_grad.abs().sum() > 0
    torch.testing.assert_close(features.grad, expected_grad, rtol=1e-5, atol=1e-8)

    # A 20x20 valid region fits no anchor of size >= 16 centred on the grid: nothing is sampled.
    _, losses = rpn(torch.randn(1, 8, 2, 2), [(20, 20)], [{"boxes": torch.tensor([[2.0, 2.0, 18.0, 18.0]])}])
    assert losses["loss_rpn_cls"].item() == 0.0 and losses["loss_rpn_box"].item() == 0.0


def _naive_proposals(
    rpn: RegionProposalNetwork, features: torch.Tensor, image_sizes, pre_n: int, post_n: int, nms_thresh: float = 0.7
) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """Per image: decode every anchor (torchvision's BoxCoder) -> clip -> drop empty -> top pre_n by
    objectness -> torchvision.ops.nms -> top post_n. Returns (boxes, sigmoid scores, #boxes after NMS)."""
    with torch.no_grad():
        logits, deltas = rpn.head(features)
    _, num_a, height, width = logits.shape
    anchors = _flat_anchors(rpn, height, width)
    coder = TVBoxCoder((1.0, 1.0, 1.0, 1.0))
    out = []
    for b, (h, w) in enumerate(image_sizes):
        scores = logits[b].permute(1, 2, 0).reshape(-1)
        d = deltas[b].view(num_a, 4, height, width).permute(2, 3, 0, 1).reshape(-1, 4)
        boxes = coder.decode_single(d, anchors)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, scores = boxes[keep], scores[keep]
        order = scores.argsort(descending=True)[:pre_n]
        boxes, scores = boxes[order], scores[order]
        kept = nms(boxes, scores, nms_thresh)
        out.append((boxes[kept[:post_n]], torch.sigmoid(scores[kept[:post_n]]), len(kept)))
    return out


def test_forward_proposals_equal_a_naive_decode_clip_topn_nms_reference():
    torch.manual_seed(0)
    rpn = _multi_rpn(pre_nms_top_n_train=300, post_nms_top_n_train=40, pre_nms_top_n_test=200, post_nms_top_n_test=7)
    with torch.no_grad():  # larger deltas spread the boxes so that clipping and NMS matter
        rpn.head.bbox_pred.weight.normal_(std=0.5)
    features = torch.randn(2, 8, 6, 8)  # 6 * 8 * 9 = 432 anchors per image > both pre-NMS top-n
    image_sizes = [(96, 128), (70, 100)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0]])}, {"boxes": torch.tensor([[30.0, 5.0, 90.0, 65.0]])}]

    rpn.train()
    proposals, losses = rpn(features, image_sizes, targets)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_box"}
    reference = _naive_proposals(rpn, features, image_sizes, pre_n=300, post_n=40)
    assert len(proposals) == 2
    for p, (boxes, _, num_after_nms) in zip(proposals, reference):
        assert 40 < num_after_nms < 300  # NMS removed some, and more than the top-n survived it
        assert p.shape == boxes.shape == (40, 4)
        torch.testing.assert_close(p, boxes, rtol=0, atol=1e-4)

    rpn.eval()
    proposals, losses = rpn(features, image_sizes)
    assert losses == {}
    # filter_proposals also returns the scores (sigmoid of the kept logits)
    with torch.no_grad():
        objectness, pred_deltas, anchors = rpn.predict(features)
        decoded = rpn.box_coder.decode(pred_deltas.reshape(-1, 4), anchors.repeat(2, 1)).view(2, -1, 4)
    filtered, scores = rpn.filter_proposals(decoded, objectness, image_sizes)
    reference = _naive_proposals(rpn, features, image_sizes, pre_n=200, post_n=7)
    for p, f, s, (boxes, ref_scores, _) in zip(proposals, filtered, scores, reference):
        assert not p.requires_grad and torch.equal(p, f)
        assert p.shape == boxes.shape == (7, 4)
        torch.testing.assert_close(p, boxes, rtol=0, atol=1e-4)
        torch.testing.assert_close(s, ref_scores, rtol=1e-6, atol=1e-7)


def test_proposals_match_independent_reconstruction_from_head_layout():
    torch.manual_seed(1)
    # nms_thresh=1.0 suppresses nothing, so every kept box must come back, sorted by score.
    rpn = _multi_rpn(pre_nms_top_n_test=1000, post_nms_top_n_test=1000, nms_thresh=1.0).eval()
    with torch.no_grad():
        rpn.head.bbox_pred.weight.normal_(std=0.2)
    height, width, image_hw = 3, 5, (40, 70)
    features = torch.randn(1, 8, height, width)
    proposals, _ = rpn(features, [image_hw])
    # Rebuild from the raw head outputs [A, h, w] / [4A, h, w] cell by cell.
    with torch.no_grad():
        logits, deltas = rpn.head(features)
    cell = rpn.anchor_generator.cell_anchors()
    coder = TVBoxCoder((1.0, 1.0, 1.0, 1.0))
    rows = []
    for y in range(height):
        for x in range(width):
            for a in range(9):
                anchor = cell[a] + torch.tensor([16.0 * x, 16.0 * y, 16.0 * x, 16.0 * y])
                box = coder.decode_single(deltas[0, 4 * a : 4 * a + 4, y, x][None], anchor[None])[0]
                box[0::2] = box[0::2].clamp(0, image_hw[1])
                box[1::2] = box[1::2].clamp(0, image_hw[0])
                if box[2] > box[0] and box[3] > box[1]:
                    rows.append((float(logits[0, a, y, x]), box))
    rows.sort(key=lambda r: -r[0])
    expected = torch.stack([box for _, box in rows])
    assert proposals[0].shape == expected.shape
    assert torch.allclose(proposals[0], expected, atol=1e-4)


def test_batched_nms_keeps_images_independent():
    torch.manual_seed(2)
    rpn = _multi_rpn(post_nms_top_n_test=50).eval()
    features = torch.randn(1, 8, 4, 6).repeat(2, 1, 1, 1)
    proposals, _ = rpn(features, [(64, 96), (64, 96)])
    assert torch.equal(proposals[0], proposals[1])
    single, _ = rpn(features[:1], [(64, 96)])
    assert torch.equal(single[0], proposals[0])


def test_overfit_one_image_losses_decrease():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, kernel_size=16, stride=16), nn.ReLU())
    # batch 256 > number of anchors: every non-ignored anchor is sampled, so the curve is not noisy.
    rpn = _multi_rpn(batch_size_per_image=256, pre_nms_top_n_train=100, post_nms_top_n_train=20)
    rpn.train()
    image = torch.rand(1, 3, 64, 96) * 255 / 64
    targets = [{"boxes": torch.tensor([[8.0, 10.0, 40.0, 44.0], [50.0, 16.0, 90.0, 40.0]])}]
    params = list(backbone.parameters()) + list(rpn.parameters())
    optimizer = torch.optim.Adam(params, lr=3e-3)
    with torch.no_grad():  # zero objectness layer: the first loss_rpn_cls is exactly ln 2
        rpn.head.cls_logits.weight.zero_()
        rpn.head.cls_logits.bias.zero_()
    history = []
    for _ in range(30):
        _, losses = rpn(backbone(image), [(64, 96)], targets)
        total = losses["loss_rpn_cls"] + losses["loss_rpn_box"]
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append((losses["loss_rpn_cls"].item(), losses["loss_rpn_box"].item()))
    first, last = history[0], history[-1]
    assert first[0] == pytest.approx(math.log(2.0), rel=1e-6)
    assert last[0] < 0.5 * first[0]
    assert last[1] < 0.6 * first[1]


def test_bad_inputs_raise_clear_errors():
    rpn = _toy_rpn()
    rpn.train()
    features = torch.randn(1, 8, 4, 4)
    with pytest.raises(ValueError, match="targets are required"):
        rpn(features, [(64, 64)])
    with pytest.raises(ValueError, match="image_sizes"):
        rpn(features, [(64, 64), (64, 64)], [{"boxes": torch.zeros(0, 4)}])
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\]"):
        rpn(features, [(64, 64)], [{"boxes": torch.zeros(2, 5)}])
    with pytest.raises(ValueError, match=r"x2 <= x1"):
        rpn(features, [(64, 64)], [{"boxes": torch.tensor([[5.0, 5.0, 5.0, 9.0]])}])
    with pytest.raises(ValueError, match="anchors per location"):
        _rpn(AnchorGenerator(sizes=(128, 256, 512), aspect_ratios=(0.5, 1.0, 2.0), stride=16), RPNHead(8, 3))


# ------------------------------------------------------------------------------------------ crowd regions
def test_anchor_inside_a_crowd_region_is_ignored_not_negative():
    rpn = _toy_rpn()
    anchors = rpn.anchor_generator((4, 4))
    gt = torch.tensor([[16.0, 16.0, 48.0, 48.0]])  # the anchor of cell (2, 2), as in the hand case above
    crowd = torch.tensor([[32.0, 0.0, 64.0, 32.0]])  # exactly the anchor of cell (1, 3)
    plain = rpn.assign_targets(anchors, [(64, 64)], [{"boxes": gt}])[0][0].view(4, 4)
    labels = rpn.assign_targets(anchors, [(64, 64)], [{"boxes": gt, "crowd_boxes": crowd}])[0][0].view(4, 4)
    assert plain[1, 3] == 0 and labels[1, 3] == -1  # on the crowd: ignored instead of negative
    # Elsewhere nothing changes: (1, 1), (3, 1), (3, 3) stay negative, (2, 2) positive (only 1/4 of it
    # lies in the crowd box), the IoU-1/3 band stays ignored.
    expected = plain.clone()
    expected[1, 3] = -1
    assert torch.equal(labels, expected)
    assert labels[1, 1] == 0 and labels[3, 3] == 0 and labels[2, 2] == 1


def test_crowd_threshold_and_images_without_objects():
    rpn = _toy_rpn()
    anchors = rpn.anchor_generator((4, 4))
    # No gt boxes, one crowd region covering 3/4 of anchor (1, 1) = [0, 0, 32, 32] and half of (2, 1).
    crowd = torch.tensor([[0.0, 0.0, 32.0, 24.0]])
    labels = rpn.assign_targets(anchors, [(64, 64)], [{"boxes": torch.zeros(0, 4), "crowd_boxes": crowd}])[0][0]
    grid = labels.view(4, 4)
    assert grid[1, 1] == -1 and int((grid[1:, 1:] == 0).sum()) == 8  # (2, 1) is 0.25 inside: still negative
    off = _toy_rpn(crowd_iof_thresh=1.0)
    labels = off.assign_targets(anchors, [(64, 64)], [{"boxes": torch.zeros(0, 4), "crowd_boxes": crowd}])[0][0]
    assert bool((labels.view(4, 4)[1:, 1:] == 0).all())


def test_crowd_anchor_is_never_a_gts_best_anchor():
    # gt [0, 0, 40, 40]: its best anchor is (1, 1) = [0, 0, 32, 32] (IoU 1024/1600 = 0.64), which a crowd
    # region covers. With the crowd region that anchor is ignored and the next best, the tie (1, 2) / (2, 1)
    # (IoU 768/1856 = 0.41 each; half of each lies in the crowd box), become the gt's positives instead.
    rpn = _toy_rpn()
    anchors = rpn.anchor_generator((4, 4))
    gt = torch.tensor([[0.0, 0.0, 40.0, 40.0]])
    plain = rpn.assign_targets(anchors, [(64, 64)], [{"boxes": gt}])[0][0].view(4, 4)
    assert plain[1, 1] == 1 and int((plain == 1).sum()) == 1
    crowd = torch.tensor([[0.0, 0.0, 32.0, 32.0]])
    labels = rpn.assign_targets(anchors, [(64, 64)], [{"boxes": gt, "crowd_boxes": crowd}])[0][0].view(4, 4)
    assert labels[1, 1] == -1 and labels[1, 2] == 1 and labels[2, 1] == 1 and int((labels == 1).sum()) == 2


def test_rpn_losses_only_and_proposals_only_paths():
    torch.manual_seed(0)
    rpn = _multi_rpn()
    feats = torch.randn(1, 8, 4, 5)
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 40.0, 44.0]])}]
    proposals, losses = rpn(feats, [(64, 80)], targets)
    none, same = rpn(feats, [(64, 80)], targets, compute_proposals=False)
    assert none == [] and set(same) == {"loss_rpn_cls", "loss_rpn_box"}
    # propose() in training mode with mode="test" uses the test top-n, and equals eval-mode proposals.
    rpn.eval()
    expected, _ = rpn(feats, [(64, 80)])
    rpn.train()
    got = rpn.propose(feats, [(64, 80)], mode="test")
    assert torch.equal(got[0], expected[0]) and torch.equal(rpn.propose(feats, [(64, 80)])[0], proposals[0])
