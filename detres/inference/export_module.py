"""The detector's single-image eval forward as one export-friendly module: image [3,H,W] -> (boxes, scores, labels)."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, nms, roi_align, roi_pool

from detres.models.detection.box_coder import decode_deltas
from detres.models.detection.context import ContextRoIHeads, with_context
from detres.models.detection.faster_rcnn import FasterRCNN
from detres.models.detection.rpn import RegionProposalNetwork

__all__ = ["ExportableDetector"]


def clip_to_image(boxes: Tensor, height: int, width: int) -> Tensor:
    """Clip [N,4] xyxy boxes to [0, W] x [0, H] (torchvision's clip_boxes_to_image, scriptable)."""
    xs = boxes[:, 0::2].clamp(min=0, max=width)
    ys = boxes[:, 1::2].clamp(min=0, max=height)
    return torch.stack((xs, ys), dim=2).reshape(-1, 4)


# Compiled even when traced (as torchvision's batched_nms helpers are): a trace would freeze the branch and k.
@torch.jit._script_if_tracing
def pre_nms_top_n(boxes: Tensor, scores: Tensor, top_n: int) -> tuple[Tensor, Tensor]:
    """The ``top_n`` highest-scoring boxes, best first, where there are more; otherwise all, in their order."""
    if scores.shape[0] > top_n:
        scores, order = scores.topk(top_n)
        boxes = boxes[order]
    return boxes, scores


@torch.jit._script_if_tracing
def context_region(features: Tensor, image: Tensor, stride: int) -> tuple[Tensor, Tensor]:
    """ContextRoIHeads.context_features' input for one image: the feature cells its pixels fall in and the
    whole-image box [1,4] (compiled when traced: the crop size depends on the image size)."""
    height, width = image.shape[1], image.shape[2]
    # ceil(h / stride) in integers, which is the eager ceil(h * scale - 1e-6) for scale = 1 / stride (ONNX
    # would get a float slice bound from the float form).
    rows = min(max((height + stride - 1) // stride, 1), features.shape[2])
    cols = min(max((width + stride - 1) // stride, 1), features.shape[3])
    # From ints only: ONNX cannot build one sequence out of the constant zeros and the (int) sizes.
    size = torch.tensor([width, height], device=features.device).to(features.dtype)
    box = torch.cat([torch.zeros_like(size), size])[None]
    return features[:, :, :rows, :cols], box


def _check_supported(model: nn.Module) -> None:
    """Raise ValueError for detectors whose eval forward this module does not reproduce."""
    if not isinstance(model, FasterRCNN):
        raise ValueError(f"export: expected a detres FasterRCNN, got {type(model).__name__}")
    if type(model.rpn) is not RegionProposalNetwork or model.rpn.head.num_classes != 1:
        raise ValueError("export: only the Faster R-CNN RPN (one objectness per anchor) is supported")
    post = model.roi_heads.postprocess
    if post.nms_method != "nms" or post.voting:
        raise ValueError(
            f"export: only hard NMS without box voting is supported, the detector has "
            f"nms_method={post.nms_method!r}, voting={post.voting}"
        )


class ExportableDetector(nn.Module):
    """A FasterRCNN's eval forward on one image, written with tensor ops that TorchScript and ONNX can carry.

    Input: ``image`` float [3,H,W], RGB on the 0..255 scale, already resized as the Predictor resizes
    (any H, W). Output: ``boxes`` float32 [N,4] xyxy in the input's pixels (clipped), ``scores`` float32 [N]
    (decreasing), ``labels`` int64 [N] in 1..K: what ``model([image])[0]`` returns, step for step: normalise,
    zero-pad to the size divisibility, trunk, RPN (decode, clip, min size, pre-NMS top-n, NMS, post-NMS
    top-n), RoI pooling, box head (and ContextRoIHeads' whole-image context vector), predictor, per-class
    decode, clip, score threshold, per-class NMS, top-k. Soft-NMS and box voting are refused. The submodules
    are the model's own (shared, not copied); the eval-mode settings are read once here.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        _check_supported(model)
        rpn, heads = model.rpn, model.roi_heads
        self.trunk = model.trunk
        self.rpn_head = rpn.head
        self.box_head = heads.box_head
        self.predictor = heads.predictor
        self.register_buffer("pixel_mean", model.pixel_mean.detach().clone())
        self.register_buffer("pixel_std", model.pixel_std.detach().clone())
        self.register_buffer("cell_anchors", rpn.anchor_generator.cell_anchors().detach().clone())
        self.size_divisibility = int(model.size_divisibility)
        self.num_anchors = int(rpn.head.num_anchors)
        self.anchor_stride = int(rpn.anchor_generator.stride)
        self.anchor_offset = float(rpn.anchor_generator.offset)
        self.rpn_weights = [float(w) for w in rpn.box_coder.weights]
        self.rpn_clip = float(rpn.box_coder.bbox_xform_clip)
        self.rpn_min_size = float(rpn.min_size)
        self.pre_nms_top_n = int(rpn.pre_nms_top_n("test"))
        self.post_nms_top_n = int(rpn.post_nms_top_n("test"))
        self.rpn_nms_thresh = float(rpn.nms_thresh)
        pooler = heads.pooler
        self.use_roi_align = pooler.pooler_type == "roi_align"
        self.pool_size = int(pooler.output_size)
        self.spatial_scale = float(pooler.spatial_scale)
        self.sampling_ratio = int(pooler.sampling_ratio)
        self.aligned = bool(pooler.aligned)
        self.box_weights = [float(w) for w in heads.box_coder.weights]
        self.box_clip = float(heads.box_coder.bbox_xform_clip)
        self.score_thresh = float(heads.postprocess.score_thresh)
        self.nms_thresh = float(heads.postprocess.nms_thresh)
        self.detections_per_img = int(heads.postprocess.detections_per_img)
        self.global_context = isinstance(heads, ContextRoIHeads)
        self.context_stride = round(1.0 / self.spatial_scale)
        if self.global_context and self.context_stride * self.spatial_scale != 1.0:
            raise ValueError(f"export: global context needs a pooler scale 1/stride, got {self.spatial_scale}")

    def normalise(self, image: Tensor) -> Tensor:
        """[3,H,W] 0..255 -> [1,3,Hp,Wp] normalised, zero-padded at the bottom/right to the divisibility."""
        height, width = image.shape[1], image.shape[2]
        div = self.size_divisibility
        x = (image.float() - self.pixel_mean) / self.pixel_std
        return F.pad(x, [0, (div - width % div) % div, 0, (div - height % div) % div])[None]

    def anchors(self, feat_h: int, feat_w: int) -> Tensor:
        """AnchorGenerator.forward's [h*w*A, 4] anchors in (y, x, anchor) order."""
        dtype, device = self.cell_anchors.dtype, self.cell_anchors.device
        shift_x = (torch.arange(feat_w, dtype=dtype, device=device) + self.anchor_offset) * self.anchor_stride
        shift_y = (torch.arange(feat_h, dtype=dtype, device=device) + self.anchor_offset) * self.anchor_stride
        grid_y, grid_x = torch.meshgrid(shift_y, shift_x, indexing="ij")
        shifts = torch.stack((grid_x, grid_y, grid_x, grid_y), dim=-1).reshape(-1, 1, 4)
        return (shifts + self.cell_anchors[None]).reshape(-1, 4)

    def proposals(self, features: Tensor, height: int, width: int) -> Tensor:
        """RegionProposalNetwork's test-mode proposals of one image: [P,4]."""
        logits, deltas = self.rpn_head(features)
        feat_h, feat_w = logits.shape[2], logits.shape[3]
        objectness = logits.permute(0, 2, 3, 1).reshape(-1)
        flat_deltas = deltas.reshape(1, self.num_anchors, 4, feat_h, feat_w).permute(0, 3, 4, 1, 2).reshape(-1, 4)
        boxes = decode_deltas(flat_deltas, self.anchors(feat_h, feat_w), self.rpn_weights, self.rpn_clip)
        boxes = clip_to_image(boxes, height, width)
        keep = (boxes[:, 2] - boxes[:, 0] > self.rpn_min_size) & (boxes[:, 3] - boxes[:, 1] > self.rpn_min_size)
        boxes, scores = pre_nms_top_n(boxes[keep], objectness[keep], self.pre_nms_top_n)
        keep = nms(boxes, scores, self.rpn_nms_thresh)[: self.post_nms_top_n]
        return boxes[keep]

    def pool(self, features: Tensor, proposals: Tensor) -> Tensor:
        """RoIPooler on one image's proposals: [P,C,S,S]."""
        rois = torch.cat([torch.zeros_like(proposals[:, :1]), proposals], dim=1)
        size = [self.pool_size, self.pool_size]
        if self.use_roi_align:
            return roi_align(features, rois, size, self.spatial_scale, self.sampling_ratio, self.aligned)
        return roi_pool(features, rois, size, self.spatial_scale)

    def detections(
        self, logits: Tensor, deltas: Tensor, proposals: Tensor, height: int, width: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """RoIHeads.postprocess_detections for one image with hard NMS."""
        probs = F.softmax(logits, dim=-1)
        num_rois, num_cols = probs.shape[0], probs.shape[1]
        boxes = decode_deltas(deltas, proposals, self.box_weights, self.box_clip)
        boxes = boxes.reshape(num_rois, -1, 4).expand(num_rois, num_cols, 4)  # class-agnostic: one box for all
        boxes = clip_to_image(boxes.reshape(-1, 4), height, width).reshape(num_rois, num_cols, 4)
        scores = probs[:, 1:].reshape(-1)
        cand_boxes = boxes[:, 1:, :].reshape(-1, 4)
        labels = torch.arange(1, num_cols, device=probs.device).repeat(num_rois)
        keep = torch.nonzero(scores > self.score_thresh).squeeze(1)
        scores, cand_boxes, labels = scores[keep], cand_boxes[keep], labels[keep]
        keep = batched_nms(cand_boxes, scores, labels, self.nms_thresh)
        if self.detections_per_img > 0:
            keep = keep[: self.detections_per_img]
        return cand_boxes[keep], scores[keep], labels[keep]

    def region_features(self, features: Tensor, proposals: Tensor, image: Tensor) -> Tensor:
        """RoIHeads.region_features: [P,D], or [P,2D] ``[region | whole-image context]`` (ContextRoIHeads)."""
        regions = self.box_head(self.pool(features, proposals))
        if not self.global_context:
            return regions
        cells, box = context_region(features, image, self.context_stride)
        context = self.box_head(self.pool(cells, box))
        return with_context(regions, context, torch.zeros_like(proposals[:, 0], dtype=torch.int64))

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        height, width = image.shape[1], image.shape[2]
        features = self.trunk(self.normalise(image))
        proposals = self.proposals(features, height, width)
        logits, deltas = self.predictor(self.region_features(features, proposals, image))
        return self.detections(logits, deltas, proposals, height, width)


def trace_parts(module: ExportableDetector, example: Tensor) -> ExportableDetector:
    """Replace the convolutional parts by traced copies (fixed graphs, any H, W and RoI count), so that the
    rest compiles with ``torch.jit.script``; the parts' Python (isinstance checks) cannot be scripted."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        batch = module.normalise(example)
        module.trunk = torch.jit.trace(module.trunk, batch)
        features = module.trunk(batch)
        module.rpn_head = torch.jit.trace(module.rpn_head, features)
        # Two fixed boxes: the traced head must not depend on how many proposals the example gives.
        pooled = module.pool(features, features.new_tensor([[0.0, 0.0, 32.0, 32.0], [8.0, 4.0, 40.0, 24.0]]))
        module.box_head = torch.jit.trace(module.box_head, pooled)
        regions = module.box_head(pooled)
        if module.global_context:
            regions = torch.cat([regions, regions], dim=1)
        module.predictor = torch.jit.trace(module.predictor, regions)
    return module
