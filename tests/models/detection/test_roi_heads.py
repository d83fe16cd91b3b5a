"""Tests for RoI pooling, the conv5 box head, the Fast R-CNN predictor, RoI sampling, losses and inference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align, roi_pool

from detres.config.defaults import DET_DEFAULTS
from detres.models.backbones.resnet import build_resnet
from detres.models.backbones.resnet_c4 import ResNetC5Head
from detres.models.detection.box_head import BoxHead, FastRCNNPredictor
from detres.models.detection.roi_heads import RoIHeads
from detres.models.detection.roi_pooler import RoIPooler
from tests.tiny_configs import det_model_config

ROI_KEYS = set(DET_DEFAULTS["model"]["roi_heads"])


class _TinyHead(nn.Module):
    """A cheap stand-in for conv5_x: 1x1 conv, stride 2, global pooling."""

    def __init__(self, in_channels: int = 4, out_channels: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, stride=2)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x)).mean(dim=(2, 3))


def _heads(**kwargs) -> RoIHeads:
    """RoI heads with the config's defaults but for ``kwargs`` (``model.roi_heads`` keys, or constructor options)."""
    head = _TinyHead()
    roi_cfg = det_model_config(roi_heads={k: v for k, v in kwargs.items() if k in ROI_KEYS}).roi_heads
    return RoIHeads.from_config(
        roi_cfg,
        pooler=_pooler(4),
        box_head=BoxHead(head),
        predictor=FastRCNNPredictor(head.out_channels, 3),
        **{k: v for k, v in kwargs.items() if k not in ROI_KEYS},
    )


def _pooler(output_size: int = 14, **kwargs) -> RoIPooler:
    """A stride-16 pooler: roi_pool unless ``kwargs`` say otherwise."""
    args = {"spatial_scale": 1.0 / 16, "pooler_type": "roi_pool", "sampling_ratio": 0, **kwargs}
    return RoIPooler(output_size=output_size, **args)


# ------------------------------------------------------------------------------------ pooling
def test_pooler_hand_example() -> None:
    feats = torch.arange(16.0).view(1, 1, 4, 4)
    pooler = _pooler(2)
    # roi_pool rounds x2/16 = 3 and counts cells 0..3 inclusive: the whole 4x4 map, max over each quadrant.
    out = pooler(feats, [torch.tensor([[0.0, 0.0, 48.0, 48.0]])])
    torch.testing.assert_close(out, torch.tensor([[[[5.0, 7.0], [13.0, 15.0]]]]))
    # Cells 1..2 in x and 0..1 in y: a 2x2 window, one cell per bin.
    out = pooler(feats, [torch.tensor([[16.0, 0.0, 32.0, 16.0]])])
    torch.testing.assert_close(out, torch.tensor([[[[1.0, 2.0], [5.0, 6.0]]]]))


@pytest.mark.parametrize("pooler_type", ["roi_pool", "roi_align"])
def test_pooler_matches_torchvision_batch_index_format(pooler_type: str) -> None:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 5, 6, 8, generator=g)
    boxes = [torch.tensor([[0.0, 0.0, 40.0, 30.0], [16.0, 8.0, 120.0, 90.0]]), torch.tensor([[33.0, 17.0, 70.0, 80.0]])]
    pooler = _pooler(14, pooler_type=pooler_type, sampling_ratio=2)
    out = pooler(feats, boxes)
    assert out.shape == (3, 5, 14, 14)
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], dim=1) for i, b in enumerate(boxes)])
    if pooler_type == "roi_pool":
        ref = roi_pool(feats, rois, (14, 14), 1.0 / 16)
    else:
        ref = roi_align(feats, rois, (14, 14), 1.0 / 16, 2)
    torch.testing.assert_close(out, ref)


def test_pool_then_conv5_gives_7x7_and_region_vectors() -> None:
    torch.manual_seed(0)
    head = ResNetC5Head(build_resnet(18))
    pooled = _pooler()(torch.randn(1, 256, 5, 6), [torch.tensor([[0.0, 0.0, 50.0, 60.0], [10.0, 10.0, 90.0, 70.0]])])
    assert pooled.shape == (2, 256, 14, 14)
    with torch.no_grad():
        assert head.forward_map(pooled).shape == (2, 512, 7, 7)
        vectors = BoxHead(head)(pooled)
    assert vectors.shape == (2, 512)


@pytest.mark.parametrize("size, channels_last", [(14, True), (8, True), (7, True), (4, False)])
def test_box_head_runs_conv5_channels_last_on_large_maps_with_the_same_values_and_gradients(size, channels_last):
    torch.manual_seed(0)
    head = ResNetC5Head(build_resnet(18))
    seen = []
    hook = head.layer4.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    pooled = torch.randn(5, 256, size, size)
    fast_in, ref_in = pooled.clone().requires_grad_(True), pooled.clone().requires_grad_(True)
    fast = BoxHead(head)(fast_in)
    hook.remove()
    ref = head.avgpool(head.layer4(ref_in)).flatten(1)  # conv5 straight on the contiguous maps
    assert seen == [channels_last]
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
    weights = torch.randn_like(ref)
    grads_fast = torch.autograd.grad((fast * weights).sum(), [fast_in, *head.parameters()])
    grads_ref = torch.autograd.grad((ref * weights).sum(), [ref_in, *head.parameters()])
    for a, b in zip(grads_fast, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert grads_fast[0].shape == pooled.shape


def test_pooler_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="pooler_type"):
        _pooler(pooler_type="psroi")
    with pytest.raises(ValueError, match="box tensors"):
        _pooler()(torch.zeros(2, 1, 4, 4), [torch.zeros(1, 4)])


# ---------------------------------------------------------------------------------- predictor
def test_predictor_shapes_and_initialisation() -> None:
    torch.manual_seed(0)
    pred = FastRCNNPredictor(2048, 21)
    assert pred.cls_score.out_features == 21 and pred.bbox_pred.out_features == 84
    assert pred.cls_score.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert pred.bbox_pred.weight.std().item() == pytest.approx(0.001, rel=0.05)
    assert not pred.cls_score.bias.any() and not pred.bbox_pred.bias.any()
    logits, deltas = pred(torch.randn(3, 2048))
    assert logits.shape == (3, 21) and deltas.shape == (3, 84)
    assert FastRCNNPredictor(16, 4, class_agnostic_bbox=True)(torch.randn(2, 16))[1].shape == (2, 4)
    with pytest.raises(ValueError, match="background"):
        FastRCNNPredictor(16, 1)


# ------------------------------------------------------------------------------ target assignment
def _bands_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    labels = torch.tensor([2, 1])
    # Boxes (0, 0, 10, h) have IoU h/10 with gt 0 and 0 with gt 1.
    heights = [8.0, 5.0, 4.0, 3.0, 2.0, 0.5]  # IoU 0.8, 0.5, 0.4, 0.3, 0.2, 0.05
    props = torch.tensor([[0.0, 0.0, 10.0, h] for h in heights] + [[50.0, 50.0, 60.0, 59.0], [80.0, 80.0, 90.0, 90.0]])
    return props, gt, labels


def test_assign_targets_fg_bg_ignore_bands() -> None:
    props, gt, gt_labels = _bands_case()
    labels, matched = _heads().assign_targets(props, gt, gt_labels)
    # fg IoU >= 0.5 takes the gt label; bg in [0.1, 0.5); IoU 0.05 and 0 are ignored.
    assert labels.tolist() == [2, 2, 0, 0, 0, -1, 1, -1]
    torch.testing.assert_close(matched[6], gt[1])
    torch.testing.assert_close(matched[0], gt[0])


def test_assign_targets_configurable_thresholds() -> None:
    props, gt, gt_labels = _bands_case()
    # A gap between hi and fg is ignored; lo = 0 makes every low-overlap proposal background.
    labels, _ = _heads(bg_iou_thresh_hi=0.35, bg_iou_thresh_lo=0.0).assign_targets(props, gt, gt_labels)
    assert labels.tolist() == [2, 2, -1, 0, 0, 0, 1, 0]
    with pytest.raises(ValueError, match="bg_iou_thresh_lo"):
        _heads(bg_iou_thresh_lo=0.6)


def test_images_without_objects() -> None:
    props = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 20.0]])
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    sampled, labels, _ = _heads().select_training_samples([props], [empty])
    assert sampled[0].shape == (0, 4)  # IoU 0 < lo: nothing to learn from
    sampled, labels, _ = _heads(bg_iou_thresh_lo=0.0).select_training_samples([props], [empty])
    assert labels[0].tolist() == [0, 0]


def test_sampling_caps_foreground_at_25_percent_and_skips_ignored() -> None:
    torch.manual_seed(0)
    gt = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    fg = torch.tensor([[0.0, 0.0, 100.0, 60.0 + i] for i in range(40)])  # IoU 0.6..0.99
    bg = torch.tensor([[0.0, 0.0, 100.0, 15.0 + i * 0.1] for i in range(200)])  # IoU 0.15..0.35
    ign = torch.tensor([[200.0, 200.0, 220.0, 220.0]]).repeat(50, 1)  # IoU 0
    heads = _heads(batch_size_per_image=16, positive_fraction=0.25)
    target = {"boxes": gt, "labels": torch.tensor([1])}
    sampled, labels, reg = heads.select_training_samples([torch.cat([fg, bg, ign])], [target])
    assert sampled[0].shape == (16, 4)
    assert int((labels[0] == 1).sum()) == 4 and int((labels[0] == 0).sum()) == 12
    assert not bool((sampled[0][:, 0] == 200.0).any())  # ignored proposals never sampled
    assert not reg[0][labels[0] == 0].any()  # background rows carry no regression target


def test_gt_is_added_as_a_proposal() -> None:
    gt = torch.tensor([[10.0, 10.0, 40.0, 50.0]])
    props = torch.tensor([[10.0, 10.0, 40.0, 20.0], [0.0, 0.0, 30.0, 30.0]])  # IoU 0.25 and ~0.31: both bg
    target = {"boxes": gt, "labels": torch.tensor([3])}
    sampled, labels, reg = _heads().select_training_samples([props], [target])
    fg = labels[0] > 0
    assert int(fg.sum()) == 1 and labels[0][fg].item() == 3
    torch.testing.assert_close(sampled[0][fg][0], gt[0])
    assert not reg[0][fg].any()  # the gt box regresses onto itself: zero deltas
    _, labels, _ = _heads(add_gt_as_proposals=False).select_training_samples([props], [target])
    assert int((labels[0] > 0).sum()) == 0 and labels[0].numel() == 2


def test_background_range_voc_and_coco() -> None:
    # One gt; proposals with IoU 0 (far away), 0.05, 0.2 and 0.6 with it.
    gt = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    props = torch.tensor(
        [[200.0, 200.0, 220.0, 220.0], [0.0, 0.0, 100.0, 5.0], [0.0, 0.0, 100.0, 20.0], [0.0, 0.0, 100.0, 60.0]]
    )
    target = {"boxes": gt, "labels": torch.tensor([2])}
    voc = _heads(add_gt_as_proposals=False)  # [0.1, 0.5): the IoU-0 and IoU-0.05 proposals are ignored
    assert voc.assign_targets(props, gt, target["labels"])[0].tolist() == [-1, -1, 0, 2]
    coco = _heads(add_gt_as_proposals=False, bg_iou_thresh_lo=0.0)  # [0, 0.5) (Faster R-CNN Sec. 4.2)
    assert coco.assign_targets(props, gt, target["labels"])[0].tolist() == [0, 0, 0, 2]


def test_proposals_inside_a_crowd_region_are_ignored() -> None:
    gt = torch.tensor([[20.0, 20.0, 40.0, 40.0]])
    crowd = torch.tensor([[0.0, 0.0, 15.0, 15.0]])
    props = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # wholly inside the crowd region, IoU 0 with the gt: background without crowd
            [50.0, 50.0, 60.0, 60.0],  # elsewhere: background
            [20.0, 20.0, 40.0, 40.0],  # on the gt: foreground
            [5.0, 5.0, 25.0, 25.0],  # 0.25 of it inside the crowd region: background (IoU with gt 25/775)
        ]
    )
    heads = _heads(bg_iou_thresh_lo=0.0)
    plain = {"boxes": gt, "labels": torch.tensor([1])}
    _, labels, _ = heads.select_training_samples([props], [plain])
    assert labels[0].tolist() == [0, 0, 1, 0, 1]  # + the appended gt
    sampled, labels, _ = heads.select_training_samples([props], [{**plain, "crowd_boxes": crowd}])
    assert labels[0].tolist() == [0, 1, 0, 1]
    torch.testing.assert_close(sampled[0], torch.cat([props[1:], gt]))
    # An annotated object inside a crowd region: the RPN proposal on it is ignored (Detectron's rule
    # overrides overlaps), the appended gt box itself stays a positive.
    inner = torch.tensor([[2.0, 2.0, 12.0, 12.0]])
    sampled, labels, _ = heads.select_training_samples(
        [inner.clone()], [{"boxes": inner, "labels": torch.tensor([3]), "crowd_boxes": crowd}]
    )
    assert labels[0].tolist() == [3] and sampled[0].shape == (1, 4)
    # Switched off with crowd_iof_thresh >= 1.
    _, labels, _ = _heads(bg_iou_thresh_lo=0.0, crowd_iof_thresh=1.0).select_training_samples(
        [props], [{**plain, "crowd_boxes": crowd}]
    )
    assert labels[0].tolist() == [0, 0, 1, 0, 1]


def test_regression_targets_known_values() -> None:
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    props = torch.tensor([[0.0, 0.0, 10.0, 8.0]])
    _, labels, reg = _heads(add_gt_as_proposals=False).select_training_samples(
        [props], [{"boxes": gt, "labels": torch.tensor([1])}]
    )
    # weights (10, 10, 5, 5): dy = 10 * (5 - 4) / 8, dh = 5 * log(10 / 8).
    torch.testing.assert_close(reg[0], torch.tensor([[0.0, 1.25, 0.0, 5.0 * math.log(1.25)]]))
    assert labels[0].tolist() == [1]


# ---------------------------------------------------------------------------------------- losses
def _smooth_l1(x: torch.Tensor, beta: float) -> torch.Tensor:
    ax = x.abs()
    return torch.where(ax < beta, 0.5 * ax * ax / beta, ax - 0.5 * beta).sum()


def test_losses_known_answer_and_gradient_routing() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, generator=g, requires_grad=True)
    deltas = (torch.randn(4, 12, generator=g) * 2).requires_grad_()
    labels = torch.tensor([2, 0, 1, 0])
    targets = torch.randn(4, 4, generator=g)
    losses = _heads(smooth_l1_beta=1.0).losses(logits, deltas, [labels[:2], labels[2:]], [targets[:2], targets[2:]])
    log_p = torch.log_softmax(logits.detach(), dim=1)
    expected_cls = -(log_p[0, 2] + log_p[1, 0] + log_p[2, 1] + log_p[3, 0]) / 4
    d = deltas.detach()
    expected_box = (_smooth_l1(d[0, 8:12] - targets[0], 1.0) + _smooth_l1(d[2, 4:8] - targets[2], 1.0)) / 4
    torch.testing.assert_close(losses["loss_cls"], expected_cls)
    torch.testing.assert_close(losses["loss_box_reg"], expected_box)
    losses["loss_box_reg"].backward()
    # Smooth-L1 with beta 1, summed and divided by all N = 4 sampled RoIs: d/d delta = clamp(d - t, -1, 1) / 4
    # on the true class's 4 columns of the foreground RoIs (0: class 2, 2: class 1), zero everywhere else.
    expected = torch.zeros(4, 12)
    expected[0, 8:12] = (d[0, 8:12] - targets[0]).clamp(-1, 1) / 4
    expected[2, 4:8] = (d[2, 4:8] - targets[2]).clamp(-1, 1) / 4
    assert ((d[0, 8:12] - targets[0]).abs() > 1).any() and ((d[0, 8:12] - targets[0]).abs() < 1).any()  # both branches
    torch.testing.assert_close(deltas.grad, expected, rtol=0, atol=1e-7)
    # Cross-entropy averaged over the 4 RoIs: d/d logits = (softmax - onehot) / 4.
    losses["loss_cls"].backward()
    expected_logit_grad = (torch.softmax(logits.detach(), dim=1) - F.one_hot(labels, 3).float()) / 4
    torch.testing.assert_close(logits.grad, expected_logit_grad, rtol=1e-6, atol=1e-7)


def test_losses_with_no_sampled_rois_are_zero_not_nan() -> None:
    logits = torch.zeros(0, 3, requires_grad=True)
    losses = _heads().losses(logits, torch.zeros(0, 12), [torch.zeros(0, dtype=torch.int64)], [torch.zeros(0, 4)])
    assert losses["loss_cls"].item() == 0.0 and losses["loss_box_reg"].item() == 0.0
    losses["loss_cls"].backward()


# --------------------------------------------------------------------------------- forward / hooks
def _features_and_targets():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 4, 4, 5, generator=g)
    props = [torch.tensor([[0.0, 0.0, 30.0, 30.0], [10.0, 5.0, 60.0, 50.0]]), torch.tensor([[5.0, 5.0, 40.0, 60.0]])]
    targets = [
        {"boxes": torch.tensor([[2.0, 2.0, 30.0, 28.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[5.0, 10.0, 40.0, 60.0]]), "labels": torch.tensor([2])},
    ]
    return feats, props, targets, [(64, 80), (60, 70)]


def _spy_on_sampling(heads: RoIHeads, monkeypatch) -> list:
    """Record what select_training_samples returns: (proposals, labels, regression targets) per call."""
    calls = []
    real = heads.select_training_samples

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out)
        return out

    monkeypatch.setattr(heads, "select_training_samples", spy)
    return calls


def test_forward_train_and_eval(monkeypatch) -> None:
    torch.manual_seed(0)
    feats, props, targets, sizes = _features_and_targets()
    # A zeroed predictor: logits and deltas are exactly 0, so loss_cls = ln(K+1) = ln 3 and loss_box_reg is
    # the smooth-L1 (beta 1) of the regression targets themselves, summed and divided by the N sampled RoIs.
    zeroed = _heads(score_thresh=0.0).train()
    with torch.no_grad():
        for layer in (zeroed.predictor.cls_score, zeroed.predictor.bbox_pred):
            layer.weight.zero_()
            layer.bias.zero_()
    sampled = _spy_on_sampling(zeroed, monkeypatch)
    dets, losses = zeroed(feats, props, sizes, targets)
    assert dets == [] and set(losses) == {"loss_cls", "loss_box_reg"}
    _, labels, reg = sampled[0]
    labels, reg = torch.cat(labels), torch.cat(reg)
    assert labels.numel() > 0 and bool((labels > 0).any()) and bool(reg[labels > 0].any())
    torch.testing.assert_close(losses["loss_cls"], torch.tensor(math.log(3.0)))
    torch.testing.assert_close(losses["loss_box_reg"], _smooth_l1(reg[labels > 0], 1.0) / labels.numel())
    heads = _heads(score_thresh=0.0)
    heads.eval()
    with torch.no_grad():
        dets, losses = heads(feats, props, sizes)
    assert losses == {} and len(dets) == 2
    for det, (h, w), p in zip(dets, sizes, props):
        assert set(det) == {"boxes", "scores", "labels"}
        # Nearly-zero initial deltas: each (proposal, class) survives as the proposal box itself.
        assert det["boxes"].shape[0] == 2 * p.shape[0]
        assert bool((det["boxes"][:, 2] <= w).all() and (det["boxes"][:, 3] <= h).all())
        assert set(det["labels"].tolist()) <= {1, 2}
    with pytest.raises(ValueError, match="targets"):
        heads.train()(feats, props, sizes)
    with pytest.raises(ValueError, match="labels"):
        heads(feats, props, sizes, [{"boxes": t["boxes"]} for t in targets])


class _ContextRoIHeads(RoIHeads):
    """Global context plug-in shape: whole-image RoI feature through the same head, concatenated."""

    def region_features(self, features, proposals, image_sizes):
        regions = super().region_features(features, proposals, image_sizes)
        whole = [torch.tensor([[0.0, 0.0, float(w), float(h)]]) for h, w in image_sizes]
        context = self.box_head(self.pooler(features, whole))
        counts = [len(p) for p in proposals]
        return torch.cat([regions, context.repeat_interleave(torch.tensor(counts), dim=0)], dim=1)


def test_region_features_hook_supports_global_context(monkeypatch) -> None:
    torch.manual_seed(0)
    feats, props, targets, sizes = _features_and_targets()
    head = _TinyHead()
    heads = _ContextRoIHeads.from_config(
        det_model_config().roi_heads,
        pooler=_pooler(4),
        box_head=BoxHead(head),
        predictor=FastRCNNPredictor(2 * head.out_channels, 3),
    )
    sampled = _spy_on_sampling(heads, monkeypatch)
    region = []
    heads.predictor.register_forward_pre_hook(lambda m, args: region.append(args[0].detach()))
    _, losses = heads.train()(feats, props, sizes, targets)
    losses["loss_cls"].backward()
    # The predictor saw [region vector | whole-image context vector] per sampled RoI ...
    x = region[0]
    labels = torch.cat(sampled[0][1])
    counts = [len(p) for p in sampled[0][0]]
    n = labels.numel()
    assert x.shape == (n, 2 * head.out_channels) and n > 0
    with torch.no_grad():
        whole = [
            head(heads.pooler(feats[i : i + 1], [torch.tensor([[0.0, 0.0, float(w), float(h)]])]))
            for i, (h, w) in enumerate(sizes)
        ]
    torch.testing.assert_close(x[:, head.out_channels :], torch.cat([c.expand(k, -1) for c, k in zip(whole, counts)]))
    assert x[:, head.out_channels :].abs().sum() > 0
    # ... and the cross-entropy gradient reaches both halves: (softmax - onehot)^T @ features / N.
    probs = torch.softmax(heads.predictor.cls_score(x), dim=1).detach()
    expected = (probs - F.one_hot(labels, 3).float()).T @ x / n
    torch.testing.assert_close(heads.predictor.cls_score.weight.grad, expected, rtol=1e-5, atol=1e-7)
    dets, _ = heads.eval()(feats, props, sizes)
    assert len(dets) == 2


def test_decode_predictions_applies_class_specific_deltas() -> None:
    heads = _heads()
    props = [torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[10.0, 10.0, 30.0, 20.0]])]
    deltas = torch.zeros(2, 12)
    deltas[1, 8] = 10.0  # class 2 of RoI 1: dx = 10/10 -> shift right by one width (20)
    probs, boxes = heads.decode_predictions(torch.zeros(2, 3), deltas, props)
    torch.testing.assert_close(probs[0], torch.full((1, 3), 1.0 / 3))
    torch.testing.assert_close(boxes[1][0, 2], torch.tensor([30.0, 10.0, 50.0, 20.0]))
    torch.testing.assert_close(boxes[1][0, 1], props[1][0])
    torch.testing.assert_close(boxes[0][0], props[0].expand(3, 4))


def test_postprocess_options_reach_the_heads_post_processing() -> None:
    from detres.models.detection.postprocess import DetectionPostprocess

    props = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [20.0, 5.0, 28.0, 15.0]])]
    logits = torch.tensor([[0.0, 3.0, 0.0], [0.0, 2.0, 1.0], [2.0, 0.0, 0.0]])
    deltas = torch.zeros(3, 12)
    options = dict(
        nms_method="soft_gaussian", soft_nms_sigma=0.3, soft_nms_score_thresh=0.01, box_voting=True, box_voting_iou=0.4
    )
    heads = _heads(**options).eval()
    probs, boxes = heads.decode_predictions(logits, deltas, props)
    expected = DetectionPostprocess(
        score_thresh=0.05,
        nms_thresh=0.3,
        detections_per_img=100,
        nms_method="soft_gaussian",
        soft_nms_sigma=0.3,
        soft_nms_score_thresh=0.01,
        voting=True,
        voting_iou=0.4,
    )(probs[0], boxes[0], (20, 30))
    assert heads.postprocess == DetectionPostprocess.from_config(det_model_config(roi_heads=options).roi_heads)
    got = heads.postprocess_detections(logits, deltas, props, [(20, 30)])[0]
    assert all(torch.equal(got[k], expected[k]) for k in ("boxes", "scores", "labels"))
    # The defaults are the paper's: hard NMS, no voting.
    plain = _heads().postprocess
    assert (plain.nms_method, plain.voting, plain.voting_iou, plain.soft_nms_sigma) == ("nms", False, 0.5, 0.5)
    with pytest.raises(ValueError, match="nms_method"):
        _heads(nms_method="greedy")
