"""Tests for detres.models.detection.context: the Appendix-B global context feature in the RoI heads."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_pool

from detres.config.load import load_config
from detres.models.build import build_detector, detector_state, load_detector
from detres.models.detection.box_head import BoxHead, FastRCNNPredictor
from detres.models.detection.context import ContextRoIHeads
from detres.models.detection.roi_heads import RoIHeads
from detres.models.detection.roi_pooler import RoIPooler
from detres.utils.torch_files import save_checkpoint
from tests.tiny_configs import build_test_detector, det_model_config


class _TinyHead(nn.Module):
    """A cheap stand-in for conv5_x: 1x1 conv, then global max pooling (so a read of any padded cell shows)."""

    def __init__(self, in_channels: int = 4, out_channels: int = 6) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, stride=1)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).amax(dim=(2, 3))


def _pair(roi_heads: dict | None = None, **kwargs) -> tuple[ContextRoIHeads, RoIHeads, _TinyHead]:
    """A context head and a baseline head sharing the same pooler and conv5 stand-in."""
    torch.manual_seed(0)
    head = _TinyHead()
    roi_cfg = det_model_config(roi_heads=roi_heads or {}).roi_heads
    pooler, box_head = (
        RoIPooler(output_size=4, spatial_scale=1.0 / 16, pooler_type="roi_pool", sampling_ratio=0),
        BoxHead(head),
    )
    ctx = ContextRoIHeads.from_config(
        roi_cfg, pooler=pooler, box_head=box_head, predictor=FastRCNNPredictor(2 * head.out_channels, 3), **kwargs
    )
    base = RoIHeads.from_config(
        roi_cfg, pooler=pooler, box_head=box_head, predictor=FastRCNNPredictor(head.out_channels, 3), **kwargs
    )
    return ctx, base, head


# Two images of different sizes: 64x80 px -> 4x5 cells, 40x50 px -> ceil(2.5) x ceil(3.125) = 3x4 cells.
SIZES = [(64, 80), (40, 50)]
CELLS = [(4, 5), (3, 4)]
PADDING_VALUE = 50.0  # far above the N(0, 1) features: any read of a padded cell changes a max-pooled output


def _alone_and_batched() -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each image's own feature map [1,4,h,w], and the batch [2,4,4,5] whose padding holds PADDING_VALUE."""
    g = torch.Generator().manual_seed(1)
    alone = [torch.randn(1, 4, h, w, generator=g) for h, w in CELLS]
    batch = torch.full((2, 4, 4, 5), PADDING_VALUE)
    for i, (h, w) in enumerate(CELLS):
        batch[i, :, :h, :w] = alone[i][0]
    return alone, batch


def _proposals() -> list[torch.Tensor]:
    return [
        torch.tensor([[0.0, 0.0, 30.0, 30.0], [10.0, 5.0, 60.0, 50.0], [20.0, 16.0, 70.0, 60.0]]),
        torch.tensor([[5.0, 5.0, 40.0, 35.0], [0.0, 0.0, 16.0, 16.0]]),
    ]


def _whole(h: int, w: int) -> torch.Tensor:
    return torch.tensor([[0.0, 0.0, float(w), float(h)]])


@pytest.mark.parametrize("chunk", [32, 1])  # one-shot and the CPU chunked inference path of the regions
def test_context_is_the_whole_image_roi_of_the_baseline_head_and_the_same_for_every_roi(chunk):
    ctx, base, head = _pair(inference_roi_chunk=chunk)
    alone, batch = _alone_and_batched()
    props = _proposals()
    with torch.no_grad():
        x = ctx.eval().region_features(batch, props, SIZES)
        regions = base.eval().region_features(batch, props, SIZES)
        # Known answer: the baseline head's region feature of the box [0, 0, W, H] on the image's own map.
        expected = [base.region_features(a, [_whole(*hw)], [hw]) for a, hw in zip(alone, SIZES)]
    d = head.out_channels
    assert x.shape == (5, 2 * d)
    torch.testing.assert_close(x[:, :d], regions, rtol=0, atol=0)  # the region half is the baseline feature
    torch.testing.assert_close(x[:3, d:], expected[0].expand(3, d), rtol=0, atol=0)
    torch.testing.assert_close(x[3:, d:], expected[1].expand(2, d), rtol=0, atol=0)
    assert not torch.equal(expected[0], expected[1])
    # ... i.e. torchvision's roi_pool of the whole-image RoI (batch-index format) on each image's own map.
    for a, (h, w), e in zip(alone, SIZES, expected):
        hand = head(roi_pool(a, torch.tensor([[0.0, 0.0, 0.0, float(w), float(h)]]), (4, 4), 1.0 / 16)).detach()
        torch.testing.assert_close(e, hand, rtol=0, atol=0)


def test_a_padded_image_gets_its_own_context_alone_or_batched():
    ctx, base, _ = _pair()
    alone, batch = _alone_and_batched()
    with torch.no_grad():
        batched = ctx.context_features(batch, SIZES)
        singles = torch.cat([ctx.context_features(a, [hw]) for a, hw in zip(alone, SIZES)])
        # The padded size's box would read the padding of the smaller image: a different vector.
        padded_box = base.region_features(batch[1:], [_whole(64, 80)], [(64, 80)])
    torch.testing.assert_close(batched, singles, rtol=0, atol=0)
    assert batched.shape == (2, 6)
    assert not torch.allclose(padded_box[0], batched[1])
    # Also through the full region_features (eval): the smaller image's rows carry its alone context.
    props = _proposals()
    with torch.no_grad():
        rows = ctx.eval().region_features(batch, props, SIZES)[3:, 6:]
        rows_alone = ctx.region_features(alone[1], props[1:], SIZES[1:])[:, 6:]
    torch.testing.assert_close(rows, rows_alone, rtol=0, atol=0)


def _reference_loss(
    head: _TinyHead,
    predictor: FastRCNNPredictor,
    features: torch.Tensor,
    props,
    labels,
    reg,
    *,
    detach: str | None = None,
) -> torch.Tensor:
    """Hand-built [region | context] Fast R-CNN loss with torchvision's roi_pool (one branch optionally detached)."""
    regions = head(roi_pool(features, props, (4, 4), 1.0 / 16))
    contexts = []
    for i, ((h, w), (ch, cw)) in enumerate(zip(SIZES, CELLS)):
        contexts.append(head(roi_pool(features[i : i + 1, :, :ch, :cw], [_whole(h, w)], (4, 4), 1.0 / 16)))
    context = torch.cat([c.expand(len(p), -1) for c, p in zip(contexts, props)])
    if detach == "regions":
        regions = regions.detach()
    elif detach == "context":
        context = context.detach()
    x = torch.cat([regions, context], dim=1)
    logits, deltas = predictor(x)
    labels, reg = torch.cat(labels), torch.cat(reg)
    n = labels.numel()
    fg = torch.nonzero(labels > 0).squeeze(1)
    box = F.smooth_l1_loss(deltas.view(n, -1, 4)[fg, labels[fg]], reg[fg], beta=1.0, reduction="sum") / n
    return F.cross_entropy(logits, labels) + box


def test_training_gradients_reach_the_conv5_head_through_the_context_branch():
    ctx, _, head = _pair(roi_heads={"bg_iou_thresh_lo": 0.0})
    _, batch = _alone_and_batched()
    features = batch.clone().requires_grad_()
    targets = [
        {"boxes": torch.tensor([[2.0, 2.0, 30.0, 28.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[5.0, 5.0, 40.0, 36.0]]), "labels": torch.tensor([2])},
    ]
    torch.manual_seed(0)
    props, labels, reg = ctx.select_training_samples(_proposals(), targets)
    ctx.train()
    ctx.select_training_samples = lambda *_: (props, labels, reg)  # fixed samples for the reference
    _, losses = ctx(features, _proposals(), SIZES, targets)
    (losses["loss_cls"] + losses["loss_box_reg"]).backward()

    ref_head, ref_pred = copy.deepcopy(head), copy.deepcopy(ctx.predictor)
    ref_feats = batch.clone().requires_grad_()
    params = [ref_head.conv.weight, ref_head.conv.bias]
    loss = _reference_loss(ref_head, ref_pred, ref_feats, props, labels, reg)
    torch.testing.assert_close(loss, (losses["loss_cls"] + losses["loss_box_reg"]).detach())
    full = torch.autograd.grad(loss, [*params, ref_feats])
    torch.testing.assert_close(head.conv.weight.grad, full[0])
    torch.testing.assert_close(head.conv.bias.grad, full[1])
    torch.testing.assert_close(features.grad, full[2])
    # The part of the conv5 gradient that flows through the context branch alone: non-zero, and the
    # total is the region part plus the context part.
    via_context = torch.autograd.grad(
        _reference_loss(ref_head, ref_pred, ref_feats, props, labels, reg, detach="regions"), params
    )
    via_regions = torch.autograd.grad(
        _reference_loss(ref_head, ref_pred, ref_feats, props, labels, reg, detach="context"), params
    )
    assert via_context[0].abs().sum() > 1e-4
    torch.testing.assert_close(head.conv.weight.grad, via_context[0] + via_regions[0])
    # The padded cells of the smaller image receive no gradient (they are never read).
    assert not features.grad[1, :, 3:, :].any() and not features.grad[1, :, :, 4:].any()


def test_context_heads_need_a_doubled_predictor():
    head = _TinyHead()
    with pytest.raises(ValueError, match="2 x 6 = 12"):
        ContextRoIHeads.from_config(
            det_model_config().roi_heads,
            pooler=RoIPooler(output_size=4, spatial_scale=1 / 16, pooler_type="roi_pool", sampling_ratio=0),
            box_head=BoxHead(head),
            predictor=FastRCNNPredictor(6, 3),
        )


def _r18(global_context: bool = False):
    return build_test_detector(
        3,
        depth=18,
        base_width=16,
        anchor_sizes=[16, 32],
        aspect_ratios=[1.0],
        pixel_std=[1.0, 1.0, 1.0],
        rpn={"pre_nms_top_n_test": 100, "post_nms_top_n_test": 10},
        roi_heads={"pooler_resolution": 8, "score_thresh": 0.0, "global_context": global_context},
    )


def test_build_doubles_the_predictor_inputs_and_the_default_has_no_context():
    torch.manual_seed(0)
    plain, context = _r18(), _r18(global_context=True)
    dim = plain.roi_heads.box_head.out_features
    assert type(plain.roi_heads) is RoIHeads and isinstance(context.roi_heads, ContextRoIHeads)
    assert plain.roi_heads.predictor.cls_score.in_features == dim
    assert context.roi_heads.predictor.cls_score.in_features == 2 * dim
    assert context.roi_heads.predictor.bbox_pred.in_features == 2 * dim
    # No new parameters besides the wider sibling layers: the context reuses the pooler and conv5 head.
    plain_keys, context_keys = set(plain.state_dict()), set(context.state_dict())
    assert plain_keys == context_keys
    # The default config builds the baseline.
    cfg = load_config(None, [], task="det")
    assert cfg.model.roi_heads.global_context is False


def test_config_to_checkpoint_round_trip_rebuilds_a_context_model(tmp_path):
    cfg = load_config(
        None,
        [
            "model.depth=18",
            "model.base_width=16",
            "model.anchor_sizes=[16, 32]",
            "model.roi_heads.pooler_resolution=8",
            "model.roi_heads.score_thresh=0.0",
            "model.roi_heads.global_context=true",
        ],
        task="det",
    )
    torch.manual_seed(0)
    model = build_detector(cfg.model, input_cfg=cfg.input, num_classes=2).eval()
    assert isinstance(model.roi_heads, ContextRoIHeads)
    save_checkpoint(tmp_path / "ctx.pt", detector_state(model, config=cfg, meta={"class_names": ["a", "b"]}))
    loaded, _ = load_detector(tmp_path / "ctx.pt")
    assert isinstance(loaded.roi_heads, ContextRoIHeads)
    image = torch.rand(3, 70, 90, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        a, b = model([image])[0], loaded([image])[0]
    assert a["boxes"].shape[0] > 0
    assert all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels"))
    # A config tree that does not name the option (written before it existed) rebuilds the baseline.
    tree = cfg.to_dict()
    del tree["model"]["roi_heads"]["global_context"]
    plain = build_detector(det_model_config(**tree["model"]), input_cfg=cfg.input, num_classes=2)
    save_checkpoint(tmp_path / "old.pt", detector_state(plain, config=tree, meta={"class_names": ["a", "b"]}))
    old, _ = load_detector(tmp_path / "old.pt")
    assert type(old.roi_heads) is RoIHeads
    assert old.roi_heads.predictor.cls_score.in_features == old.roi_heads.box_head.out_features
