"""Tests for inference fast paths: BN folding keeps features, logits and detections; chunked RoI inference keeps
outputs."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import misc as tv_misc

from detres.inference.fast_path import count_batchnorm, fold_frozen_batchnorm, prepare_for_inference
from detres.models.backbones.frozen_bn import FrozenBatchNorm2d
from detres.models.backbones.resnet_c4 import build_resnet_c4
from detres.models.detection.roi_heads import BoxHead, FastRCNNPredictor, RoIHeads, RoIPooler
from tests.tiny_configs import build_test_detector, det_model_config


def _randomise_norms(model: nn.Module, seed: int = 0) -> None:
    """Non-identity statistics and affines; with the defaults (mean 0, var 1, w 1, b 0) folding would be a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (tv_misc.FrozenBatchNorm2d, nn.BatchNorm2d)):
                n = m.running_mean.numel()
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) * 2.0 + 0.25)


def _assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    """Equal within ``rel`` of the tensor's scale (fp32 rounding differs once BN is folded)."""
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * max(scale, 1e-12))


def _detector() -> nn.Module:
    torch.manual_seed(0)
    model = build_test_detector(
        3,
        depth=18,
        anchor_sizes=[16, 32],
        aspect_ratios=[1.0],
        pixel_std=[1.0, 1.0, 1.0],
        rpn={"pre_nms_top_n_test": 200, "post_nms_top_n_test": 20},
        roi_heads={"score_thresh": 0.0},
    )
    _randomise_norms(model)
    with torch.no_grad():
        # Spread the class scores so that NMS and top-k have something to order.
        model.roi_heads.predictor.cls_score.weight.normal_(std=0.05)
        model.roi_heads.predictor.bbox_pred.weight.normal_(std=0.01)
    return model.eval()


def test_fold_known_answer() -> None:
    conv = nn.Conv2d(1, 1, 1, bias=False)
    bn = FrozenBatchNorm2d(1)
    with torch.no_grad():
        conv.weight.fill_(2.0)
        bn.weight.fill_(3.0)
        bn.bias.fill_(1.0)
        bn.running_mean.fill_(0.5)
        bn.running_var.fill_(4.0 - bn.eps)  # sqrt(var + eps) = 2
    folded = fold_frozen_batchnorm(nn.Sequential(conv, bn))
    # 3 * (2x - 0.5) / 2 + 1 = 3x + 0.25
    assert isinstance(folded[1], nn.Identity)
    torch.testing.assert_close(folded[0].weight.detach(), torch.full((1, 1, 1, 1), 3.0))
    torch.testing.assert_close(folded[0].bias.detach(), torch.tensor([0.25]))
    x = torch.tensor([[[[1.0, -2.0]]]])
    torch.testing.assert_close(folded(x), torch.tensor([[[[3.25, -5.75]]]]))


def test_folded_detector_same_features_logits_and_detections() -> None:
    model = _detector()
    folded = fold_frozen_batchnorm(model)
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 64, 96, generator=g) * 255, torch.rand(3, 80, 64, generator=g) * 255]
    with torch.inference_mode():
        batch, sizes = model.preprocess(images)
        feats, feats_f = model.trunk(batch), folded.trunk(batch)
        _assert_close_rel(feats_f, feats)

        proposals, _ = model.rpn(feats, sizes)
        heads, heads_f = model.roi_heads, folded.roi_heads
        logits, deltas = heads.predict(heads.region_features(feats, proposals, sizes))
        logits_f, deltas_f = heads_f.predict(heads_f.region_features(feats, proposals, sizes))
        _assert_close_rel(logits_f, logits)
        _assert_close_rel(deltas_f, deltas)

        dets, dets_f = model(images), folded(images)
    assert len(dets) == len(dets_f) == 2
    for d, d_f in zip(dets, dets_f):
        assert d["scores"].numel() > 0
        torch.testing.assert_close(d_f["labels"], d["labels"])
        _assert_close_rel(d_f["scores"], d["scores"])
        _assert_close_rel(d_f["boxes"], d["boxes"])


def test_folding_removes_every_norm_and_leaves_the_original_untouched() -> None:
    model = _detector()
    n_norms = count_batchnorm(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads_before = [p.requires_grad for p in model.parameters()]

    folded = fold_frozen_batchnorm(model)
    assert n_norms == 20  # ResNet-18: stem 1 + 8 blocks x 2 + 3 projection shortcuts
    assert count_batchnorm(folded) == 0
    assert sum(isinstance(m, nn.Identity) for m in folded.modules()) == n_norms
    # Each folded conv gained a bias; no conv of the original had one.
    convs_with_bias = [m for m in folded.trunk.modules() if isinstance(m, nn.Conv2d) and m.bias is not None]
    convs_with_bias += [
        m for m in folded.roi_heads.box_head.modules() if isinstance(m, nn.Conv2d) and m.bias is not None
    ]
    assert len(convs_with_bias) == n_norms

    assert count_batchnorm(model) == n_norms
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    assert [p.requires_grad for p in model.parameters()] == grads_before


def test_bottleneck_head_with_projection_shortcut_folds_exactly() -> None:
    torch.manual_seed(0)
    _, head, _ = build_resnet_c4(50)
    _randomise_norms(head, seed=3)
    head.eval()
    folded = fold_frozen_batchnorm(head)
    assert count_batchnorm(head) == 3 * 3 + 1 and count_batchnorm(folded) == 0
    x = torch.randn(3, 1024, 8, 8, generator=torch.Generator().manual_seed(2)).relu()
    with torch.inference_mode():
        _assert_close_rel(folded(x), head(x))


def test_torchvision_resnet_with_eval_batchnorm_folds() -> None:
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=5)
    _randomise_norms(net, seed=4)
    net.eval()
    folded = fold_frozen_batchnorm(net)
    assert count_batchnorm(net) == 20 and count_batchnorm(folded) == 0
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        _assert_close_rel(folded(x), net(x))


def test_training_mode_batchnorm_is_refused() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    with pytest.raises(ValueError, match="training mode"):
        fold_frozen_batchnorm(net)


def test_prepare_for_inference_returns_frozen_eval_copy() -> None:
    model = _detector().train()
    ready = prepare_for_inference(model)
    assert not ready.training and all(not m.training for m in ready.modules())
    assert all(not p.requires_grad for p in ready.parameters())
    assert count_batchnorm(ready) == 0
    assert model.training and count_batchnorm(model) == 20
    assert any(p.requires_grad for p in model.parameters())


def _tiny_roi_heads(chunk: int) -> RoIHeads:
    torch.manual_seed(0)
    _, head, dim = build_resnet_c4(18)
    _randomise_norms(head, seed=6)
    roi_cfg = det_model_config(roi_heads={"pooler_resolution": 6, "score_thresh": 0.0}).roi_heads
    heads = RoIHeads.from_config(
        roi_cfg,
        pooler=RoIPooler.from_config(roi_cfg, spatial_scale=1.0 / 16),
        box_head=BoxHead(head, out_features=dim),
        predictor=FastRCNNPredictor(dim, 4),
        inference_roi_chunk=chunk,
    )
    with torch.no_grad():
        heads.predictor.cls_score.weight.normal_(std=0.05)
    return heads.eval()


def test_chunked_roi_inference_matches_one_shot() -> None:
    g = torch.Generator().manual_seed(7)
    feats = torch.randn(2, 256, 6, 8, generator=g).relu()

    # 23 and 9 proposals: chunks of 5 split both images unevenly.
    def boxes(n: int) -> torch.Tensor:
        xy = torch.rand(n, 2, generator=g) * torch.tensor([100.0, 70.0])
        wh = torch.rand(n, 2, generator=g) * 40 + 8
        return torch.cat([xy, xy + wh], dim=1)

    proposals = [boxes(23), boxes(9)]
    sizes = [(96, 128), (96, 128)]
    one_shot, chunked = _tiny_roi_heads(0), _tiny_roi_heads(5)
    with torch.inference_mode():
        ref = one_shot.region_features(feats, proposals, sizes)
        out = chunked.region_features(feats, proposals, sizes)
        assert out.shape == ref.shape == (32, 512)
        _assert_close_rel(out, ref)
        dets_ref, _ = one_shot(feats, proposals, sizes)
        dets, _ = chunked(feats, proposals, sizes)
        # An image without proposals inside a chunked batch.
        empty = chunked.region_features(feats, [boxes(11), torch.zeros(0, 4)], sizes)
        assert empty.shape == (11, 512)
    for d, d_ref in zip(dets, dets_ref):
        torch.testing.assert_close(d["labels"], d_ref["labels"])
        _assert_close_rel(d["scores"], d_ref["scores"])
        _assert_close_rel(d["boxes"], d_ref["boxes"])
