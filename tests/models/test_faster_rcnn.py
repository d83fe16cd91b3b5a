"""Tests for the Faster R-CNN assembly: preprocessing, train/eval outputs, freezing, and overfitting a toy set."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops import box_iou

from detres.models.anchors import AnchorGenerator
from detres.models.backbone import ResNetC4Trunk, ResNetC5Head
from detres.models.faster_rcnn import FasterRCNN, build_faster_rcnn
from detres.models.resnet import BasicBlock, conv1x1
from detres.models.roi_heads import BoxHead, FastRCNNPredictor, RoIHeads, RoIPooler
from detres.models.rpn import RegionProposalNetwork, RPNHead

IMAGENET_STD = (58.395, 57.12, 57.375)


def _small_r18(**kwargs) -> FasterRCNN:
    """ResNet-18 Faster R-CNN sized for 64-96 px images and a CPU test budget."""
    torch.manual_seed(0)
    args = dict(
        depth=18,
        num_classes=3,
        anchor_sizes=(16, 32),
        aspect_ratios=(1.0,),
        rpn_pre_nms_top_n_train=200,
        rpn_post_nms_top_n_train=40,
        rpn_pre_nms_top_n_test=200,
        rpn_post_nms_top_n_test=20,
        roi_batch_size_per_image=16,
        score_thresh=0.0,
    )
    args.update(kwargs)
    return build_faster_rcnn(**args)


def _targets() -> list[dict[str, torch.Tensor]]:
    return [
        {"boxes": torch.tensor([[10.0, 10.0, 40.0, 40.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[5.0, 20.0, 30.0, 60.0], [30.0, 30.0, 60.0, 50.0]]), "labels": torch.tensor([2, 3])},
    ]


def test_preprocess_normalises_then_zero_pads_to_multiple_of_16() -> None:
    model = FasterRCNN(nn.Identity(), nn.Identity(), nn.Identity(), pixel_mean=(10.0, 20.0, 30.0), pixel_std=(2.0, 4.0, 5.0))
    a = torch.full((3, 50, 70), 50.0)
    b = torch.full((3, 64, 40), 100.0)
    batch, sizes = model.preprocess([a, b])
    assert batch.shape == (2, 3, 64, 80) and sizes == [(50, 70), (64, 40)]
    torch.testing.assert_close(batch[0, :, 0, 0], torch.tensor([20.0, 7.5, 4.0]))
    torch.testing.assert_close(batch[1, :, 63, 39], torch.tensor([45.0, 20.0, 14.0]))
    assert not batch[0, :, 50:].any() and not batch[0, :, :, 70:].any() and not batch[1, :, :, 40:].any()
    # A padded 0..255 batch with image_sizes gives the same normalised batch.
    padded = torch.full((2, 3, 64, 70), 255.0)
    padded[0, :, :50, :70] = a
    padded[1, :, :64, :40] = b
    batch2, sizes2 = model.preprocess(padded, [(50, 70), (64, 40)])
    assert sizes2 == sizes
    torch.testing.assert_close(batch2, batch)
    with pytest.raises(ValueError, match="images\\[0\\]"):
        model.preprocess([torch.zeros(1, 8, 8)])
    with pytest.raises(ValueError, match="image_sizes"):
        model.preprocess(padded, [(65, 70), (64, 40)])


def test_r18_train_returns_four_finite_losses_and_eval_detections_in_bounds() -> None:
    model = _small_r18()
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 96, generator=g) * 255, torch.rand(3, 80, 64, generator=g) * 255]
    losses = model.train()(images, _targets())
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box_reg"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.roi_heads.predictor.cls_score.weight.grad.abs().sum() > 0
    assert model.rpn.head.conv.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        dets = model(images)
    assert len(dets) == 2
    for det, img in zip(dets, images):
        h, w = img.shape[1:]
        assert det["boxes"].shape[0] > 0  # score_thresh=0 keeps every surviving (RoI, class)
        assert bool((det["boxes"] >= 0).all()) and bool((det["boxes"][:, 2] <= w).all()) and bool((det["boxes"][:, 3] <= h).all())
        assert set(det["labels"].tolist()) <= {1, 2, 3}
    with pytest.raises(ValueError, match="targets"):
        model.train()(images)


def test_stage_wise_passes_of_the_alternating_scheme() -> None:
    model = _small_r18().train()
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 96, generator=g) * 255, torch.rand(3, 80, 64, generator=g) * 255]
    # RPN step: only the two RPN losses; the RoI heads are not run, so they get no gradient.
    rpn_losses = model.rpn_losses(images, _targets())
    assert set(rpn_losses) == {"loss_rpn_cls", "loss_rpn_box"}
    sum(rpn_losses.values()).backward()
    assert model.rpn.head.conv.weight.grad.abs().sum() > 0 and model.trunk.layer3[0].conv1.weight.grad is not None
    assert model.roi_heads.predictor.cls_score.weight.grad is None
    model.zero_grad(set_to_none=True)
    # Proposals of this network with the training top-n (40 here), whatever the module mode.
    proposals = model.propose(images)
    assert [p.shape[0] <= 40 for p in proposals] == [True, True] and not proposals[0].requires_grad
    model.eval()
    assert all(torch.equal(a, b) for a, b in zip(model.propose(images, mode="train"), proposals))
    model.train()
    # Fast R-CNN step on given proposals: only the two RoI losses; the RPN gets no gradient.
    roi_losses = model.detector_losses(images, _targets(), proposals=proposals)
    assert set(roi_losses) == {"loss_cls", "loss_box_reg"}
    sum(roi_losses.values()).backward()
    assert model.roi_heads.predictor.cls_score.weight.grad.abs().sum() > 0
    assert model.trunk.layer3[0].conv1.weight.grad.abs().sum() > 0 and model.rpn.head.conv.weight.grad is None
    # Crowd regions travel with the targets (moved to the model's device like the boxes).
    targets = [dict(t, crowd_boxes=torch.tensor([[0.0, 0.0, 8.0, 8.0]])) for t in _targets()]
    assert set(model(images, targets)) == {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box_reg"}


def test_default_build_freezes_bn_and_res2() -> None:
    model = _small_r18()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    trunk = model.trunk
    assert not any(p.requires_grad for p in trunk.conv1.parameters())
    assert not any(p.requires_grad for p in trunk.layer1.parameters())
    assert all(p.requires_grad for p in trunk.layer2.parameters())
    assert all(p.requires_grad for p in model.roi_heads.box_head.parameters())
    assert model.roi_heads.predictor.cls_score.out_features == 4  # 3 object classes + background
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_faster_rcnn(depth=18, num_classes=3, weights_path="/nonexistent/missing.pth")


# -------------------------------------------------------------------------------- overfitting
class _NarrowResNet18(nn.Module):
    """ResNet-18 layout (2 basic blocks per stage, torchvision names) with 1/4 widths, for CPU speed."""

    def __init__(self, widths: tuple[int, int, int, int] = (16, 32, 64, 128)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None if stride == 1 and cin == w else nn.Sequential(conv1x1(cin, w, stride), nn.BatchNorm2d(w))
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(cin, w, stride, down), BasicBlock(w, w)))
            cin = w


def _toy_images() -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Two 80x80 noisy grey images with solid red (1), green (2) and blue (3) rectangles."""
    rng = np.random.default_rng(0)
    colours = {1: (220, 30, 30), 2: (30, 200, 30), 3: (30, 30, 220)}
    layouts = [[(1, (6, 8, 34, 36)), (3, (40, 30, 74, 60))], [(2, (10, 36, 42, 70)), (1, (44, 6, 76, 34))]]
    images, targets = [], []
    for layout in layouts:
        canvas = np.full((80, 80, 3), 110.0, np.float32) + rng.normal(0, 8, (80, 80, 3)).astype(np.float32)
        for label, (x1, y1, x2, y2) in layout:
            canvas[y1:y2, x1:x2] = colours[label]
        images.append(torch.from_numpy(canvas.clip(0, 255)).permute(2, 0, 1).contiguous())
        targets.append(
            {
                "boxes": torch.tensor([box for _, box in layout], dtype=torch.float32),
                "labels": torch.tensor([label for label, _ in layout]),
            }
        )
    return images, targets


def test_overfits_two_toy_images() -> None:
    torch.manual_seed(0)
    net = _NarrowResNet18()
    # From scratch there are no checkpoint statistics to freeze: train BN and every stage.
    trunk = ResNetC4Trunk(net, freeze_at=0, frozen_bn=False)
    conv5 = ResNetC5Head(net, frozen_bn=False)
    anchors = AnchorGenerator(sizes=(24, 32), aspect_ratios=(1.0,))
    rpn = RegionProposalNetwork(
        anchors,
        RPNHead(trunk.out_channels, anchors.num_anchors_per_location()),
        batch_size_per_image=64,
        pre_nms_top_n_train=300,
        post_nms_top_n_train=64,
        pre_nms_top_n_test=300,
        post_nms_top_n_test=32,
    )
    heads = RoIHeads(RoIPooler(), BoxHead(conv5), FastRCNNPredictor(conv5.out_channels, 4), batch_size_per_image=32)
    model = FasterRCNN(trunk, rpn, heads, pixel_std=IMAGENET_STD)
    images, targets = _toy_images()
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
    model.train()
    history = []
    for _ in range(80):
        losses = model(images, targets)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(total.item())
    assert np.mean(history[-5:]) < 0.2 * np.mean(history[:5]), history
    model.eval()
    with torch.no_grad():
        dets = model(images)
    for det, target in zip(dets, targets):
        iou = box_iou(target["boxes"], det["boxes"])
        for g, label in enumerate(target["labels"].tolist()):
            hit = (iou[g] > 0.5) & (det["labels"] == label) & (det["scores"] > 0.3)
            assert bool(hit.any()), f"gt {g} (label {label}) not detected: {det}"
