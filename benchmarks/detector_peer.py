"""torchvision's FasterRCNN assembled from torchvision parts only, configured like a detres C4 detector and able to
carry its weights."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.rpn import AnchorGenerator, RPNHead
from torchvision.ops import MultiScaleRoIAlign, roi_pool
from torchvision.ops import misc as tv_misc

__all__ = ["TorchvisionRoIPool", "build_torchvision_c4", "load_detres_weights"]

_ARCHS = {
    18: torchvision.models.resnet18,
    34: torchvision.models.resnet34,
    50: torchvision.models.resnet50,
    101: torchvision.models.resnet101,
    152: torchvision.models.resnet152,
}
_TRUNK_PARTS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")


class TorchvisionRoIPool(nn.Module):
    """torchvision.ops.roi_pool behind the (features, proposals, image_shapes) call RoIHeads makes.

    torchvision ships only MultiScaleRoIAlign for its detection heads; detres's default (the paper) is
    max RoI pooling, so the peer pools with torchvision's own roi_pool op on the single "0" map.
    """

    def __init__(self, output_size: int, spatial_scale: float) -> None:
        super().__init__()
        self.output_size = (int(output_size), int(output_size))
        self.spatial_scale = float(spatial_scale)

    def forward(
        self, features: Mapping[str, torch.Tensor], proposals: list[torch.Tensor], image_shapes: list[tuple[int, int]]
    ) -> torch.Tensor:
        return roi_pool(features["0"], proposals, self.output_size, self.spatial_scale)


def _trunk_and_head(depth: int, freeze_at: int) -> tuple[nn.Sequential, nn.Sequential, int]:
    """conv1..layer3 and layer4 + GAP of a torchvision ResNet with FrozenBatchNorm2d (no weights downloaded)."""
    resnet = _ARCHS[depth](weights=None, norm_layer=tv_misc.FrozenBatchNorm2d)
    # Same attribute names as detres's ResNetC4Trunk / ResNetC5Head, so state_dicts match key for key.
    trunk = nn.Sequential(OrderedDict((name, getattr(resnet, name)) for name in _TRUNK_PARTS))
    trunk.out_channels = 1024 if depth >= 50 else 256  # conv4_x width: FasterRCNN reads it
    # detres's freeze_at: 1 freezes the stem, 2 also conv2_x (res2).
    frozen = ([trunk.conv1, trunk.bn1] if freeze_at >= 1 else []) + ([trunk.layer1] if freeze_at >= 2 else [])
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
    head = nn.Sequential(OrderedDict(layer4=resnet.layer4, avgpool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(1)))
    head_dim = 2048 if depth >= 50 else 512  # bottleneck vs basic-block conv5 width
    return trunk, head, head_dim


def build_torchvision_c4(
    model_cfg: Mapping[str, Any],
    *,
    num_classes: int,
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    min_size: int,
    max_size: int,
) -> FasterRCNN:
    """torchvision FasterRCNN with the C4 layout and every setting of a detres ``model`` config tree.

    ``pixel_mean`` / ``pixel_std``: what the detres detector normalises with (its buffers). ``min_size``/``max_size``
    are torchvision's internal resize; set them to the input's own sides so that it resizes by exactly 1.
    Not mirrored, because torchvision has no such option (training targets only): detres's
    ``model.rpn.allowed_border`` (cross-boundary anchors ignored), ``model.roi_heads.bg_iou_thresh_lo`` and crowd
    regions.
    """
    rpn, roi = model_cfg["rpn"], model_cfg["roi_heads"]
    depth = int(model_cfg["depth"])
    trunk, head, head_dim = _trunk_and_head(depth, int(model_cfg["freeze_at"]))
    anchors = AnchorGenerator(
        sizes=(tuple(int(s) for s in model_cfg["anchor_sizes"]),),
        aspect_ratios=(tuple(float(r) for r in model_cfg["aspect_ratios"]),),
    )
    resolution = int(roi["pooler_resolution"])
    peer = FasterRCNN(
        trunk,
        min_size=int(min_size),
        max_size=int(max_size),
        image_mean=[float(v) for v in pixel_mean],
        image_std=[float(v) for v in pixel_std],  # 0..255 inputs, as detres
        size_divisible=16,  # detres pads to the trunk stride
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(trunk.out_channels, anchors.num_anchors_per_location()[0]),
        rpn_pre_nms_top_n_train=int(rpn["pre_nms_top_n_train"]),
        rpn_post_nms_top_n_train=int(rpn["post_nms_top_n_train"]),
        rpn_pre_nms_top_n_test=int(rpn["pre_nms_top_n_test"]),
        rpn_post_nms_top_n_test=int(rpn["post_nms_top_n_test"]),
        rpn_nms_thresh=float(rpn["nms_thresh"]),
        rpn_fg_iou_thresh=float(rpn["fg_iou_thresh"]),
        rpn_bg_iou_thresh=float(rpn["bg_iou_thresh"]),
        rpn_batch_size_per_image=int(rpn["batch_size_per_image"]),
        rpn_positive_fraction=float(rpn["positive_fraction"]),
        box_roi_pool=MultiScaleRoIAlign(["0"], output_size=resolution, sampling_ratio=int(roi["sampling_ratio"])),
        box_head=head,
        box_predictor=FastRCNNPredictor(head_dim, int(num_classes) + 1),
        box_score_thresh=float(roi["score_thresh"]),
        box_nms_thresh=float(roi["nms_thresh"]),
        box_detections_per_img=int(roi["detections_per_img"]),
        box_fg_iou_thresh=float(roi["fg_iou_thresh"]),
        box_bg_iou_thresh=float(roi["bg_iou_thresh_hi"]),
        box_batch_size_per_image=int(roi["batch_size_per_image"]),
        box_positive_fraction=float(roi["positive_fraction"]),
        bbox_reg_weights=tuple(float(w) for w in roi["bbox_reg_weights"]),
    )
    if roi["pooler_type"] == "roi_pool":
        # FasterRCNN's constructor accepts only MultiScaleRoIAlign; RoIHeads itself takes any pooler.
        peer.roi_heads.box_roi_pool = TorchvisionRoIPool(resolution, 1.0 / 16)
    return peer


def load_detres_weights(peer: FasterRCNN, detres_model: nn.Module) -> FasterRCNN:
    """Copy a detres ResNet-C4 FasterRCNN's weights into ``peer`` (strict, key for key per part)."""
    peer.backbone.load_state_dict(detres_model.trunk.state_dict(), strict=True)
    rpn_state = {
        ("conv.0.0." + k[len("conv.") :] if k.startswith("conv.") else k): v
        for k, v in detres_model.rpn.head.state_dict().items()
    }  # Conv2dNormActivation nesting
    peer.rpn.head.load_state_dict(rpn_state, strict=True)
    heads = detres_model.roi_heads
    peer.roi_heads.box_head.load_state_dict(heads.box_head.conv5_head.state_dict(), strict=True)
    peer.roi_heads.box_predictor.load_state_dict(heads.predictor.state_dict(), strict=True)
    return peer
